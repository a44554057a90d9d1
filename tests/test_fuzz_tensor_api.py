"""Fuzz of every public tensor function (advantage, losses, losses_hybrid, probes) with inputs from each bad class
(shape, dtype, mask, non-finite, range, mixed dtype, mixed device via "meta", half precision, requires_grad):
either a ValueError naming the argument or a finite result equal to the reference of tests/fuzz_refs.py (gradients
included, no gradient into constants). Cases: tests/fuzz_cases.py; the counted campaign: benchmarks/fuzz_tensor_api.py.
"""
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_cases as FC  # noqa: E402

SPECS = {s.name: s for s in FC.specs()}


def _check(case):
    got, why = FC.outcome(case)
    assert got in ("ok-error", "ok-equal"), f"{case.spec.name} [{case.cls}] {case.what}: {got}: {why}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_case_of_one_draw(name):
    """All corruptions of one valid draw (seed 0): every class, every argument."""
    for case in FC.cases(SPECS[name], 0):
        _check(case)


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(1, 2**31 - 1), pick=st.integers(0, 10**6))
def test_random_draws(name, seed, pick):
    """Hypothesis draws the valid input (seed) and one corruption of it (pick)."""
    cases = FC.cases(SPECS[name], seed)
    _check(cases[pick % len(cases)])


def test_classes_covered():
    seen = {c.cls for s in SPECS.values() for c in FC.cases(s, 0)}
    assert set(FC.CLASSES) <= seen


def test_every_public_tensor_function_is_fuzzed():
    from calibrl import advantage, losses, losses_hybrid, probes

    public = set()
    for mod in (advantage, losses, losses_hybrid, probes):
        for k in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
            obj = getattr(mod, k)
            if callable(obj) and getattr(obj, "__module__", "").startswith("calibrl") and not k.endswith("_kernel") \
                    and not isinstance(obj, type):
                public.add(k)
    fuzzed = {n.split("[")[0] for n in SPECS}
    assert public <= fuzzed, f"not fuzzed: {sorted(public - fuzzed)}"


def test_the_harness_catches_a_silent_nan():
    """The harness itself can fail: a function returning NaN for a valid input is classified silent."""
    spec = SPECS["aggregate"]
    bad = FC.Spec("aggregate", lambda *a, **k: torch.tensor(float("nan")), spec.make, spec.call, spec.args,
                  out="tensor")
    assert FC.outcome(FC.cases(bad, 0)[0])[0] == "silent"
