"""Hand-computed values and gradient directions for aggregate, policy_loss, calibrl_loss, luffy_loss, rlplus_loss."""
import math

import pytest
import torch

from calibrl import losses
from calibrl.losses import aggregate, calibrl_loss, luffy_loss, policy_loss, rlplus_loss

L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mode, norm_len, want", [
    ("token-mean", None, 7 / 3),
    ("seq-mean-token-mean", None, (1.5 + 4.0) / 2),
    ("seq-mean-token-sum", None, (3.0 + 4.0) / 2),
    ("seq-mean-token-sum-norm", None, 7 / 3),
    ("seq-mean-token-sum-norm", 7, 1.0),
])
def test_aggregate_hand_values(mode, norm_len, want):
    assert float(aggregate(L, M, mode, norm_len=norm_len)) == pytest.approx(want)


def test_aggregate_ignores_inf_and_nan_at_masked_positions():
    bad = L.clone()
    bad[0, 2], bad[1, 1] = float("-inf"), float("nan")
    for mode in losses.AGG_MODES:
        assert float(aggregate(bad, M, mode)) == float(aggregate(L, M, mode))


def test_aggregate_leaves_empty_rows_out_of_row_means():
    mat = torch.cat([L, torch.full((1, 3), 9.0)])
    mask = torch.cat([M, torch.zeros(1, 3, dtype=torch.long)])
    assert float(aggregate(mat, mask, "seq-mean-token-mean")) == pytest.approx(2.75)


def _rows(log_ratios, advs):
    old = torch.full((len(advs), 1), -2.0)                      # log-probs stay <= 0 for ratios up to e^2
    logp = (old + torch.tensor(log_ratios)[:, None]).requires_grad_()
    return logp, old, torch.tensor(advs), torch.ones(len(advs), 1, dtype=torch.bool)


# rows: A=1 r=1.5 -> -1.2 (clipped); A=1 r=0.9 -> -0.9; A=-1 r=1.5 -> 1.5; A=-1 r=4 -> 3 (dual clip);
#       A=-1 r=0.5 -> 0.8 (clipped)
CASE = ([math.log(1.5), math.log(0.9), math.log(1.5), math.log(4.0), math.log(0.5)], [1.0, 1.0, -1.0, -1.0, -1.0])


def test_policy_loss_hand_values():
    logp, old, adv, mask = _rows(*CASE)
    loss, info = policy_loss(logp, old, adv, mask)
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.9 + 1.5 + 3.0 + 0.8) / 5, abs=1e-6)
    assert info["clipfrac"] == pytest.approx(2 / 5) and info["dualclip_frac"] == pytest.approx(1 / 5)
    assert info["pg_loss"] == info["loss"] == pytest.approx(float(loss.detach()))
    assert info["approx_kl"] == pytest.approx(-sum(CASE[0]) / 5, abs=1e-6)
    loss.backward()
    # d/dlogp: clipped rows 0 and 4 and dual-clipped row 3 get no gradient; row 1: -A r / 5; row 2: -A r / 5
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor([0.0, -0.9 / 5, 1.5 / 5, 0.0, 0.0]))


def test_policy_loss_without_dual_clip_and_with_clip_higher():
    logp, old, adv, mask = _rows(*CASE)
    loss, info = policy_loss(logp, old, adv, mask, clip_c=None)
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.9 + 1.5 + 4.0 + 0.8) / 5, abs=1e-6)
    assert info["dualclip_frac"] == 0.0
    logp, old, adv, mask = _rows([math.log(1.5)], [1.0])
    assert float(policy_loss(logp, old, adv, mask, clip_high=0.28)[0].detach()) == pytest.approx(-1.28)


def test_policy_loss_kl_and_entropy_terms():
    logp, old, adv, mask = _rows([0.0, 0.0], [1.0, -1.0])
    ref = logp.detach() + 0.5
    ent = torch.full((2, 1), 2.0)
    loss, info = policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    k3 = math.exp(0.5) - 0.5 - 1
    assert info["kl"] == pytest.approx(k3) and info["entropy"] == pytest.approx(2.0)
    assert float(loss.detach()) == pytest.approx(0.0 + 0.1 * k3 - 0.01 * 2.0)


