"""Every public loss/advantage function rejects malformed input with a ValueError that names the argument."""
import math

import pytest
import torch

from calibrl.advantage import group_advantages, group_stats, pass_mask
from calibrl.losses import aggregate, calibrl_loss, luffy_loss, policy_loss, rlplus_loss

B, T = 3, 4


def ok():
    """A valid set of inputs for every function."""
    return dict(logp=-torch.rand(B, T), old_logp=-torch.rand(B, T), adv=torch.tensor([1.0, -1.0, 0.0]),
                mask=torch.ones(B, T, dtype=torch.bool), expert_logp=-torch.rand(B, T),
                passed=torch.tensor([True, False, True]), e_lp=-torch.rand(2, 5), e_old=-torch.rand(2, 5),
                e_adv=torch.tensor([1.0, 0.5]), e_mask=torch.ones(2, 5))


def call_policy(d, **kw):
    return policy_loss(d["logp"], d["old_logp"], d["adv"], d["mask"], **kw)


def call_calibrl(d, **kw):
    return calibrl_loss(d["logp"], d["old_logp"], d["expert_logp"], d["adv"], d["mask"], d["passed"], **kw)


def call_luffy(d, **kw):
    return luffy_loss(d["logp"], d["old_logp"], d["adv"], d["mask"], d["e_lp"], d["e_adv"], d["e_mask"], **kw)


def call_rlplus(d, **kw):
    return rlplus_loss(d["logp"], d["old_logp"], d["adv"], d["mask"], d["e_lp"], d["e_old"], d["e_adv"],
                       d["e_mask"], **kw)


def nan_at(x, i=0, j=0):
    x = x.clone()
    x[i, j] = float("nan")
    return x


# (id, function, changes to the inputs, kwargs, argument named in the message)
CASES = [
    ("logp-1d", call_policy, {"logp": -torch.rand(T)}, {}, "logp"),
    ("logp-list", call_policy, {"logp": [[0.0] * T] * B}, {}, "logp"),
    ("logp-int", call_policy, {"logp": torch.zeros(B, T, dtype=torch.long)}, {}, "logp"),
    ("logp-nan", call_policy, {"logp": nan_at(-torch.rand(B, T))}, {}, "logp"),
    ("logp-inf-unmasked", call_policy, {"logp": torch.full((B, T), -math.inf)}, {}, "logp"),
    ("old-shape", call_policy, {"old_logp": -torch.rand(B, T + 1)}, {}, "old_logp"),
    ("old-nan", call_policy, {"old_logp": nan_at(-torch.rand(B, T), 2, 3)}, {}, "old_logp"),
    ("adv-shape", call_policy, {"adv": torch.ones(B + 1)}, {}, "adv"),
    ("adv-2d-shape", call_policy, {"adv": torch.ones(B, T - 1)}, {}, "adv"),
    ("adv-inf", call_policy, {"adv": torch.tensor([1.0, math.inf, 0.0])}, {}, "adv"),
    ("adv-int", call_policy, {"adv": torch.tensor([1, 0, 0])}, {}, "adv"),
    ("mask-shape", call_policy, {"mask": torch.ones(B, T - 1)}, {}, "mask"),
    ("mask-nonbinary", call_policy, {"mask": torch.full((B, T), 0.5)}, {}, "mask"),
    ("mask-all-masked", call_policy, {"mask": torch.zeros(B, T)}, {}, "mask"),
    ("clip-low-neg", call_policy, {}, {"clip_low": -0.1}, "clip_low"),
    ("clip-low-one", call_policy, {}, {"clip_low": 1.0}, "clip_low"),
    ("clip-high-nan", call_policy, {}, {"clip_high": float("nan")}, "clip_high"),
    ("clip-c-le-1", call_policy, {}, {"clip_c": 1.0}, "clip_c"),
    ("agg-unknown", call_policy, {}, {"agg": "token_mean"}, "agg"),
    ("norm-len-zero", call_policy, {}, {"norm_len": 0}, "norm_len"),
    ("kl-coef-neg", call_policy, {}, {"kl_coef": -0.1}, "kl_coef"),
    ("kl-without-ref", call_policy, {}, {"kl_coef": 0.1}, "ref_logp"),
    ("ref-shape", call_policy, {}, {"kl_coef": 0.1, "ref_logp": torch.zeros(B, 2)}, "ref_logp"),
    ("entropy-without", call_policy, {}, {"entropy_coef": 0.01}, "entropy"),
    ("slope-above-1", call_calibrl, {}, {"slope": 1.5}, "slope"),
    ("slope-neg", call_calibrl, {}, {"slope": -0.1}, "slope"),
    ("guide-coef-neg", call_calibrl, {}, {"guide_coef": -1.0}, "guide_coef"),
    ("guide-coef-inf", call_calibrl, {}, {"guide_coef": math.inf}, "guide_coef"),
    ("weight-unknown", call_calibrl, {}, {"weight": "adv"}, "weight"),
    ("gap-unknown", call_calibrl, {}, {"gap": "seq"}, "gap"),
    ("expert-rows", call_calibrl, {"expert_logp": -torch.rand(B + 1, T)}, {}, "expert_logp"),
    ("expert-nan", call_calibrl, {"expert_logp": nan_at(-torch.rand(B, T))}, {}, "expert_logp"),
    ("expert-mask-shape", call_calibrl, {}, {"expert_mask": torch.ones(B, T + 2)}, "expert_mask"),
    ("expert-mask-nonbinary", call_calibrl, {}, {"expert_mask": torch.full((B, T), 2)}, "expert_mask"),
    ("passed-shape", call_calibrl, {"passed": torch.tensor([True, False])}, {}, "passed"),
    ("passed-nonbinary", call_calibrl, {"passed": torch.tensor([1.0, 0.5, 0.0])}, {}, "passed"),
    ("luffy-gamma-zero", call_luffy, {}, {"gamma": 0.0}, "gamma"),
    ("luffy-e-mask-shape", call_luffy, {"e_mask": torch.ones(2, 4)}, {}, "expert_mask"),
    ("luffy-e-adv-shape", call_luffy, {"e_adv": torch.ones(3)}, {}, "expert_adv"),
    ("luffy-e-lp-nan", call_luffy, {"e_lp": nan_at(-torch.rand(2, 5))}, {}, "expert_logp_theta"),
    ("rlplus-e-old-shape", call_rlplus, {"e_old": -torch.rand(2, 4)}, {}, "expert_old_logp"),
    ("rlplus-gamma-neg", call_rlplus, {}, {"gamma": -0.5}, "gamma"),
]


