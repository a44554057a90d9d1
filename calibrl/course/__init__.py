"""calibrl.course: the checked exercises of the notebooks.

A learner's cell starts as `None` (or a function stub that returns None) with a hint; the checker cell calls
`check("<exercise>", my_answer)`. The checker draws fresh random inputs (a seed it does not show), compares the
learner's function with the library on each draw and prints "correct" or raises ExerciseIncorrect with a hint,
never the expected value. An answer left as None is "skipped", unless the environment asks for the solutions
(CALIBRL_SOLUTIONS=1, set by CI so every checker runs against the reference solutions in
calibrl.course.solutions).
"""
from __future__ import annotations

import math
import os
import random
import secrets
from typing import Any, Callable

import torch

from calibrl.course import solutions
from calibrl.course.exercises import EXERCISES, Exercise

SOLUTIONS_ENV = "CALIBRL_SOLUTIONS"

SOLUTION_OF: dict[str, Callable] = {
    "00.passed": solutions.passed, "01.scaled_advantages": solutions.scaled_advantages,
    "01.clipped_surrogate": solutions.clipped_surrogate, "02.gate_weight": solutions.gate_weight,
    "02.step_factor": solutions.step_factor, "03.aligned_baseline": solutions.aligned_baseline,
    "04.correct_but_unformatted": solutions.correct_but_unformatted, "05.beyond_band": solutions.beyond_band,
    "06.paired_mean": solutions.paired_mean,
    "07.advantages": solutions.advantages, "07.seq_mean_token_mean": solutions.seq_mean_token_mean,
    "07.guide_loss": solutions.guide_loss, "07.gate_failed_below": solutions.gate_failed_below,
    "07.extract_answer": solutions.extract_last_answer, "08.opt_steps": solutions.opt_steps,
    "09.predicted_step": solutions.predicted_step,
}

__all__ = ["EXERCISES", "Exercise", "ExerciseIncorrect", "SOLUTIONS_ENV", "check", "hint", "solution",
           "solutions_enabled"]


class ExerciseIncorrect(AssertionError):
    """A checked answer is wrong on at least one fresh random input (the message is a hint, not the answer)."""


def solutions_enabled() -> bool:
    """True when the environment asks for the reference solutions (CALIBRL_SOLUTIONS set to 1/true/yes)."""
    return os.environ.get(SOLUTIONS_ENV, "").strip().lower() in ("1", "true", "yes")


def _exercise(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ValueError(f"name: expected one of {sorted(EXERCISES)}, got {name!r}")
    return EXERCISES[name]


def hint(name: str) -> str:
    """The hint of exercise `name`."""
    return _exercise(name).hint


def solution(name: str) -> Callable:
    """The reference solution of exercise `name` (what CALIBRL_SOLUTIONS=1 substitutes for a None answer)."""
    _exercise(name)
    return SOLUTION_OF[name]


def _same(got: Any, want: Any, kind: str) -> tuple[bool, str]:
    """(equal?, a hint about the kind of mistake that never reveals `want`)."""
    if kind == "predicate":
        return bool(want(got)), ""
    if kind == "str":
        return isinstance(got, str) and got.strip() == str(want).strip(), ""
    if kind in ("bool", "int"):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if kind == "int" and (isinstance(got, bool) or not isinstance(got, (int, float)) or got != int(got)):
            return False, "return a whole number."
        return bool(got == want) if kind == "int" else (isinstance(got, (bool, int)) and bool(got) == want), ""
    if kind == "scalar":
        try:
            g = float(got)
        except (TypeError, ValueError):
            return False, "return one number (a float or a 0-d tensor)."
        ok = math.isfinite(g) and abs(g - want) <= 1e-4 * max(1.0, abs(want))
        return ok, ("the sign looks flipped." if not ok and abs(g + want) <= 1e-4 * max(1.0, abs(want)) else "")
    g = torch.as_tensor(got).detach().cpu()
    w = torch.as_tensor(want).cpu()
    if g.dtype == torch.bool or w.dtype == torch.bool:
        g, w = g.to(torch.bool), w.to(torch.bool)
        if g.shape != w.shape:
            return False, f"expected a tensor of shape {tuple(w.shape)}, got {tuple(g.shape)}."
        return bool((g == w).all()), ""
    g, w = g.double(), w.double()
    if g.shape != w.shape:
        return False, f"expected a tensor of shape {tuple(w.shape)}, got {tuple(g.shape)}."
    keep = torch.isfinite(w)  # NaN in the reference: positions that are not asked about
    ok = bool(torch.isfinite(g[keep]).all()) and torch.allclose(g[keep], w[keep], rtol=1e-4, atol=1e-5)
    flipped = not ok and torch.allclose(-g[keep], w[keep], rtol=1e-4, atol=1e-5) and bool(w[keep].abs().sum() > 0)
    return ok, ("the sign looks flipped." if flipped else "")


def _not_done(answer: Any) -> bool:
    return answer is None


def check(name: str, answer: Any, *, seed: int | None = None, quiet: bool = False) -> bool | None:
    """Check the learner's function `answer` for exercise `name` on fresh random inputs.

    Returns True (correct: prints so unless quiet) or None (skipped: `answer` is None, or returned None, and
    CALIBRL_SOLUTIONS is not set); raises ExerciseIncorrect with a hint on the first input where it disagrees with
    the library, or when it raises. `seed` fixes the draws (tests); by default they are fresh each call.
    """
    ex = _exercise(name)
    source = "your answer"
    if _not_done(answer) and solutions_enabled():
        answer, source = SOLUTION_OF[name], f"the reference solution ({SOLUTIONS_ENV}=1)"
    if _not_done(answer):
        print(f"{ex.title}: skipped. Write {ex.signature}. Hint: {ex.hint}")
        return None
    if not callable(answer):
        raise ExerciseIncorrect(f"{ex.title}: expected a function {ex.signature}, got {type(answer).__name__} "
                                f"(the checker calls it on fresh random inputs, so a fixed value cannot pass)")
    rng = random.Random(seed if seed is not None else secrets.randbits(64))
    for trial in range(ex.trials):
        args = ex.draw(rng)
        want = ex.reference(*args)
        try:
            got = answer(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        except Exception as err:  # the learner's code failed: say how, not what to write
            raise ExerciseIncorrect(f"{ex.title}: your function raised {type(err).__name__}: {err}. "
                                    f"Hint: {ex.hint}") from err
        if got is None:  # a stub: not attempted yet
            if solutions_enabled() and source == "your answer":
                return check(name, None, seed=seed, quiet=quiet)
            print(f"{ex.title}: skipped (your function returned None). Hint: {ex.hint}")
            return None
        ok, why = _same(got, want, ex.kind)
        if not ok:
            raise ExerciseIncorrect(f"{ex.title}: not yet: {source} disagrees with the library on random input "
                                    f"{trial + 1} of {ex.trials}. {why + ' ' if why else ''}Hint: {ex.hint}")
    if not quiet:
        print(f"{ex.title}: correct ✓ ({source}, checked on {ex.trials} fresh random inputs)")
    return True