def test_policy_loss_adv_per_token_and_bf16():
    logp, old, adv, mask = _rows([0.0, 0.0], [1.0, -1.0])
    a2 = adv[:, None].expand(2, 1).clone()
    assert float(policy_loss(logp, old, a2, mask)[0].detach()) == float(policy_loss(logp, old, adv, mask)[0].detach())
    lb = logp.detach().bfloat16().requires_grad_()
    loss, _ = policy_loss(lb, old.bfloat16(), adv.bfloat16(), mask)
    loss.backward()
    assert loss.dtype == torch.float32 and lb.grad.dtype == torch.bfloat16


def test_padded_minus_inf_logp_gives_finite_loss_and_grad():
    logp = torch.tensor([[-0.5, -float("inf")], [-0.2, -0.3]], requires_grad=True)
    old = torch.tensor([[-0.5, -float("inf")], [-0.2, -0.3]])
    e = torch.tensor([[-1.0, 0.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    for fn in (lambda: policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask),
               lambda: calibrl_loss(logp, old, e, torch.tensor([1.0, -1.0]), mask, torch.tensor([1, 0]))):
        logp.grad = None
        loss, info = fn()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
        assert all(v is None or math.isfinite(v) for v in info.values())


# CalibRL: r = 1, adv [1, -1], passed [1, 0], e = -1 everywhere
LP = [[-2.0, -0.5], [-0.5, -2.0]]


def _calib(adv=(1.0, -1.0), **kw):
    logp = torch.tensor(LP, requires_grad=True)
    old = logp.detach().clone()
    e = torch.full((2, 2), -1.0)
    loss, info = calibrl_loss(logp, old, e, torch.tensor(adv), torch.ones(2, 2), torch.tensor([1, 0]), **kw)
    return logp, loss, info


def test_calibrl_token_gap_hand_values():
    logp, loss, info = _calib()
    # guide: row0 (passed, s=+1): x = e - logp = [1, -0.5] -> [1, -0.25]; row1 (failed): x = logp - e = [0.5, -1]
    # -> [0.5, -0.5]; token-mean = 0.75 / 4. pg: -A r = [-1,-1,1,1] -> 0.
    assert info["guide_loss"] == pytest.approx(0.1875) and info["pg_loss"] == pytest.approx(0.0)
    assert float(loss.detach()) == pytest.approx(0.1 * 0.1875)
    assert info["gate_passed_below"] == 0.5 and info["gate_passed_above"] == 0.5
    assert info["gate_failed_above"] == 0.5 and info["gate_failed_below"] == 0.5
    assert info["gate_weight_mean"] == pytest.approx(0.75)
    loss.backward()
    want = torch.tensor([[-0.25 - 0.025, -0.25 - 0.0125], [0.25 + 0.025, 0.25 + 0.0125]])
    torch.testing.assert_close(logp.grad, want)


def test_gate_ties_counted_apart_and_left_out_of_the_shares():
    # passed row gaps (logp - e) [0, -1, 0.5, 0]; failed row gaps [0, -2, 1, 3]: 3 ties of 8 tokens
    e = torch.full((2, 4), -4.0)
    logp = (e + torch.tensor([[0.0, -1.0, 0.5, 0.0], [0.0, -2.0, 1.0, 3.0]])).requires_grad_(True)
    mask, passed, adv = torch.ones(2, 4), torch.tensor([1, 0]), torch.tensor([1.0, -1.0])
    loss, info = calibrl_loss(logp, logp.detach(), e, adv, mask, passed, slope=0.5, guide_coef=0.1)
    assert info["gate_tie_frac"] == pytest.approx(3 / 8)
    assert info["gate_passed_below"] == pytest.approx(1 / 2) and info["gate_passed_above"] == pytest.approx(1 / 2)
    assert info["gate_failed_above"] == pytest.approx(2 / 3) and info["gate_failed_below"] == pytest.approx(1 / 3)
    assert info["gate_weight_mean"] == pytest.approx((3 + 0.5 * 5) / 8)       # ties keep the slope weight
    # loss and gradient as before: x = -s gap = [0, 1, -.5, 0] and [0, -2, 1, 3]; leaky -> sum 3.75; pg = 0
    assert info["guide_loss"] == pytest.approx(3.75 / 8) and float(loss.detach()) == pytest.approx(0.1 * 3.75 / 8)
    loss.backward()
    want = torch.tensor([[-1 - 0.1 * 0.5, -1 - 0.1, -1 - 0.1 * 0.5, -1 - 0.1 * 0.5],
                         [1 + 0.1 * 0.5, 1 + 0.1 * 0.5, 1 + 0.1, 1 + 0.1]]) / 8   # d/dlogp; leaky'(0) = slope
    assert torch.allclose(logp.grad, want)
    from calibrl import probes
    gate = probes.gate_activation(logp.detach(), e, mask, passed, 0.5)
    assert {k: gate[k] for k in losses.GATE_KEYS} == pytest.approx({k: info[k] for k in losses.GATE_KEYS})


def test_gate_ties_sequence_gap():
    # passed row: Delta = -2 - (-2) = 0 (both tokens tie); failed row: Delta = -2 - (-3) = 1 (weight-1 side)
    logp = torch.full((2, 2), -1.0)
    e = torch.tensor([[-0.5, -1.5], [-1.0, -2.0]])
    _, info = calibrl_loss(logp, logp, e, torch.tensor([1.0, -1.0]), torch.ones(2, 2), torch.tensor([1, 0]),
                           gap="sequence")
    assert info["gate_tie_frac"] == pytest.approx(0.5)
    assert info["gate_passed_below"] is None and info["gate_passed_above"] is None
    assert info["gate_failed_above"] == pytest.approx(1.0) and info["gate_failed_below"] == pytest.approx(0.0)
    assert info["gate_weight_mean"] == pytest.approx((2 + 0.5 * 2) / 4)


def test_one_gate_keys_constant():
    from calibrl import stepstats
    assert stepstats.GATE_KEYS is losses.GATE_KEYS and "gate_tie_frac" in losses.GATE_KEYS


def test_calibrl_weight_none_slope_and_coef():
    _, _, info = _calib(adv=(2.0, -0.5))
    assert info["guide_loss"] == pytest.approx((2.0 * 0.75 + 0.5 * 0.0) / 4)
    _, _, info = _calib(adv=(2.0, -0.5), weight="none")
    assert info["guide_loss"] == pytest.approx(0.75 / 4)
    _, loss, info = _calib(slope=0.0, guide_coef=2.0)  # ReLU gate
    assert info["guide_loss"] == pytest.approx(1.5 / 4) and float(loss.detach()) == pytest.approx(2.0 * 1.5 / 4)
    _, _, info = _calib(slope=1.0)  # linear: x summed = 1 - 0.5 + 0.5 - 1 = 0
    assert info["guide_loss"] == pytest.approx(0.0) and info["gate_weight_mean"] == 1.0


def test_calibrl_sequence_and_mean_token_gaps():
    # row sums: logp -2.5 both rows, expert -2 -> Delta = -0.5; row0 passed x = 0.5 -> L = 0.5;
    # row1 failed x = -0.5 -> L = -0.25; token-mean of L_i / n_i spread = (0.5 - 0.25) / 4
    logp, loss, info = _calib(gap="sequence")
    assert info["guide_loss"] == pytest.approx(0.0625)
    assert info["gate_passed_below"] == 1.0 and info["gate_failed_below"] == 1.0
    loss.backward()
    # each token: pg -A/4 plus guide 0.1 * (-s |A| w) / 4 with w = 1 (row0), slope (row1)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.275, -0.275], [0.2625, 0.2625]]))
    _, _, info = _calib(gap="mean-token")  # means: Delta = -1.25 + 1 = -0.25 -> L = 0.25, -0.125
    assert info["guide_loss"] == pytest.approx((0.25 - 0.125) / 4)


def test_calibrl_sequence_gap_uses_expert_mask_and_wider_expert():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    e = torch.tensor([[-1.0, -1.0, -1.0, 5.0]])  # last expert position is junk, masked out
    em = torch.tensor([[1, 1, 1, 0]])
    _, info = calibrl_loss(logp, logp.detach(), e, torch.tensor([1.0]), torch.ones(1, 2), torch.tensor([True]),
                           gap="sequence", expert_mask=em)
    # Delta = -2 - (-3) = 1 -> passed x = -1 -> L = -0.5 -> spread / 2 tokens, token-mean -> -0.25
    assert info["guide_loss"] == pytest.approx(-0.25)


def test_calibrl_expert_baseline_zero_past_end():
    # expert shorter than the response: e_t = 0 past its end (official code)
    logp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    e = torch.tensor([[-2.0]])
    _, info = calibrl_loss(logp, logp.detach(), e, torch.tensor([1.0]), torch.ones(1, 3), torch.tensor([1]))
    # passed: x = e - logp = [-1, 1, 1] -> [-0.5, 1, 1] -> mean 0.5
    assert info["guide_loss"] == pytest.approx(0.5)
    assert info["gate_passed_below"] == pytest.approx(2 / 3)
    em = torch.tensor([[False]])  # masked expert position -> 0 too, even if it holds junk
    e = torch.tensor([[float("nan")]])
    _, info = calibrl_loss(logp, logp.detach(), e, torch.tensor([1.0]), torch.ones(1, 3), torch.tensor([1]),
                           expert_mask=em)
    assert info["guide_loss"] == pytest.approx(1.0)


def test_calibrl_expert_side_has_no_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    e = torch.tensor([[-1.5, -1.5]], requires_grad=True)
    loss, _ = calibrl_loss(logp, logp.detach(), e, torch.tensor([1.0]), torch.ones(1, 2), torch.tensor([1]))
    loss.backward()
    assert e.grad is None


@pytest.mark.parametrize("passed, logp, weight", [
    (1, -2.0, 1.0),   # passed & logp < e: weight 1, pushes logp up
    (1, -0.5, 0.5),   # passed & logp >= e: slope
    (0, -0.5, 1.0),   # failed & logp > e: weight 1, pushes logp down
    (0, -2.0, 0.5),   # failed & logp <= e: slope
    (1, -1.0, 0.5),   # tie goes to the slope side (torch leaky_relu's gradient at 0)
])
def test_gate_branch_gradient_direction(passed, logp, weight):
    adv = torch.tensor([0.8 if passed else -0.8])
    x = torch.tensor([[logp]], requires_grad=True)
    old = x.detach().clone()
    e = torch.tensor([[-1.0]])
    total, _ = calibrl_loss(x, old, e, adv, torch.ones(1, 1), torch.tensor([passed]), guide_coef=1.0)
    g_total, = torch.autograd.grad(total, x)
    pg, _ = policy_loss(x, old, adv, torch.ones(1, 1))
    g_pg, = torch.autograd.grad(pg, x)
    s = 1.0 if passed else -1.0
    g_guide = float(g_total - g_pg)
    assert g_guide == pytest.approx(-s * 0.8 * weight)  # descent raises logp for passed rows, lowers it for failed


def test_uniform_group_gives_exactly_zero_guidance():
    logp = torch.tensor([[-0.3, -0.2, -float("inf")], [-3.0, -0.1, -0.4]], requires_grad=True)
    old = logp.detach().clone()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    e = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    loss, info = calibrl_loss(logp, old, e, torch.zeros(2), mask, torch.tensor([1, 1]))
    assert info["guide_loss"] == 0.0 and info["pg_loss"] == 0.0 and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_luffy_hand_values_and_gradient():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    e = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss, info = luffy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 1), e, torch.tensor([1.0]),
                            torch.ones(1, 1))
    f = 0.5 / 0.6
    assert float(loss.detach()) == pytest.approx((-1.0 - f) / 2)
    assert info["pg_loss"] == pytest.approx(-1.0) and info["expert_loss"] == pytest.approx(-f)
    loss.backward()
    # d/dlogp of -A p/(p+g) = -A g p / (p+g)^2, halved by the token-mean over 2 tokens
    assert float(e.grad) == pytest.approx(-0.1 * 0.5 / 0.36 / 2)


