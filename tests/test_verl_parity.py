"""Parity with verl 0.9.1 on identical tensors: policy loss (incl. dual clip and clip-higher), agg_loss in the four
modes, and the GRPO outcome advantage. verl needs its own venv: run `bash benchmarks/verl_parity.sh`.
Skips cleanly where verl is not importable (the main venv)."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("VERL_USE_EXTERNAL_PLUGINS", "none")
try:
    from verl.trainer.ppo import core_algos as verl_algos
except Exception as exc:  # ImportError, or a broken verl install
    pytest.skip(f"verl not importable ({type(exc).__name__}: {exc})", allow_module_level=True)

from calibrl.advantage import group_advantages  # noqa: E402
from calibrl.losses import AGG_MODES, aggregate, policy_loss  # noqa: E402


def _batch(seed, B=6, T=9, spread=1.2):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * spread  # ratios well past 3 and below 1/3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(torch.float64)
    return logp, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_matches_verl(seed, mode):
    mat, _, _, mask = _batch(seed)
    mask[2] = 0  # a fully masked row: both leave it out of the row means
    ours = aggregate(mat, mask, mode)
    theirs = verl_algos.agg_loss(mat, mask, mode)
    if mode == "seq-mean-token-sum-norm":
        # DESIGN/official CalibRL fork: sum / T; verl 0.9.1 divides by the non-empty row count as well
        theirs = theirs * (mask.sum(-1) > 0).sum()
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-7, atol=1e-10)
    if mode == "seq-mean-token-sum-norm":
        n = (mask.sum(-1) > 0).sum()
        torch.testing.assert_close(aggregate(mat, mask, mode, norm_len=64),
                                   verl_algos.agg_loss(mat, mask, mode, loss_scale_factor=64) * n)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip_low, clip_high, clip_c", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, 10.0)])
def test_policy_loss_matches_verl(seed, mode, clip_low, clip_high, clip_c):
    logp, old, adv, mask = _batch(seed)
    lp_ours = logp.clone().requires_grad_()
    lp_verl = logp.clone().requires_grad_()
    ours, info = policy_loss(lp_ours, old, adv, mask, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, agg=mode)
    theirs, clipfrac, ppo_kl, clipfrac_lower = verl_algos.compute_policy_loss(
        old, lp_verl, adv[:, None] * mask, mask, cliprange=clip_low, cliprange_low=clip_low,
        cliprange_high=clip_high, clip_ratio_c=clip_c, loss_agg_mode=mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
    assert info["clipfrac"] == pytest.approx(float(clipfrac.detach()), abs=1e-7)
    assert info["approx_kl"] == pytest.approx(float(ppo_kl.detach()), abs=1e-7)
    assert info["dualclip_frac"] == pytest.approx(float(clipfrac_lower.detach()), abs=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(lp_ours.grad, lp_verl.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dual_clip_actually_fires_in_these_batches(seed):
    logp, old, adv, mask = _batch(seed)
    _, info = policy_loss(logp, old, adv, mask)
    assert info["dualclip_frac"] > 0 and info["clipfrac"] > 0


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_grpo_advantage_matches_verl(norm, eps):
    g = torch.Generator().manual_seed(5)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 0.7, 1.1, 0.1, 0.1, 1.0, 0.0, 1.1])
    uid = np.array(["a", "a", "a", "a", "b", "b", "b", "b", "c", "d", "d", "d", "e", "e", "e"], dtype=object)
    T = 6
    lens = torch.randint(1, T + 1, (len(rewards),), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).float()
    token_rewards = torch.zeros(len(rewards), T)
    token_rewards[torch.arange(len(rewards)), lens - 1] = rewards  # outcome reward on the last token
    theirs, _ = verl_algos.compute_grpo_outcome_advantage(token_rewards, mask, uid, epsilon=eps,
                                                          norm_adv_by_std_in_grpo=norm)
    ids = torch.tensor([ord(u) for u in uid])
    ours = group_advantages(rewards, ids, scale="group" if norm else "none", eps=eps)
    torch.testing.assert_close(ours[:, None] * mask, theirs, rtol=1e-6, atol=1e-6)


class _ActorConfigStub(dict):
    """The attributes verl's registered "vanilla" loss reads from its ActorConfig."""
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_registered_vanilla_loss_matches(seed, mode):
    """verl 0.9.1's registry entry get_policy_loss_fn("vanilla") (the non-deprecated path) on identical tensors."""
    logp, old, adv, mask = _batch(seed)
    cfg = _ActorConfigStub(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                           global_batch_info={})
    lp_ours, lp_verl = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, info = policy_loss(lp_ours, old, adv, mask, clip_high=0.28, agg=mode)
    theirs, metrics = verl_algos.get_policy_loss_fn("vanilla")(old, lp_verl, adv[:, None] * mask, mask, mode, cfg)
    if mode == "seq-mean-token-sum-norm":
        theirs = theirs * (mask.sum(-1) > 0).sum()  # verl 0.9.1 also divides by the row count (see above)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
    assert info["dualclip_frac"] == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(lp_ours.grad, lp_verl.grad, rtol=1e-7, atol=1e-10)