@pytest.mark.parametrize("fn, changes, kwargs, arg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_loss_inputs_raise_naming_the_argument(fn, changes, kwargs, arg):
    d = ok()
    d.update(changes)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        fn(d, **kwargs)


def test_valid_inputs_pass():
    d = ok()
    for fn in (call_policy, call_calibrl, call_luffy, call_rlplus):
        loss, _ = fn(d)
        assert torch.isfinite(loss)


R, G = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1])
ADV_CASES = [
    ("rewards-2d", lambda: group_advantages(R[None], G), "rewards"),
    ("rewards-nan", lambda: group_advantages(torch.tensor([1.0, math.nan, 0.0]), G), "rewards"),
    ("rewards-bool", lambda: group_advantages(R.bool(), G), "rewards"),
    ("rewards-empty", lambda: group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)), "rewards"),
    ("group-ids-mismatch", lambda: group_advantages(R, torch.tensor([0, 1])), "group_ids"),
    ("group-ids-float", lambda: group_advantages(R, G.float()), "group_ids"),
    ("scale-unknown", lambda: group_advantages(R, G, scale="batch"), "scale"),
    ("eps-neg", lambda: group_advantages(R, G, eps=-1e-6), "eps"),
    ("on-policy-all-false", lambda: group_advantages(R, G, on_policy=torch.zeros(3, dtype=torch.bool)), "on_policy"),
    ("pass-threshold-nan", lambda: pass_mask(R, threshold=math.nan), "threshold"),
    ("pass-rewards-inf", lambda: pass_mask(torch.tensor([math.inf])), "rewards"),
    ("stats-passed-shape", lambda: group_stats(R, G, torch.tensor([True, False])), "passed"),
    ("stats-passed-nonbinary", lambda: group_stats(R, G, torch.tensor([2, 0, 1])), "passed"),
    ("stats-group-ids-mismatch", lambda: group_stats(R, G[:2], R > 0.1), "group_ids"),
    ("agg-mode-unknown", lambda: aggregate(torch.ones(2, 2), torch.ones(2, 2), "mean"), "mode"),
    ("agg-mask-all-masked", lambda: aggregate(torch.ones(2, 2), torch.zeros(2, 2), "token-mean"), "mask"),
    ("agg-loss-nan", lambda: aggregate(torch.full((2, 2), math.nan), torch.ones(2, 2), "token-mean"), "loss_mat"),
    ("agg-loss-int", lambda: aggregate(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2), "token-mean"),
     "loss_mat"),
    ("agg-norm-len-float", lambda: aggregate(torch.ones(2, 2), torch.ones(2, 2), "token-mean", norm_len=2.5),
     "norm_len"),
]


@pytest.mark.parametrize("fn, arg", [c[1:] for c in ADV_CASES], ids=[c[0] for c in ADV_CASES])
def test_bad_advantage_and_aggregate_inputs_raise(fn, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        fn()


def test_message_says_what_was_expected():
    d = ok()
    d["mask"] = torch.ones(B, T - 1)
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 4\) like logp, got \(3, 3\)"):
        call_policy(d)