def test_luffy_union_aggregation_with_wider_expert_and_no_expert():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    e = torch.full((1, 3), math.log(0.5))
    loss, _ = luffy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), e, torch.tensor([2.0]),
                         torch.tensor([[1, 1, 0]]), agg="seq-mean-token-sum")
    assert float(loss.detach()) == pytest.approx((-2.0 - 2 * 2 * 0.5 / 0.6) / 2)
    loss, info = luffy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), e[:0],
                            torch.zeros(0), torch.ones(0, 3))
    assert float(loss.detach()) == pytest.approx(-1.0) and info["expert_loss"] is None


def test_rlplus_hand_values():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    e = torch.tensor([[math.log(0.5)]], requires_grad=True)
    e_old = torch.tensor([[math.log(0.4)]])
    loss, info = rlplus_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 1), e, e_old,
                             torch.tensor([1.0]), torch.ones(1, 1))
    ratio = 0.5 / (0.75 * 0.4 + 0.25)
    off = -(1 - 0.5) ** 0.5 * ratio
    assert float(loss.detach()) == pytest.approx((-1.0 + off) / 2)
    assert info["expert_loss"] == pytest.approx(off) and info["expert_ratio_mean"] == pytest.approx(ratio)
    loss.backward()  # the exploration factor is detached: d/dlogp (-A' r) = -A' r
    assert float(e.grad) == pytest.approx(off / 2)


