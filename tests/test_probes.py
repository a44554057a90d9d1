"""Probes: entropy (chunked, from hidden states), summaries, rarity, gate activation, expert gap, covariance and
gradient split, checked against hand values and against the losses' own definitions."""
import math

import pytest
import torch

from calibrl import probes
from calibrl.losses import GATE_KEYS, calibrl_loss, policy_loss


def ref_entropy(logits):
    lp = torch.log_softmax(logits.double(), -1)
    return -(lp.exp() * torch.nan_to_num(lp, neginf=0.0)).sum(-1)


def test_token_entropy_known_values_and_chunks():
    V = 7
    uniform = torch.zeros(2, 3, V)
    torch.testing.assert_close(probes.token_entropy(uniform), torch.full((2, 3), math.log(V)))
    peaked = torch.tensor([[0.0, -1e4, -1e4]])
    assert float(probes.token_entropy(peaked)) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 11, generator=g) * 3
    x[0, 0, 2] = float("-inf")  # a suppressed id
    want = ref_entropy(x).float()
    for c in (1, 4, 100):
        torch.testing.assert_close(probes.token_entropy(x, chunk_size=c), want)
    torch.testing.assert_close(probes.token_entropy(x, temperature=2.0), ref_entropy(x / 2).float())
    assert probes.token_entropy(x.bfloat16()).dtype == torch.float32


def test_token_entropy_matches_trl_helper():
    utils = pytest.importorskip("trl.trainer.utils")
    x = torch.randn(4, 6, 13, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(probes.token_entropy(x), utils.entropy_from_logits(x), rtol=1e-5, atol=1e-5)


def test_entropy_from_hidden_equals_full_logits():
    g = torch.Generator().manual_seed(2)
    h, W, b = torch.randn(2, 5, 8, generator=g), torch.randn(19, 8, generator=g), torch.randn(19, generator=g)
    full = (h @ W.T + b)
    for c in (1, 3, 64):
        torch.testing.assert_close(probes.entropy_from_hidden(h, W, bias=b, chunk_size=c), ref_entropy(full).float())
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 1]])
    got = probes.entropy_from_hidden(h, W, bias=b, mask=mask, chunk_size=2)
    torch.testing.assert_close(got, torch.where(mask.bool(), ref_entropy(full).float(), 0.0))
    sup = full.clone()
    sup[..., [3, 7]] = float("-inf")
    torch.testing.assert_close(probes.entropy_from_hidden(h, W, bias=b, suppress_ids=[3, 7]), ref_entropy(sup).float())
    torch.testing.assert_close(probes.entropy_from_hidden(h.reshape(10, 8), W, bias=b, temperature=0.5),
                               ref_entropy(full.reshape(10, 19) / 0.5).float())


