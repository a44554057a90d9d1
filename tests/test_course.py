"""calibrl.course: every reference solution passes its checker on fresh random inputs, every typical wrong answer
of each exercise is rejected (wrong sign, off-by-one, forgotten mask or |A|, the complement, a hard-coded constant,
the format-bonus edge case), a None answer is skipped unless CALIBRL_SOLUTIONS asks for the solutions, and the
failure message never contains the expected value."""
import math
import re

import pytest
import torch

from calibrl import course
from calibrl.course import solutions as S

SEEDS = range(5)
sgn = lambda passed: torch.where(passed, 1.0, -1.0)[:, None]


def _gate_w(lp, e, p, slope, complement=False, ignore_s=False):
    s = torch.ones(len(p))[:, None] if ignore_s else sgn(p)
    full = s * (lp - e) < 0
    return torch.where(~full if complement else full, 1.0, slope)


def _grp(fn):
    return lambda r, g: torch.stack([fn(r[g == k], r[g == k]) for k in g]) if False else _per_group(r, g, fn)


def _per_group(r, g, fn):
    out = torch.empty_like(r)
    for k in g.unique():
        out[g == k] = fn(r[g == k])
    return out


def _tm(x, m):
    return torch.where(m, x, 0.0).sum() / m.sum()


WRONG = {
    "06.paired_mean": {
        "unpaired: difference of the two means": lambda a, b: (
            sum(v for v in a.values() if v is not None) / sum(v is not None for v in a.values())
            - sum(v for v in b.values() if v is not None) / sum(v is not None for v in b.values())),
        "wrong sign": lambda a, b: -S.paired_mean(a, b),
        "hard-coded constant": lambda a, b: 0.05,
        "off-by-one: divides by n - 1": lambda a, b: (lambda d: sum(d) / (len(d) - 1))(
            [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None]),
    },
    "00.passed": {
        "counts the format bonus as a pass": lambda r: r > 0,
        "forgets a correct answer without format": lambda r: r > 1.0,
        "hard-coded constant": lambda r: torch.ones_like(r, dtype=torch.bool),
        "the complement": lambda r: r <= 0.1,
    },
    "01.scaled_advantages": {
        "wrong sign": lambda r, g: -S.scaled_advantages(r, g),
        "population std (off by one)": lambda r, g: _per_group(r, g, lambda x: (x - x.mean()) / (x.std(unbiased=False) + 1e-6)),
        "global mean and std (groups forgotten)": lambda r, g: (r - r.mean()) / (r.std() + 1e-6),
        "no std scaling": lambda r, g: S.advantages(r, g),
        "no eps (NaN on uniform groups)": lambda r, g: _per_group(r, g, lambda x: (x - x.mean()) / x.std()),
        "hard-coded constant": lambda r, g: torch.zeros_like(r),
    },
    "01.clipped_surrogate": {
        "forgotten mask": lambda lp, old, a, m: S.clipped_surrogate(lp, old, a, torch.ones_like(m)),
        "wrong sign": lambda lp, old, a, m: -S.clipped_surrogate(lp, old, a, m),
        "no clipping": lambda lp, old, a, m: _tm(-a[:, None] * torch.exp(lp - old), m),
        "no dual clip": lambda lp, old, a, m: _tm(torch.maximum(-a[:, None] * torch.exp(lp - old),
                                                                -a[:, None] * torch.exp(lp - old).clamp(0.8, 1.2)), m),
        "seq-mean instead of token-mean": lambda lp, old, a, m: ((torch.where(m, _surr(lp, old, a), 0.0)).sum(1)
                                                                 / m.sum(1)).mean(),
        "hard-coded constant": lambda lp, old, a, m: 0.003,
    },
    "02.gate_weight": {
        "the complement": lambda lp, e, p, a: _gate_w(lp, e, p, a, complement=True),
        "forgets s (every row as passed)": lambda lp, e, p, a: _gate_w(lp, e, p, a, ignore_s=True),
        "hard-coded slope": lambda lp, e, p, a: torch.full_like(lp, a),
        "hard-coded 0.5": lambda lp, e, p, a: torch.where(sgn(p) * (lp - e) < 0, 1.0, 0.5),
    },
    "02.step_factor": {
        "forgets the format-bonus exception (1 + lambda w everywhere)":
            lambda lp, e, a, p, sl, c: 1 + c * _gate_w(lp, e, p, sl),
        "forgets lambda": lambda lp, e, a, p, sl, c: 1 + _gate_w(lp, e, p, sl) * sgn(p) * torch.sign(a)[:, None],
        "forgets the 1 (the guidance term alone)": lambda lp, e, a, p, sl, c: c * _gate_w(lp, e, p, sl),
        "the complement weights": lambda lp, e, a, p, sl, c:
            1 + c * _gate_w(lp, e, p, sl, complement=True) * sgn(p) * torch.sign(a)[:, None],
        "wrong sign": lambda lp, e, a, p, sl, c: 1 - c * _gate_w(lp, e, p, sl) * sgn(p) * torch.sign(a)[:, None],
        "hard-coded constant": lambda lp, e, a, p, sl, c: torch.full_like(lp, 1.075),
    },
    "03.aligned_baseline": {
        "off by one (shifted)": lambda e, m, rp, T: torch.roll(S.aligned_baseline(e, m, rp, T), 1, 1),
        "forgotten mask (pads kept)": lambda e, m, rp, T: S.aligned_baseline(e, torch.ones_like(m), rp, T),
        "row r uses expert r (no row_prompt)": lambda e, m, rp, T:
            S.aligned_baseline(e, m, torch.arange(len(rp)) % len(e), T),
        "hard-coded constant": lambda e, m, rp, T: torch.full((len(rp), T), -7.6),
    },
    "04.correct_but_unformatted": {
        "well formatted": lambda gold: f"<think> x </think><answer>{gold}</answer>",
        "hard-coded answer": lambda gold: "<answer>green</answer>",
        "wrong answer": lambda gold: "<answer>zzz</answer>",
        "answer without tags": lambda gold: f"it is {gold}",
    },
    "05.beyond_band": {
        "which mean is larger": lambda a, b: sum(a) / len(a) > sum(b) / len(b),
        "any difference counts": lambda a, b: sum(a) != sum(b),
        "hard-coded False": lambda a, b: False,
        "hard-coded True": lambda a, b: True,
        "unpaired: the two arms' intervals do not overlap": lambda a, b: _unpaired(a, b),
    },
    "07.advantages": {
        "wrong sign": lambda r, g: -S.advantages(r, g),
        "global mean (groups forgotten)": lambda r, g: r - r.mean(),
        "off-by-one mean (sum / (n - 1))": lambda r, g: _per_group(r, g, lambda x: x - x.sum() / (len(x) - 1)),
        "std-scaled": lambda r, g: S.scaled_advantages(r, g),
        "hard-coded constant": lambda r, g: torch.zeros_like(r),
    },
    "07.seq_mean_token_mean": {
        "token-mean": lambda L, m: _tm(L, m),
        "forgotten mask": lambda L, m: L.mean(1).mean(),
        "off by one (divide by T)": lambda L, m: (torch.where(m, L, 0.0).sum(1) / m.shape[1]).mean(),
        "hard-coded constant": lambda L, m: 0.0,
    },
    "07.guide_loss": {
        "forgotten |A|": lambda lp, e, a, m, p, sl: S.guide_loss(lp, e, torch.ones_like(a), m, p, sl),
        "A instead of |A|": lambda lp, e, a, m, p, sl: _tm(a[:, None] * _leaky(lp, e, p, sl), m),
        "forgotten mask": lambda lp, e, a, m, p, sl: S.guide_loss(lp, e, a, torch.ones_like(m), p, sl),
        "wrong sign inside the gate": lambda lp, e, a, m, p, sl: _tm(a.abs()[:, None] * _leaky(lp, e, p, sl, -1), m),
        "times lambda": lambda lp, e, a, m, p, sl: 0.1 * S.guide_loss(lp, e, a, m, p, sl),
        "hard-coded constant": lambda lp, e, a, m, p, sl: 0.55,
    },
    "07.gate_failed_below": {
        "the complement (above)": lambda lp, e, m, p: 1 - S.gate_failed_below(lp, e, m, p),
        "forgotten mask": lambda lp, e, m, p: S.gate_failed_below(lp, e, torch.ones_like(m), p),
        "passed rows instead": lambda lp, e, m, p: S.gate_failed_below(lp, e, m, ~p),
        "all rows": lambda lp, e, m, p: float(((lp <= e) & m).sum() / m.sum()),
        "hard-coded 0.5": lambda lp, e, m, p: 0.5,
    },
    "07.extract_answer": {
        "first answer": lambda t: t[t.find("<answer>") + 8:t.find("</answer>")].strip(),
        "hard-coded constant": lambda t: "green",
    },
    "08.opt_steps": {
        "ignores grad_accum... by multiplying it in": lambda cfg: cfg.ppo_epochs * cfg.minibatches * cfg.grad_accum,
        "forgets the epochs": lambda cfg: cfg.minibatches,
        "hard-coded constant": lambda cfg: 2,
        "counts micro-batches": lambda cfg: cfg.minibatches * cfg.grad_accum,
    },
    "09.predicted_step": {
        "the shares swapped": lambda p, q, a, c: (1 + c * (q + (1 - q) * a), 1 + c * (p + (1 - p) * a)),
        "forgets the slope side": lambda p, q, a, c: (1 + c * p, 1 + c * q),
        "forgets lambda": lambda p, q, a, c: (1 + p + (1 - p) * a, 1 + q + (1 - q) * a),
        "the complement": lambda p, q, a, c: (1 + c * ((1 - p) + p * a), 1 + c * ((1 - q) + q * a)),
        "hard-coded 5% and 9%": lambda p, q, a, c: (1.05, 1.09),
    },
}


