"""Verifiers: last-<answer> extraction, answer normalisation, accuracy / format rewards, score().

Reward = acc + 0.1 * fmt and passed = (acc == 1), as the official CalibRL code (virl_verify.py); pass/fail for the
loss is `reward > 0.1`, which is the same thing.

Rules (strict on purpose; documented so a wrong answer never scores by accident):
- extract_answer: the text between the *last* `</answer>` and the last `<answer>` before it (tags
  case-insensitive), stripped, looking only at text outside thinking. None when there is no closed pair or the
  content is empty. An unclosed trailing `<answer>4` is ignored; nested `<answer>3 <answer>4</answer>` gives "4".
  Nothing inside thinking is ever read (the math-verify think-leak pitfall, peers.md): thinking is every
  `<think>`...`</think>` block, an unclosed `<think>` to the end of the text, and everything before a `</think>`
  that closes no block (chat templates that open `<think>` in the prompt); an answer pair must lie outside it.
- normalize_answer: strip whitespace, quotes and surrounding punctuation ( . , ; : ! ? ), a trailing degree sign
  or "%", collapse inner whitespace; then
  - integers: "03", "+3", "3.0", "3.00" -> "3"; decimals keep their digits ("16.910" -> "16.91"); ASCII digits
    only (Arabic-Indic, full-width and other Unicode digits are words, never numbers);
  - tuples of 2 to MAX_TUPLE (64) numbers: "(7.765, 7.882)", "7.765,7.882" -> "(7.765, 7.882)";
  - choices: "(B)", "B.", "B)", "b" -> "B" (a single letter);
  - words: lower-cased; "grey" -> "gray". "the red one" stays as it is (no guessing) and so never equals "red".
- accuracy_reward: numbers compare numerically at the gold's *written* precision: integer gold ("3") needs exact
  equality (3, 03, 3.0 pass; 3.4 fails); gold written with d decimals accepts a prediction that rounds to it at d
  decimals (reasoning-gym's convention: gold "16.91" accepts 16.909 and 16.914, gold "5.500" rejects 5.501);
  tuples compare element-wise the same way; everything else compares normalised strings.
- format_reward: the response is exactly `<think>…</think>` then `<answer>…</answer>`: the only think/answer tags
  (any case) in the whole text are these four, in this order and lower-case, with only whitespace before `<think>`,
  between `</think>` and `<answer>`, and after `</answer>`. So several think or answer blocks, or a tag inside a
  block, fail the format. Deviation from the official `^<think>.*?</think>.*?<answer>.*?</answer>$`: we allow
  whitespace around the response (decoded text often keeps a leading space/newline) but only whitespace between
  `</think>` and `<answer>`, and the official regex accepts repeated blocks; text after `</answer>` fails in both.

Every function is linear in the length of the text (a tag scan and string methods; no backtracking regex): a 1 MB
completion scores in milliseconds (tests/test_rewards.py).
"""
from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["extract_answer", "normalize_answer", "accuracy_reward", "format_reward", "score", "FORMAT_BONUS"]

FORMAT_BONUS = 0.1
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# ASCII digits only (used with fullmatch); possessive quantifiers: a failed match never backtracks
_NUM = re.compile(r"[+-]?+(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)", re.ASCII)
MAX_TUPLE = 64
"""Tuples of more than this many numbers are compared as strings, not element-wise (bounds the work per answer)."""
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_PUNCT = " \t\n\r.,;:!?\"'`"
_SYNONYMS = {"grey": "gray"}


def _lower(text: str) -> str:
    """Lower-cased text with the same length and positions (Unicode lower-casing when it keeps every position,
    else ASCII only), so tags are found with str.find/rfind, which run in C and never backtrack."""
    low = text.lower()
    return low if len(low) == len(text) else text.translate(_ASCII_LOWER)


def _outside_think(low: str):
    """(start, end) spans of the lower-cased text outside thinking (module docstring), from the LAST one back.
    Walks back block by block with rfind/find: linear in the text, one Python iteration per think block."""
    end = len(low)
    while end >= 0:
        close, opening = low.rfind("</think>", 0, end), low.rfind("<think>", 0, end)
        if close < 0 and opening < 0:
            yield 0, end
            return
        if close > opening:  # the last think tag before `end` is a close: after it is visible
            yield close + 8, end
            prev_close, prev_open = low.rfind("</think>", 0, close), low.rfind("<think>", 0, close)
            if prev_open < 0 or prev_open < prev_close:  # it closes no block: everything before it is thinking
                return
            end = low.find("<think>", prev_close + 8 if prev_close >= 0 else 0)  # the block's (first) opening
        else:  # an opening with no close after it: thinking from the first opening since the previous close
            end = low.find("<think>", close + 8 if close >= 0 else 0)


def extract_answer(text: Any) -> str | None:
    """Content of the last closed `<answer>…</answer>` outside thinking (stripped), or None (absent, empty, only
    inside `<think>`, or not a string)."""
    if not isinstance(text, str):
        return None
    low = _lower(text)
    if "</answer>" not in low:
        return None
    for a, b in _outside_think(low):
        end = low.rfind("</answer>", a, b)
        if end < 0:
            continue
        start = low.rfind("<answer>", a, end)
        if start < 0:
            return None  # the last closed tag outside thinking has no opening: no answer (never an earlier one)
        return text[start + 8:end].strip() or None
    return None


def _strip(s: str) -> str:
    # keep a leading "." (".5"); trailing punctuation, degree signs and "%" in any order, in one pass
    return " ".join(s.split()).lstrip(_PUNCT.replace(".", "")).rstrip(_PUNCT + "°%")


def _canon_number(s: str) -> str | None:
    if not _NUM.fullmatch(s):
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
    parts = [p.strip() for p in inner.split(",", MAX_TUPLE)]
    if not 2 <= len(parts) <= MAX_TUPLE:
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
    parts = [p.strip() for p in inner.split(",", MAX_TUPLE)] if "," in inner else [s]
    if len(parts) > MAX_TUPLE or not all(_NUM.fullmatch(p) for p in parts):
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
    """1.0 if the completion is exactly one `<think>…</think>` then one `<answer>…</answer>` (whitespace around
    allowed, no other think/answer tag anywhere), else 0.0."""
    if not isinstance(completion, str):
        return 0.0
    low = _lower(completion)
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(low.count(tag) != 1 for tag in tags):
        return 0.0
    pos = [low.find(tag) for tag in tags]
    if pos != sorted(pos) or any(completion[p:p + len(tag)] != tag for p, tag in zip(pos, tags)):
        return 0.0
    gaps = (completion[:pos[0]], completion[pos[1] + 8:pos[2]], completion[pos[3] + 9:])
    return 1.0 if all(not g.strip() for g in gaps) else 0.0


def score(completion: Any, gold: str) -> dict[str, Any]:
    """dict(reward=acc + 0.1*fmt, acc, fmt, passed=acc == 1) for one completion (None/garbage scores 0)."""
    acc = accuracy_reward(completion, gold)
    fmt = format_reward(completion)
    return {"reward": acc + FORMAT_BONUS * fmt, "acc": acc, "fmt": fmt, "passed": acc == 1.0}