# ------------------------------------------------------------------------------------------------ bad-input classes
def test_aggregate_sums_half_precision_in_float32():
    mat = torch.full((2, 2), 60000.0, dtype=torch.float16)          # the fp16 sum 240000 overflows 65504
    out = aggregate(mat, torch.ones(2, 2), "token-mean")
    assert out.dtype == torch.float32 and float(out) == 60000.0


def test_positive_log_probs_are_rejected_beyond_a_tolerance():
    logp, old, adv, mask = _rows([0.0], [1.0])
    with pytest.raises(ValueError, match=r"^logp: expected log-probabilities <= 0"):
        policy_loss(torch.full((1, 1), 0.5), old, adv, mask)
    policy_loss(torch.full((1, 1), 1e-6), old, adv, mask)          # rounding noise is accepted
    with pytest.raises(ValueError, match=r"^expert_logp_theta:"):  # LUFFY returned NaN for p > 1 before
        luffy_loss(logp, old, adv, mask, torch.full((1, 2), 0.7), torch.tensor([1.0]), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"^expert_old_logp:"):
        rlplus_loss(logp, old, adv, mask, torch.full((1, 2), -0.7), torch.full((1, 2), 2.0), torch.tensor([1.0]),
                    torch.ones(1, 2))
    torch.testing.assert_close(                                     # positive junk where masked out is ignored
        policy_loss(logp, old, adv, mask)[0], policy_loss(logp, torch.where(mask, old, 9.0), adv, mask)[0])