def test_entropy_summary_values():
    ent = torch.tensor([[1.0, 2.0, 9.0], [3.0, 5.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s = probes.entropy_summary(ent, mask, torch.tensor([True, False]), torch.tensor([[0.5, 1.5, 4.0]]),
                               torch.tensor([[1, 1, 0]]))
    assert s == {"entropy_mean": pytest.approx(18 / 5), "entropy_passed": 1.5, "entropy_failed": 5.0,
                 "entropy_expert": 1.0}
    s = probes.entropy_summary(ent, mask, torch.tensor([True, True]))
    assert s["entropy_failed"] is None and s["entropy_expert"] is None


def test_group_rarity_values():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    gid = torch.arange(3).repeat_interleave(4)
    out = probes.group_rarity(r, gid, r > 0.1, bins=4)
    # pass rates 0.75, 0.25, 0.25 -> bins [0,.25) [.25,.5) [.5,.75) [.75,1]
    assert out["pass_rate_hist"] == [0, 2, 0, 1]
    assert out["uniform_frac"] == 0.0 and out["nonzero_adv_frac"] == 1.0
    assert out["abs_adv_q50"] == pytest.approx(0.25) and out["abs_adv_q90"] == pytest.approx(0.75)
    assert out["abs_adv_mean"] == pytest.approx((9 * 0.25 + 3 * 0.75) / 12)  # |A| = 0.25 x 9, 0.75 x 3


def test_gate_activation_matches_loss_info_and_selects_rows():
    g = torch.Generator().manual_seed(3)
    logp, e = -torch.rand(4, 6, generator=g) * 3, -torch.rand(4, 6, generator=g) * 3
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[0, 0] = True
    passed, adv = torch.tensor([1, 0, 1, 0]), torch.tensor([0.5, -0.5, 1.0, -1.0])
    _, info = calibrl_loss(logp, logp, e, adv, mask, passed, slope=0.3)
    gate = probes.gate_activation(logp, e, mask, passed, 0.3)
    for k in GATE_KEYS:
        assert gate[k] == pytest.approx(info[k])
    one = probes.gate_activation(torch.tensor([[-2.0, -0.5, -1.0]]), torch.full((1, 3), -1.0), torch.ones(1, 3),
                                 torch.tensor([1]), 0.5, adv=torch.tensor([2.0]))
    # the third token ties (logp == e): counted in gate_tie_frac, left out of the shares, slope weight in the mean
    assert one["gate_tie_frac"] == pytest.approx(1 / 3)
    assert one["gate_passed_below"] == pytest.approx(1 / 2) and one["gate_passed_above"] == pytest.approx(1 / 2)
    assert one["gate_weight_mean"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert one["gate_failed_above"] is None and one["guide_weight_mean"] == pytest.approx(2 * (1 + 0.5 + 0.5) / 3)
    sel = probes.gate_activation(logp, e, mask, passed, 0.3, rows=torch.tensor([1, 1, 0, 0]))
    only = probes.gate_activation(logp[:2], e[:2], mask[:2], passed[:2], 0.3)
    assert sel == pytest.approx(only)


def test_expert_gap_values():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -7.0]])
    e = torch.tensor([[-2.0, -2.0, 99.0], [-1.0, float("nan"), 5.0]])  # junk past each expert's end
    out = probes.expert_gap(logp, e, torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([2, 1]))
    gaps = torch.tensor([1.0, 0.0, -3.0, 0.5, -0.5])  # e_t = 0 at t >= length
    q = torch.quantile(gaps.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    assert [out["expert_gap_q10"], out["expert_gap_q50"], out["expert_gap_q90"]] == pytest.approx(q)
    assert out["expert_past_end_frac"] == pytest.approx(2 / 5)


def test_cov_logp_adv_values():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    adv = torch.tensor([1.0, -1.0])
    # lp mean -2.5, a mean 0: ((1.5)(1) + (0.5)(1) + (-0.5)(-1) + (-1.5)(-1)) / 4 = 1.0
    assert probes.cov_logp_adv(logp, adv, torch.ones(2, 2)) == pytest.approx(1.0)
    assert probes.cov_logp_adv(logp, adv, torch.ones(2, 2), weight=torch.full((2, 2), 0.5)) == pytest.approx(0.5)
    assert probes.cov_logp_adv(logp, adv, torch.tensor([[1, 0], [1, 0]])) == pytest.approx(1.0)


def test_gradient_split_linear_case():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    pg = (w * torch.tensor([3.0, 4.0])).sum()
    guide = (w * torch.tensor([4.0, -3.0])).sum() + 0.0 * w.sum()
    out = probes.gradient_split(pg, guide, [w])
    assert out == {"grad_norm_pg": 5.0, "grad_norm_guide": 5.0, "grad_cos_pg_guide": 0.0}
    (pg + guide).backward()  # the graph was retained
    assert w.grad.tolist() == [7.0, 1.0]


def test_gradient_split_on_calibrl_loss():
    theta = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    logp = theta * 1.0
    e, adv, mask, passed = torch.full((2, 2), -1.2), torch.tensor([1.0, -1.0]), torch.ones(2, 2), torch.tensor([1, 0])
    total, _ = calibrl_loss(logp, logp.detach(), e, adv, mask, passed, guide_coef=0.1)
    pg, _ = policy_loss(logp, logp.detach(), adv, mask)
    out = probes.gradient_split(pg, total - pg, [theta])
    # pg grad: -A/4 per token -> norm 0.5; guide grad 0.1 * (-s |A| w) / 4: w = [1, .5], [.5, 1]
    assert out["grad_norm_pg"] == pytest.approx(0.5)
    assert out["grad_norm_guide"] == pytest.approx(0.025 * math.sqrt(2 * (1 + 0.25)))
    assert out["grad_cos_pg_guide"] == pytest.approx((0.25 * 0.025 * 3) / (0.5 * 0.025 * math.sqrt(2.5)))


def test_gradient_split_accumulate_equals_backward_of_total():
    def setup():
        theta = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
        theta.grad = torch.full((2, 2), 0.25)  # an earlier micro-batch's gradient must be kept
        e, adv, mask, passed = torch.full((2, 2), -1.2), torch.tensor([1.0, -1.0]), torch.ones(2, 2), torch.tensor([1, 0])
        total, _ = calibrl_loss(theta * 1.0, theta.detach(), e, adv, mask, passed, guide_coef=0.1)
        pg, _ = policy_loss(theta * 1.0, theta.detach(), adv, mask)
        return theta, total, pg

    theta_a, total_a, _ = setup()
    total_a.backward()
    theta_b, total_b, pg_b = setup()
    out = probes.gradient_split(pg_b, total_b - pg_b, [theta_b], accumulate=True)
    torch.testing.assert_close(theta_b.grad, theta_a.grad)
    assert out["grad_norm_pg"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="accumulate"):
        probes.gradient_split(pg_b, total_b - pg_b, [theta_b], accumulate=1)


@pytest.mark.parametrize("call, arg", [
    (lambda: probes.token_entropy(torch.zeros(3, 4, dtype=torch.long)), "logits"),
    (lambda: probes.token_entropy(torch.zeros(3, 4), chunk_size=0), "chunk_size"),
    (lambda: probes.token_entropy(torch.zeros(3, 4), temperature=0.0), "temperature"),
    (lambda: probes.entropy_from_hidden(torch.zeros(2, 3, 4), torch.zeros(5, 3)), "lm_head_weight"),
    (lambda: probes.entropy_from_hidden(torch.zeros(2, 3, 4), torch.zeros(5, 4), mask=torch.ones(2, 4)), "mask"),
    (lambda: probes.entropy_from_hidden(torch.zeros(2, 3, 4), torch.zeros(5, 4), bias=torch.zeros(4)), "bias"),
    (lambda: probes.entropy_summary(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3)), "passed"),
    (lambda: probes.entropy_summary(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2)), "mask"),
    (lambda: probes.gate_activation(torch.zeros(2, 3), torch.zeros(3, 3), torch.ones(2, 3), torch.ones(2)),
     "expert_logp"),
    (lambda: probes.gate_activation(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2), 2.0),
     "slope"),
    (lambda: probes.expert_gap(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([1.0, 2.0])),
     "expert_len"),
    (lambda: probes.cov_logp_adv(torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)), "adv"),
    (lambda: probes.group_rarity(torch.ones(3), torch.zeros(3, dtype=torch.long), torch.ones(3), bins=0), "bins"),
    (lambda: probes.gradient_split(torch.tensor(1.0), torch.tensor(1.0), []), "pg_loss"),
])
def test_probe_validation(call, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        call()


# ------------------------------------------------------------------------------------------------ bad-input classes
def test_nan_logits_and_hidden_raise_instead_of_reading_as_entropy_zero():
    z = torch.tensor([[0.0, 0.0, float("-inf")], [float("nan"), 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"^logits:"):
        probes.token_entropy(z)
    assert float(probes.token_entropy(z[:1])[0]) == pytest.approx(math.log(2))   # -inf entries still fine
    with pytest.raises(ValueError, match=r"^logits:"):
        probes.token_entropy(torch.full((1, 3), float("-inf")))                    # a row with no valid id
    h = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(ValueError, match=r"^hidden:"):
        probes.entropy_from_hidden(h, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"^lm_head_weight:"):
        probes.entropy_from_hidden(torch.ones(1, 2), torch.tensor([[1.0, 0.0], [float("inf"), 0.0]]))
    x = torch.tensor([[0.0, 0.5, 0.1], [1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    before = x.clone()
    for t in (1.0, 0.5):
        probes.token_entropy(x, chunk_size=1, temperature=t)
        assert torch.equal(x, before)                                             # caller's logits untouched


def test_fp32_lm_head_is_never_cast_down():
    # fp16 hidden x fp32 head: logits 1e5 and 99999 (fp16 would overflow to inf); H of softmax([1, 0])
    p = 1 / (1 + math.exp(-1))
    want = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    h = torch.tensor([[100.0]], dtype=torch.float16)
    w = torch.tensor([[1000.0], [999.99]])
    assert float(probes.entropy_from_hidden(h, w)[0]) == pytest.approx(want, abs=1e-3)
    # bf16 hidden x fp32 head: 1 + 2^-9 is not a bf16 number; logits 100, 100.195
    hb, wb = torch.tensor([[100.0]], dtype=torch.bfloat16), torch.tensor([[1.0], [1.0 + 2 ** -9]])
    q = 1 / (1 + math.exp(-100 * 2 ** -9))
    assert float(probes.entropy_from_hidden(hb, wb)[0]) == pytest.approx(
        -(q * math.log(q) + (1 - q) * math.log(1 - q)), abs=1e-5)


def test_expert_len_beyond_the_expert_tensor_is_rejected():
    logp, e = torch.full((1, 4), -1.0), torch.full((1, 2), -2.0)
    with pytest.raises(ValueError, match=r"^expert_len: row 0 has an expert of 3 tokens but expert_logp holds 2"):
        probes.expert_gap(logp, e, torch.ones(1, 4), torch.tensor([3]))   # read 0.0 past-end before
    out = probes.expert_gap(logp, e, torch.ones(1, 4), torch.tensor([2]))
    assert out["expert_past_end_frac"] == 0.5
    # a tensor cut to the on-policy width (notebook 03's case) is fine: every on-policy e_t is known
    out = probes.expert_gap(logp[:, :2], e, torch.ones(1, 2), torch.tensor([7]))
    assert out["expert_past_end_frac"] == 0.0 and out["expert_gap_q50"] == pytest.approx(1.0)


def test_gradient_split_never_nan():
    w = torch.zeros(2, requires_grad=True)
    pg = (w * torch.tensor([1.0, 2.0])).sum()
    guide = torch.sqrt(w * w).sum()                    # finite loss (0), gradient sqrt'(0) = inf * 0 = NaN
    out = probes.gradient_split(pg, guide, [w])
    assert out["grad_norm_guide"] is None and out["grad_cos_pg_guide"] is None
    assert out["grad_norm_pg"] == pytest.approx(math.sqrt(5))
    a, b = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    pg = (a * 3e38 - b * 3e38).sum()                   # gradients +-3e38: their squares overflow float32
    out = probes.gradient_split(pg, -1.0 * pg, [a, b])
    assert out["grad_norm_pg"] == pytest.approx(3e38 * math.sqrt(2), rel=1e-6) and out["grad_cos_pg_guide"] == -1.0
    with pytest.raises(ValueError, match=r"^pg_loss: expected a finite loss"):
        probes.gradient_split((w * float("nan")).sum(), guide, [w])


def test_probe_inputs_on_another_device_or_dtype_are_named():
    logp, e, mask, passed = torch.full((2, 3), -1.0), torch.full((2, 3), -2.0), torch.ones(2, 3), torch.ones(2)
    with pytest.raises(ValueError, match=r"^rows: expected device cpu"):
        probes.gate_activation(logp, e, mask, passed, rows=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match=r"^expert_logp: expected dtype torch.float32"):
        probes.gate_activation(logp, e.double(), mask, passed)
    with pytest.raises(ValueError, match=r"^entropy: expected entropies >= 0"):
        probes.entropy_summary(torch.full((2, 3), -1.0), mask, passed)