def _surr(lp, old, a):
    r, A = torch.exp(lp - old), a[:, None]
    l = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2))
    return torch.where(A < 0, torch.minimum(l, -A * 3.0), l)


def _leaky(lp, e, p, slope, sign=1):
    return torch.nn.functional.leaky_relu(-sign * sgn(p) * (lp - e), slope)


def _unpaired(a, b):
    from calibrl.stats import mean_ci
    ca, cb = mean_ci(a), mean_ci(b)
    return ca["hi"] < cb["lo"] or cb["hi"] < ca["lo"]


def test_every_exercise_has_wrong_answers_and_a_solution():
    assert set(WRONG) == set(course.EXERCISES)
    assert all(len(w) >= 2 for w in WRONG.values())


@pytest.mark.parametrize("name", sorted(course.EXERCISES))
def test_reference_solution_passes(name):
    for seed in SEEDS:
        assert course.check(name, course.solution(name), seed=seed, quiet=True) is True


@pytest.mark.parametrize("name,mistake", [(n, k) for n in sorted(WRONG) for k in WRONG[n]])
def test_typical_wrong_answer_is_rejected(name, mistake):
    for seed in SEEDS:
        with pytest.raises(course.ExerciseIncorrect, match="Hint:"):
            course.check(name, WRONG[name][mistake], seed=seed, quiet=True)