def test_no_gradient_reaches_constants():
    g = torch.Generator().manual_seed(0)
    lp = lambda *s: (-torch.rand(*s, generator=g) - 0.1)
    logp = lp(2, 3).requires_grad_()
    const = {k: v.requires_grad_() for k, v in dict(old=lp(2, 3), adv=torch.randn(2, generator=g), ref=lp(2, 3),
                                                    e=lp(2, 3), e_old=lp(1, 3), e_adv=torch.randn(1, generator=g)).items()}
    mask, passed, e_lp = torch.ones(2, 3), torch.tensor([1, 0]), lp(1, 3).requires_grad_()
    c = const
    total = (policy_loss(logp, c["old"], c["adv"], mask, ref_logp=c["ref"], kl_coef=0.1)[0]
             + calibrl_loss(logp, c["old"], c["e"], c["adv"], mask, passed)[0]
             + calibrl_loss(logp, c["old"], c["e"], c["adv"], mask, passed, gap="sequence")[0]
             + luffy_loss(logp, c["old"], c["adv"], mask, e_lp, c["e_adv"], torch.ones(1, 3))[0]
             + rlplus_loss(logp, c["old"], c["adv"], mask, e_lp, c["e_old"], c["e_adv"], torch.ones(1, 3))[0])
    total.backward()
    assert logp.grad is not None and e_lp.grad is not None
    assert {k: v.grad for k, v in const.items()} == {k: None for k in const}   # adv, ref_logp, expert_* : none


