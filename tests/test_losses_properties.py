"""Hypothesis properties: finite losses and gradients, monotone gate, aggregation unchanged by extra padding."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrl.losses import AGG_MODES, aggregate, calibrl_loss, policy_loss

settings.register_profile("calibrl", max_examples=40, deadline=None)
settings.load_profile("calibrl")


@st.composite
def batches(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * draw(st.floats(0.01, 30.0))
    logp = (old + torch.randn(B, T, generator=g) * draw(st.floats(0.0, 5.0))).clamp(max=0.0)  # log-probs <= 0
    lens = torch.randint(0, T + 1, (B,), generator=g)
    lens[draw(st.integers(0, B - 1))] = draw(st.integers(1, T))  # at least one real token
    mask = torch.arange(T)[None, :] < lens[:, None]
    logp = torch.where(mask, logp, torch.tensor(float("-inf")))   # pads may hold -inf (suppressed ids)
    old = torch.where(mask, old, torch.tensor(float("-inf")))
    adv = torch.randn(B, generator=g) * draw(st.floats(0.0, 10.0))
    expert = -torch.rand(B, draw(st.integers(1, 8)), generator=g) * 20
    passed = torch.rand(B, generator=g) > 0.5
    return logp, old, adv, mask, expert, passed


@given(batches(), st.sampled_from(AGG_MODES), st.floats(0.0, 1.0), st.sampled_from(["token", "sequence", "mean-token"]),
       st.sampled_from([3.0, None]))
def test_losses_and_gradients_are_finite(batch, agg, slope, gap, clip_c):
    logp, old, adv, mask, expert, passed = batch
    logp = logp.clone().requires_grad_()
    loss, info = calibrl_loss(logp, old, expert, adv, mask, passed, slope=slope, gap=gap, agg=agg, clip_c=clip_c,
                              guide_coef=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    for k in ("pg_loss", "guide_loss", "loss", "clipfrac", "approx_kl", "dualclip_frac"):
        assert isinstance(info[k], float) and info[k] == info[k]
    assert 0.0 <= info["clipfrac"] <= 1.0


@given(st.floats(-20, 0), st.floats(-20, 0), st.floats(-20, 0), st.booleans(), st.floats(0.0, 1.0),
       st.floats(0.01, 5.0))
def test_gate_is_monotone_in_logp(lp1, lp2, e, passed, slope, a):
    """Guide loss falls as logp rises for passed rows, rises for failed rows (any slope in [0, 1])."""
    lo, hi = sorted((lp1, lp2))

    def guide(lp):
        x = torch.tensor([[lp]])
        _, info = calibrl_loss(x, x, torch.tensor([[e]]), torch.tensor([a]), torch.ones(1, 1),
                               torch.tensor([passed]), slope=slope)
        return info["guide_loss"]

    if passed:
        assert guide(lo) >= guide(hi) - 1e-6
    else:
        assert guide(lo) <= guide(hi) + 1e-6


@given(batches(), st.sampled_from(AGG_MODES), st.integers(1, 5), st.integers(0, 3))
def test_aggregation_unchanged_by_extra_padding(batch, mode, extra_cols, extra_rows):
    logp, old, adv, mask, _, _ = batch
    mat = torch.where(mask, logp - old, 0.0)
    B, T = mat.shape
    junk = torch.full((B, extra_cols), float("nan"))
    wide = torch.cat([mat, junk], 1)
    wide_mask = torch.cat([mask, torch.zeros(B, extra_cols, dtype=torch.bool)], 1)
    tall = torch.cat([wide, torch.full((extra_rows, T + extra_cols), 7.0)])
    tall_mask = torch.cat([wide_mask, torch.zeros(extra_rows, T + extra_cols, dtype=torch.bool)])
    norm = 11 if mode == "seq-mean-token-sum-norm" else None  # that mode divides by T unless norm_len is fixed
    a = aggregate(mat, mask, mode, norm_len=norm)
    b = aggregate(tall, tall_mask, mode, norm_len=norm)
    torch.testing.assert_close(a, b)


@given(batches(), st.integers(1, 4))
def test_calibrl_loss_unchanged_by_extra_padding(batch, extra):
    logp, old, adv, mask, expert, passed = batch
    B, T = logp.shape
    pad = lambda x, v: torch.cat([x, torch.full((B, extra), v, dtype=x.dtype)], 1)
    a, ia = calibrl_loss(logp, old, expert, adv, mask, passed)
    expert_t = torch.nn.functional.pad(expert, (0, max(0, T - expert.shape[1])))[:, :T]  # same e_t, width T
    b, ib = calibrl_loss(pad(logp, float("-inf")), pad(old, float("-inf")), pad(expert_t, -3.0), adv,
                         pad(mask, False), passed)
    torch.testing.assert_close(a, b)
    assert ia["gate_passed_below"] == ib["gate_passed_below"]


@given(batches())
def test_policy_loss_zero_advantage_is_zero(batch):
    logp, old, _, mask, _, _ = batch
    loss, _ = policy_loss(logp, old, torch.zeros(logp.shape[0]), mask)
    assert float(loss) == 0.0
