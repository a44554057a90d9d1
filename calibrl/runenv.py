"""Where a run ran: the library versions and the processor, recorded in runs/<name>/env.json.

Bit-identity (a resumed run, tests/test_golden.py) holds only inside one environment: the same torch, transformers
and peft builds on the same kind of processor. A different CPU generation makes torch pick other SIMD kernels, so
float sums round differently (seen 2026-12-02: the same code and wheels on an AMD family-26 CPU reproduced a
fixture recorded on an earlier machine to ~1e-6 relative, with the same samples, but not bit for bit)."""
from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path
from typing import Any

__all__ = ["ENV_FILE", "PACKAGES", "cpu_model", "environment", "differences"]

ENV_FILE = "env.json"  # {"created": environment(), "resumed": [environment(), ...]}

PACKAGES = ("torch", "transformers", "peft", "tokenizers", "numpy", "bitsandbytes")
_IDENTITY_KEYS = ("packages", "cpu", "cpu_capability", "cuda")  # what bit-identity depends on (not calibrl's version)


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """"<vendor> family <f> model <m> (<model name>)" from /proc/cpuinfo (two CPUs of one family and model run the
    same kernels); platform.processor() or "unknown" where that file is absent."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    if not fields:
        return platform.processor() or "unknown"
    return (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
            f"({fields.get('model name', '?')})")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """{"calibrl", "python", "packages": {name: version or None}, "cpu", "cpu_capability", "cuda"} of this process."""
    import torch

    from calibrl import __version__

    return {"calibrl": __version__, "python": platform.python_version(),
            "packages": {p: _version(p) for p in PACKAGES},
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def differences(before: dict, after: dict) -> list[str]:
    """What differs between two `environment()` records in the parts bit-identity depends on, one phrase each
    ("transformers 5.23.0 -> 5.24.0", "cpu A -> B"); [] when they agree."""
    for name, env in (("before", before), ("after", after)):
        if not isinstance(env, dict):
            raise ValueError(f"{name}: expected an environment() dict, got {type(env).__name__}")
    out = []
    for key in _IDENTITY_KEYS:
        a, b = before.get(key), after.get(key)
        if key == "packages":
            a, b = a or {}, b or {}
            out += [f"{p} {a.get(p)} -> {b.get(p)}" for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
        elif a != b:
            out.append(f"{key} {a} -> {b}")
    return out
