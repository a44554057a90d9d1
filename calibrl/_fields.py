"""Typed dataclass fields: type checks (a bool is never a number, nor the reverse) and strict parsing of
command-line strings by a field's type. Used by calibrl.config; no calibrl imports."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import typing
from typing import Any

_EXPECTED = {bool: "true or false (a bool)", int: "an integer", float: "a number", str: "a string"}


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """name -> (base type, None allowed) for the fields annotated bool/int/float/str (optionally `| None`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        args = set(typing.get_args(hint)) if typing.get_args(hint) else {hint}
        optional = type(None) in args
        base = args - {type(None)}
        if len(base) == 1 and next(iter(base)) in _EXPECTED:
            out[f.name] = (next(iter(base)), optional)
    return out



def type_ok(value: Any, base: type, optional: bool) -> bool:
    """True when `value` has type `base` (ints count as floats; bools count as neither), or is None if allowed."""
    if value is None:
        return optional
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def check_types(cfg: Any) -> None:
    """ValueError naming the first field of the dataclass `cfg` whose value has the wrong type: a bool is never a
    number (lr=True) and a number never a bool (recompute_old_logp=1); ints are accepted where floats are."""
    for name, (base, optional) in field_types(type(cfg)).items():
        v = getattr(cfg, name)
        if not type_ok(v, base, optional):
            raise ValueError(f"{name}: expected {expected_words(base, optional)}, got {type(v).__name__} {v!r}")


def check_known(cls: type, keys: Any, prefix: str = "", also: Any = frozenset()) -> None:
    """ValueError for the first key that is not a field of `cls` (or in `also`), with the valid names."""
    known = {f.name for f in dataclasses.fields(cls)} | set(also)
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{prefix}{k}: unknown {cls.__name__} field{hint}; valid: {', '.join(sorted(known))}")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|nan)", re.ASCII | re.IGNORECASE)


def expected_words(base: type, optional: bool) -> str:
    """The expected type in words, as error messages say it."""
    return _EXPECTED[base] + (" or None" if optional else "")


def parse_typed(text: str, base: type, optional: bool, what: str) -> Any:
    """`text` parsed as `base` (bool, int, float or str; None from none/null when `optional`): bools from
    true/false/yes/no/on/off/1/0, numbers from ASCII digits only, strings as written (JSON quotes removed).
    ValueError "WHAT: expected <type>, got 'text'" otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a string to parse, got {type(text).__name__}")
    raw = text.strip()
    if optional and raw.lower() in ("none", "null"):
        return None
    if base is bool and raw.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.lower()]
    if base is int and _INT_RE.fullmatch(raw):
        return int(raw)
    if base is float and _FLOAT_RE.fullmatch(raw):
        return float(raw)
    if base is str:
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                pass
        if isinstance(raw, str) and raw:
            return raw
    raise ValueError(f"{what}: expected {expected_words(base, optional)}, got {text!r}")