def test_mixed_devices_and_dtypes_name_the_argument():
    logp, old, adv, mask = _rows([0.0, 0.1], [1.0, -1.0])
    with pytest.raises(ValueError, match=r"^old_logp: expected device cpu like logp, got meta"):
        policy_loss(logp, old.to("meta"), adv, mask)
    with pytest.raises(ValueError, match=r"^mask: expected device cpu"):
        policy_loss(logp, old, adv, mask.to("meta"))
    with pytest.raises(ValueError, match=r"^adv: expected dtype torch.float32 like logp, got torch.float64"):
        policy_loss(logp, old, adv.double(), mask)
    with pytest.raises(ValueError, match=r"^expert_logp: expected dtype torch.float32"):
        calibrl_loss(logp, old, old.double(), adv, mask, torch.tensor([1, 0]))


def test_unchecked_kernels_equal_the_public_functions():
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(3, 4, generator=g) - 0.1, -torch.rand(3, 4, generator=g) - 0.1
    adv, mask, passed = torch.randn(3, generator=g), torch.rand(3, 4, generator=g) > 0.3, torch.tensor([1, 0, 1])
    mask[0, 0] = True
    e_lp, e_old, e_adv, em = -torch.rand(2, 5, generator=g), -torch.rand(2, 5, generator=g), torch.randn(2), \
        torch.ones(2, 5, dtype=torch.bool)
    pairs = [
        (lambda f: f(logp, old, adv, mask, agg="seq-mean-token-mean"), losses.policy_loss, losses.policy_loss_kernel),
        (lambda f: f(logp, old, old, adv, mask, passed, gap="mean-token"), losses.calibrl_loss,
         losses.calibrl_loss_kernel),
        (lambda f: f(logp, old, adv, mask, e_lp, e_adv, em), losses.luffy_loss, losses.luffy_loss_kernel),
        (lambda f: f(logp, old, adv, mask, e_lp, e_old, e_adv, em), losses.rlplus_loss, losses.rlplus_loss_kernel),
    ]
    for call, public, kernel in pairs:
        kw_passed = call(public)
        if kernel is losses.calibrl_loss_kernel:
            got = kernel(logp, old, old, adv, mask, passed.bool(), gap="mean-token")
        else:
            got = call(kernel)
        assert float(got[0]) == float(kw_passed[0]) and got[1] == kw_passed[1]
    assert float(losses.aggregate_kernel(logp, mask, "token-mean")) == float(aggregate(logp, mask, "token-mean"))


def test_loss_modules_import_one_way():
    """losses -> losses_hybrid -> _kernels/_validate, never back (the old circle ran through private helpers)."""
    import ast
    from pathlib import Path

    import calibrl

    root = Path(calibrl.__file__).parent
    mods = ["losses", "losses_hybrid", "_kernels", "_validate", "probes", "probes_entropy", "advantage"]
    graph = {}
    for m in mods:
        tree = ast.parse((root / f"{m}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("calibrl"):
                names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
                deps.update(n for n in names if n in mods)
        graph[m] = deps - {m}

    def reach(a, seen=()):
        return {b for d in graph[a] if d not in seen for b in {d} | reach(d, seen + (a,))}
    assert all(m not in reach(m) for m in mods), graph
    assert "losses" not in graph["losses_hybrid"]