def test_fresh_inputs_by_default():
    ex = course.EXERCISES["07.advantages"]
    import random
    import secrets
    draws = [ex.draw(random.Random(secrets.randbits(64)))[0].tolist() for _ in range(4)]
    assert len({tuple(d) for d in draws}) > 1


def test_none_is_skipped_unless_solutions_requested(monkeypatch, capsys):
    monkeypatch.delenv(course.SOLUTIONS_ENV, raising=False)
    assert course.check("07.advantages", None) is None
    assert "skipped" in capsys.readouterr().out
    assert course.check("07.advantages", lambda r, g: None) is None      # a stub that returns None
    monkeypatch.setenv(course.SOLUTIONS_ENV, "1")
    assert course.check("07.advantages", None) is True
    assert "reference solution" in capsys.readouterr().out
    assert course.check("07.advantages", lambda r, g: None) is True     # the notebooks' stubs, in CI
    assert "reference solution" in capsys.readouterr().out
    with pytest.raises(course.ExerciseIncorrect):                        # a wrong answer is still checked
        course.check("07.advantages", lambda r, g: r - r.mean())


def test_a_fixed_value_is_refused_and_the_message_hides_the_answer():
    with pytest.raises(course.ExerciseIncorrect, match="fixed value cannot pass"):
        course.check("08.opt_steps", 2)
    ex = course.EXERCISES["07.guide_loss"]
    import random
    args = ex.draw(random.Random(3))
    want = ex.reference(*args)
    with pytest.raises(course.ExerciseIncorrect) as info:
        course.check("07.guide_loss", lambda *a: want + 0.01, seed=3)
    msg = str(info.value)
    for digits in (f"{want:.2f}", f"{want:.3f}", f"{want:.4f}"):
        assert digits not in msg


def test_an_error_in_the_learner_code_is_reported_with_a_hint():
    with pytest.raises(course.ExerciseIncorrect, match="raised ZeroDivisionError.*Hint"):
        course.check("00.passed", lambda r: 1 / 0, seed=0)


def test_unknown_exercise():
    with pytest.raises(ValueError, match="name: expected one of"):
        course.check("99.nothing", None)


def test_step_factor_reference_is_the_library_gradient_ratio():
    """The identity notebook 02 teaches, checked here on a hand-made batch: an all-fail group with mixed
    formatting has A != 0, and its formatted (failed, A > 0) row gets 1 - lambda*w, not 1 + lambda*w."""
    ex = course.EXERCISES["02.step_factor"]
    rewards = torch.tensor([0.1, 0.0, 0.0])
    from calibrl.advantage import group_advantages
    adv = group_advantages(rewards, torch.zeros(3, dtype=torch.long))
    assert adv[0] > 0 and not bool(rewards[0] > 0.1)
    logp = torch.tensor([[-0.5, -2.0], [-0.5, -2.0], [-0.5, -2.0]])
    e = torch.full((3, 2), -1.0)
    f = ex.reference(logp, e, adv, rewards > 0.1, 0.5, 0.1)
    # row 0: failed, A > 0: token 0 above e (w = 1) -> 1 - 0.1; token 1 below (w = 0.5) -> 1 - 0.05
    torch.testing.assert_close(f[0], torch.tensor([0.9, 0.95]))
    # rows 1, 2: failed, A < 0: 1 + 0.1 * w
    torch.testing.assert_close(f[1], torch.tensor([1.1, 1.05]))
