"""Verifiers: last-<answer> extraction, answer normalisation, accuracy / format rewards, score().

Reward = acc + 0.1 * fmt and passed = (acc == 1), as the official CalibRL code (virl_verify.py); pass/fail for the
loss is `reward > 0.1`, which is the same thing.

Rules (strict on purpose; documented so a wrong answer never scores by accident):
- extract_answer: the text between the *last* `</answer>` and the last `<answer>` before it (tags
  case-insensitive), stripped. None when there is no closed pair or the content is empty. An unclosed trailing
  `<answer>4` is ignored; nested `<answer>3 <answer>4</answer>` gives "4". Nothing in `<think>` is ever read (the
  math-verify think-leak pitfall, peers.md).
- normalize_answer: strip whitespace, quotes and surrounding punctuation ( . , ; : ! ? ), a trailing degree sign
  or "%", collapse inner whitespace; then
  - integers: "03", "+3", "3.0", "3.00" -> "3"; decimals keep their digits ("16.910" -> "16.91");
  - tuples of numbers: "(7.765, 7.882)", "7.765,7.882" -> "(7.765, 7.882)";
  - choices: "(B)", "B.", "B)", "b" -> "B" (a single letter);
  - words: lower-cased; "grey" -> "gray". "the red one" stays as it is (no guessing) and so never equals "red".
- accuracy_reward: numbers compare numerically at the gold's *written* precision: integer gold ("3") needs exact
  equality (3, 03, 3.0 pass; 3.4 fails); gold written with d decimals accepts a prediction that rounds to it at d
  decimals (reasoning-gym's convention: gold "16.91" accepts 16.909 and 16.914, gold "5.500" rejects 5.501);
  tuples compare element-wise the same way; everything else compares normalised strings.
- format_reward: the whole response matches `^\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*$` (DOTALL,
  tags lower-case). Deviation from the official `^<think>.*?</think>.*?<answer>.*?</answer>$`: we allow
  whitespace around the response (decoded text often keeps a leading space/newline) but only whitespace between
  `</think>` and `<answer>`; text after `</answer>` fails the format in both.
"""
from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["extract_answer", "normalize_answer", "accuracy_reward", "format_reward", "score", "FORMAT_BONUS"]

FORMAT_BONUS = 0.1
_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_PUNCT = " \t\n\r.,;:!?\"'`"
_SYNONYMS = {"grey": "gray"}


def extract_answer(text: Any) -> str | None:
    """Content of the last closed `<answer>…</answer>` (stripped), or None (absent, empty, or not a string)."""
    if not isinstance(text, str):
        return None
    closes = list(_CLOSE.finditer(text))
    if not closes:
        return None
    end = closes[-1].start()
    opens = [m for m in _OPEN.finditer(text, 0, end)]
    if not opens:
        return None
    content = text[opens[-1].end():end].strip()
    return content or None


def _strip(s: str) -> str:
    s = " ".join(s.split()).lstrip(_PUNCT.replace(".", "")).rstrip(_PUNCT)  # keep a leading "." (".5")
    while s and s[-1] in "°%":
        s = s[:-1].rstrip(_PUNCT)
    return s


def _canon_number(s: str) -> str | None:
    if not _NUM.match(s):
        return None
    sign = "-" if s.startswith("-") else ""
    s = s.lstrip("+-")
    whole, _, frac = s.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


def _canon_tuple(s: str) -> str | None:
    inner = s[1:-1] if s.startswith("(") and s.endswith(")") else s
    parts = [p.strip() for p in inner.split(",")]
    if len(parts) < 2:
        return None
    nums = [_canon_number(p) for p in parts]
    return None if any(n is None for n in nums) else "(" + ", ".join(nums) + ")"  # type: ignore[arg-type]


def normalize_answer(s: Any) -> str | None:
    """Canonical form of an answer string (see module docstring); None for None or an empty result."""
    if s is None:
        return None
    if not isinstance(s, str):
        raise ValueError(f"s: expected a str or None, got {type(s).__name__}")
    s = _strip(s)
    if not s:
        return None
    for canon in (_canon_number, _canon_tuple):
        c = canon(s)
        if c is not None:
            return c
    m = _CHOICE.match(s)
    if m:
        return m.group(1).upper()
    s = s.lower()
    return _SYNONYMS.get(s, s)


def _numbers(s: str) -> list[tuple[float, int]] | None:
    """[(value, decimals as written)] for a stripped number or tuple of numbers, else None."""
    inner = s[1:-1] if s.startswith("(") and s.endswith(")") else s
    parts = [p.strip() for p in inner.split(",")] if "," in inner else [s]
    if not all(_NUM.match(p) for p in parts):
        return None
    return [(float(p), len(p.partition(".")[2])) for p in parts]


def _num_equal(p: float, g: float, d: int) -> bool:
    if not (math.isfinite(p) and math.isfinite(g)):
        return False
    if d == 0:
        return p == g
    return abs(round(p, d) - round(g, d)) < 0.5 * 10.0 ** (-d - 3)


def _equal(pred_raw: str, gold_raw: str) -> bool:
    """Numbers/tuples compare at the gold's written precision; anything else by normalised string."""
    g_nums = _numbers(_strip(gold_raw))
    if g_nums is not None:
        p_nums = _numbers(_strip(pred_raw))
        return (p_nums is not None and len(p_nums) == len(g_nums)
                and all(_num_equal(p, g, d) for (p, _), (g, d) in zip(p_nums, g_nums)))
    return normalize_answer(pred_raw) == normalize_answer(gold_raw)


def _check_gold(gold: Any) -> None:
    if not isinstance(gold, str):
        raise ValueError(f"gold: expected a str, got {type(gold).__name__} ({gold!r})")
    if normalize_answer(gold) is None:
        raise ValueError(f"gold: expected a non-empty answer, got {gold!r}")


def accuracy_reward(completion: Any, gold: str) -> float:
    """1.0 if the last <answer> of `completion` equals `gold` after normalisation, else 0.0 (never raises on the
    completion; ValueError if gold is not a non-empty str)."""
    _check_gold(gold)
    pred = extract_answer(completion)
    return 1.0 if pred is not None and normalize_answer(pred) is not None and _equal(pred, gold) else 0.0


def format_reward(completion: Any) -> float:
    """1.0 if the whole completion is `<think>…</think><answer>…</answer>` (whitespace around allowed), else 0.0."""
    return 1.0 if isinstance(completion, str) and _FORMAT.match(completion) else 0.0


def score(completion: Any, gold: str) -> dict[str, Any]:
    """dict(reward=acc + 0.1*fmt, acc, fmt, passed=acc == 1) for one completion (None/garbage scores 0)."""
    acc = accuracy_reward(completion, gold)
    fmt = format_reward(completion)
    return {"reward": acc + FORMAT_BONUS * fmt, "acc": acc, "fmt": fmt, "passed": acc == 1.0}
