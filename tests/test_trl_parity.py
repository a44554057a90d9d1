"""Parity with TRL 1.16.0's GRPOTrainer._compute_loss (grpo, bnpo, dapo, dr_grpo) on identical tensors.

TRL's loss is a private method; it is called unbound on a Mock(spec=GRPOTrainer) with the attributes 1.16.0
reads (harness of reference/peers.md (c)). TRL has no dual clip, so clip_c=None here (and ratios stay < 3)."""
from collections import defaultdict
from unittest.mock import Mock

import pytest
import torch

trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":
    pytest.skip(f"the mock harness is written for trl 1.16.0, found {trl.__version__}", allow_module_level=True)
from trl import GRPOTrainer  # noqa: E402

from calibrl.losses import policy_loss  # noqa: E402

# TRL loss_type -> our aggregation
AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
       "dr_grpo": "seq-mean-token-sum-norm"}


def trl_loss(loss_type, logp, old, adv, mask, eps_low=0.2, eps_high=0.2):
    """TRL 1.16.0 GRPOTrainer._compute_loss on the given tensors (single process, one accumulation step)."""
    B, T = logp.shape
    t = Mock(spec=GRPOTrainer)
    t.args = Mock(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    t.loss_type, t.beta, t.epsilon_low, t.epsilon_high = loss_type, 0.0, eps_low, eps_high
    t.importance_sampling_level, t.top_entropy_quantile, t.off_policy_mask_threshold = "token", 1.0, None
    t.use_vllm = t.vllm_importance_sampling_correction = t._entropy_bonus_enabled = t.aux_loss_enabled = False
    t.current_gradient_accumulation_steps, t.max_completion_length, t.model = 1, T, Mock(training=True)
    acc = Mock(num_processes=1, sync_gradients=True)
    acc.gather = acc.gather_for_metrics = lambda x: x
    acc.reduce = lambda x, reduction="sum": x
    t.accelerator = acc
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros(B, T), None)
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, old_per_token_logps=old, num_items_in_batch=mask.sum())
    return GRPOTrainer._compute_loss(t, None, inputs)


def _batch(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.3
    logp = torch.minimum(logp, old + 1.0).clamp(max=0.0)  # ratio < e < 3: the dual clip cannot fire; logp <= 0
    adv = torch.randn(B, generator=g)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    return logp, old, adv, mask


def test_harness_runs_all_four_loss_types():
    logp, old, adv, mask = _batch(0)
    for lt in AGG:  # all four loss types give finite numbers and differ only by the normalizer
        assert torch.isfinite(trl_loss(lt, logp, old, adv, mask))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss_type", list(AGG))
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_policy_loss_matches_trl(seed, loss_type, eps_high):
    logp, old, adv, mask = _batch(seed)
    B, T = logp.shape
    lp_ours, lp_trl = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, _ = policy_loss(lp_ours, old, adv, mask, clip_high=eps_high, clip_c=None, agg=AGG[loss_type])
    if loss_type == "dr_grpo":
        ours = ours / B  # TRL: sum / (B * max_completion_length); ours (official CalibRL / DESIGN): sum / T
    theirs = trl_loss(loss_type, lp_trl, old, adv, mask, eps_high=eps_high)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(lp_ours.grad, lp_trl.grad, rtol=1e-5, atol=1e-7)


def test_dual_clip_is_inactive_below_ratio_three():
    logp, old, adv, mask = _batch(1)
    with_dual, info = policy_loss(logp, old, adv, mask, clip_c=3.0)
    without, _ = policy_loss(logp, old, adv, mask, clip_c=None)
    assert info["dualclip_frac"] == 0.0 and float(with_dual) == float(without)
    assert float(with_dual) == pytest.approx(float(trl_loss("dapo", logp, old, adv, mask)), abs=1e-6)
