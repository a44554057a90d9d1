"""Run history: runs/<name>/config.json, history.jsonl (one flat row per RL step, appended and flushed as training
goes, so a crash leaves every finished step) and samples.jsonl (sampled responses for the entropy heatmap)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

CONFIG_FILE, HISTORY_FILE, SAMPLES_FILE = "config.json", "history.jsonl", "samples.jsonl"


def clean(value: Any) -> Any:
    """JSON-ready value: tensors/numpy scalars to python numbers, NaN/inf to None (never NaN in a history)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "tolist"):
        return clean(value.tolist())
    raise ValueError(f"value: expected a JSON-able number, string, list or dict, got {type(value).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file ([] when it does not exist). A torn last line (a writer still appending, or a
    crash mid-write) is dropped; a bad line anywhere else raises."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            # a torn last line after a crash: drop it
    return rows


class History:
    """The rows of one run. `History.load(run_dir)` reads a saved run; `.to_pandas()` gives a DataFrame."""

    def __init__(self, run_dir: str | os.PathLike, config: dict | None = None, rows: list[dict] | None = None):
        self.run_dir = Path(run_dir)
        self.config = config or {}
        self.rows: list[dict] = rows or []

    # ---------------------------------------------------------------------------------------------- creation
    @classmethod
    def create(cls, run_dir: str | os.PathLike, config: dict, *, resume: bool = False,
               overwrite: bool = False) -> "History":
        """Open `run_dir` for writing. An existing non-empty directory is refused unless `resume` (keep its rows)
        or `overwrite` (delete it first)."""
        run_dir = Path(run_dir)
        if resume and overwrite:
            raise ValueError("resume/overwrite: expected at most one of them, got both")
        exists = run_dir.exists() and any(run_dir.iterdir())
        if exists and not (resume or overwrite):
            raise ValueError(f"run_dir: {run_dir} already exists; pass resume (--resume) to continue it or "
                             f"overwrite (--overwrite) to replace it")
        if resume:
            if not (run_dir / CONFIG_FILE).exists():
                raise ValueError(f"resume: {run_dir / CONFIG_FILE} not found; nothing to resume")
            return cls.load(run_dir)
        if exists and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(json.dumps(clean(config), indent=2, sort_keys=True) + "\n")
        (run_dir / HISTORY_FILE).touch()
        return cls(run_dir, config, [])

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "History":
        """Read config.json and history.jsonl of a run directory."""
        run_dir = Path(run_dir)
        if not (run_dir / HISTORY_FILE).exists():
            raise ValueError(f"run_dir: expected {run_dir / HISTORY_FILE} to exist (not a run directory?)")
        cfg_path = run_dir / CONFIG_FILE
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        return cls(run_dir, config, read_jsonl(run_dir / HISTORY_FILE))

    # ------------------------------------------------------------------------------------------------- writing
    def append(self, row: dict) -> dict:
        """Clean `row`, append it to history.jsonl and flush to disk; returns the cleaned row."""
        row = clean(row)
        if "step" not in row:
            raise ValueError("row: expected a 'step' key")
        with open(self.run_dir / HISTORY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        return row

    def append_samples(self, rows: Iterable[dict]) -> None:
        """Append sampled responses (step, prompt_id, tokens, entropy, logp, passed, reward) to samples.jsonl."""
        with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(clean(r)) + "\n")
            f.flush()

    def truncate(self, step: int) -> None:
        """Drop rows (history and samples) after `step`, e.g. steps a crashed run finished after its checkpoint."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        for name in (HISTORY_FILE, SAMPLES_FILE):
            path = self.run_dir / name
            kept = [r for r in read_jsonl(path) if r["step"] <= step]
            if path.exists():
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------------------------------------- reading
    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.run_dir.name

    @property
    def mode(self) -> str | None:
        """The run's loss mode (from config.json, else the first row)."""
        return (self.config.get("loss") or {}).get("mode") or (self.rows[0].get("mode") if self.rows else None)

    @property
    def seed(self) -> int | None:
        """The run's seed (from config.json, else the first row)."""
        return self.config.get("seed", self.rows[0].get("seed") if self.rows else None)

    def samples(self) -> list[dict]:
        """Rows of samples.jsonl."""
        return read_jsonl(self.run_dir / SAMPLES_FILE)

    def column(self, key: str) -> list:
        """Values of `key` over steps (None where absent)."""
        return [r.get(key) for r in self.rows]

    def to_pandas(self):
        """History rows as a pandas DataFrame (one row per step; null -> NaN)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"History({str(self.run_dir)!r}, mode={self.mode!r}, seed={self.seed!r}, steps={len(self.rows)})"


# ------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: Any, optimizer: Any) -> Path:
    """Write runs/<name>/checkpoint/state.pt: trainable weights, optimizer state, RNG states (torch, python, numpy)
    and the step (which is also the data-order position). Written to a temporary file, then renamed."""
    import random

    import numpy as np
    import torch

    path = Path(run_dir) / CHECKPOINT_DIR
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "step": int(step),
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
        "rng_numpy": np.random.get_state(),
    }
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")
    return path


def load_checkpoint(run_dir: str | os.PathLike, model: Any, optimizer: Any) -> int:
    """Restore what `save_checkpoint` wrote into `model` and `optimizer` and the global RNGs; returns the step."""
    import random

    import numpy as np
    import torch

    file = Path(run_dir) / CHECKPOINT_DIR / "state.pt"
    if not file.exists():
        raise ValueError(f"resume: no checkpoint at {file}")
    state = torch.load(file, weights_only=False)
    params = dict(model.named_parameters())
    missing = [n for n in state["trainable"] if n not in params]
    if missing:
        raise ValueError(f"resume: checkpoint parameters not in the model: {missing[:3]}")
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    np.random.set_state(state["rng_numpy"])
    return int(state["step"])
