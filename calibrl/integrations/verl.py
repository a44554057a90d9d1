"""CalibRL as a verl 0.9.x plugin: a registered policy loss and advantage estimator, plus the batch glue.

Importing this module does not import verl; `register()` does (call it in every Ray worker, e.g. through
VERL_USE_EXTERNAL_MODULES=calibrl.integrations.verl, whose import calls register() when verl is importable).

How the expert travels through verl's batch (the official code appends the rows in its rollout):
1. Expert rows. For each prompt, append one row whose response is the tokenized expert solution (dataset column
   `solution`, the official convention) and whose uid is `<uid>` + EXPERT_SUFFIX. verl then scores it and
   computes its old log-probs with the actor, in the same pass as the on-policy rows (same model state).
2. Advantage (`algorithm.adv_estimator=calibrl`): A = r - mean over the group's on-policy rows (the expert row,
   recognised by its uid suffix, is left out of the statistics but gets r - mean too, as the official code);
   divided by the Bessel std + 1e-6 only if `algorithm.norm_adv_by_std_in_grpo=True` (the recipe sets False).
3. After compute_log_prob, before update_actor: `attach_expert(...)` copies each group's expert old log-probs
   onto its on-policy rows (by token index, 0 past the expert's end), sets passed = score > 0.1, and zeroes the
   expert rows' response_mask (their own loss is dropped, as the official code). Put the two new tensors into
   the batch as `calibrl_expert_logp` [N,T] and `calibrl_passed` [N].
4. Loss (`actor_rollout_ref.actor.policy_loss.loss_mode=calibrl`): verl's registered-loss call passes only
   old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, so install
   `calibrl_ppo_loss` as the actor's loss (`actor_rollout_wg.set_loss_fn(partial(calibrl_ppo_loss, config=...))`):
   it hands the two batch fields to the registered loss and otherwise is verl's own ppo_loss (entropy, KL,
   metric aggregation unchanged).
Deviations from verl's vanilla loss: the aggregation is calibrl's per-micro-batch `loss_agg_mode` (the official
CalibRL fork's), not verl 0.9's global-token normalisation over dp ranks; rollout importance weights are refused.
Not run here (CPU only): Ray, FSDP on GPUs, vLLM rollout, steps 1 and 3 inside a live RayPPOTrainer. The tensor
functions are tested against calibrl and against verl's own functions in benchmarks/verl_plugin.sh.
"""
from __future__ import annotations

import contextvars
from typing import Any, Optional

import numpy as np
import torch

from calibrl.advantage import group_advantages, pass_mask
from calibrl.losses import calibrl_loss

NAME = "calibrl"
EXPERT_SUFFIX = "::calibrl-expert"
SETTINGS = {"slope": 0.5, "guide_coef": 0.1, "weight": "abs-adv", "gap": "token", "pass_threshold": 0.1}
_BATCH = contextvars.ContextVar("calibrl_verl_batch", default=None)


def split_uids(index: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(group ids [N] long, is_expert [N] bool) from verl's uid array; expert rows end with EXPERT_SUFFIX."""
    uids = [str(u) for u in np.asarray(index, dtype=object).reshape(-1)]
    if not uids:
        raise ValueError("index: expected one uid per row, got none")
    is_exp = [u.endswith(EXPERT_SUFFIX) for u in uids]
    base = [u[: -len(EXPERT_SUFFIX)] if e else u for u, e in zip(uids, is_exp)]
    ids = {u: i for i, u in enumerate(dict.fromkeys(base))}
    return torch.tensor([ids[u] for u in base]), torch.tensor(is_exp)


def compute_calibrl_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any = None,
                              config: Any = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator: (advantages, returns) [N,T], A_i = score_i - mean of the group's on-policy scores
    (score = sum of token_level_rewards), broadcast over the response mask; std scaling per the config."""
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"token_level_rewards/response_mask: expected equal [N,T] shapes, got "
                         f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}")
    if index is None:
        raise ValueError("index: expected verl's uid array (non_tensor_batch['uid']), got None")
    gids, is_exp = split_uids(index)
    if len(gids) != token_level_rewards.shape[0]:
        raise ValueError(f"index: expected {token_level_rewards.shape[0]} uids, got {len(gids)}")
    by_std = bool(_get(config, "norm_adv_by_std_in_grpo", False))
    scores = token_level_rewards.sum(-1)
    adv = group_advantages(scores, gids.to(scores.device), scale="group" if by_std else "none", eps=1e-6,
                           on_policy=~is_exp.to(scores.device))
    adv = adv[:, None] * response_mask.to(adv.dtype)
    return adv, adv


def attach_expert(old_log_probs: torch.Tensor, response_mask: torch.Tensor, scores: torch.Tensor, index: Any, *,
                  pass_threshold: Optional[float] = None) -> dict:
    """The batch fields the calibrl loss needs, from a batch with one expert row per group (uid suffix).

    Returns calibrl_expert_logp [N,T] (row i: old log-probs of its group's expert row, 0 past the expert's end and
    0 for groups without an expert, the official zero baseline), calibrl_passed [N] (score > pass_threshold) and
    response_mask [N,T] with the expert rows zeroed (they carry no loss of their own)."""
    if old_log_probs.dim() != 2 or response_mask.shape != old_log_probs.shape:
        raise ValueError(f"old_log_probs/response_mask: expected equal [N,T] shapes, got "
                         f"{tuple(old_log_probs.shape)} and {tuple(response_mask.shape)}")
    gids, is_exp = split_uids(index)
    n = old_log_probs.shape[0]
    if len(gids) != n or scores.shape != (n,):
        raise ValueError(f"index/scores: expected {n} uids and scores of shape ({n},), got {len(gids)} and "
                         f"{tuple(scores.shape)}")
    m = response_mask.bool()
    e_rows = torch.full((int(gids.max()) + 1,), -1, dtype=torch.long)
    for r in is_exp.nonzero().squeeze(-1).tolist():
        if e_rows[gids[r]] >= 0:
            raise ValueError(f"index: group of row {r} has more than one expert row")
        e_rows[gids[r]] = r
    src = e_rows[gids].to(old_log_probs.device)                            # [N] expert row of each row's group
    has = (src >= 0)[:, None]
    e = torch.where(m, old_log_probs.detach(), 0.0)[src.clamp(min=0)]     # [N,T] aligned by token index
    th = SETTINGS["pass_threshold"] if pass_threshold is None else pass_threshold
    return {"calibrl_expert_logp": torch.where(has, e, 0.0),
            "calibrl_passed": pass_mask(scores, threshold=th) & ~is_exp.to(scores.device),
            "response_mask": response_mask * (~is_exp.to(response_mask.device))[:, None].to(response_mask.dtype)}


def compute_calibrl_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Optional[torch.Tensor] = None, *,
                                expert_log_prob: Optional[torch.Tensor] = None,
                                passed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """verl policy loss "calibrl": calibrl.losses.calibrl_loss with verl's clip settings (clip_ratio_low/high,
    clip_ratio_c) and SETTINGS (slope, guide_coef, weight, gap). The expert log-probs and pass mask come as
    keywords or from calibrl_ppo_loss. advantages [N,T] (A_i on response tokens)."""
    if rollout_is_weights is not None:
        raise ValueError("rollout_is_weights: rollout importance weights are not supported by the calibrl loss")
    if expert_log_prob is None or passed is None:
        extra = _BATCH.get()
        if extra is None:
            raise ValueError("expert_log_prob/passed: not given; install calibrl_ppo_loss as the actor loss and put "
                             "calibrl_expert_logp / calibrl_passed in the batch (see calibrl.integrations.verl)")
        expert_log_prob, passed = extra
    low = _get(config, "clip_ratio_low", None)
    low = _get(config, "clip_ratio", 0.2) if low is None else low
    high = _get(config, "clip_ratio_high", None)
    high = _get(config, "clip_ratio", 0.2) if high is None else high
    s = SETTINGS
    loss, info = calibrl_loss(log_prob, old_log_prob, expert_log_prob, advantages, response_mask, passed.bool(),
                              slope=s["slope"], guide_coef=s["guide_coef"], weight=s["weight"], gap=s["gap"],
                              clip_low=low, clip_high=high, clip_c=_get(config, "clip_ratio_c", 3.0),
                              agg=loss_agg_mode)
    metrics = {"actor/pg_clipfrac": info["clipfrac"], "actor/ppo_kl": info["approx_kl"],
               "actor/pg_clipfrac_lower": info["dualclip_frac"], "actor/guided_loss": info["guide_loss"],
               "actor/calibrl_pg_loss": info["pg_loss"]}
    metrics.update({f"calibrl/{k}": v for k, v in info.items() if k.startswith("gate_") and v is not None})
    return loss, metrics


def calibrl_ppo_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None):
    """Actor loss for `set_loss_fn`: verl's ppo_loss, with the batch's calibrl_expert_logp / calibrl_passed handed
    to the registered "calibrl" policy loss (set policy_loss.loss_mode=calibrl)."""
    from verl.workers.utils.losses import ppo_loss

    extra = data.select("calibrl_expert_logp", "calibrl_passed").to_padded_tensor()
    token = _BATCH.set((extra["calibrl_expert_logp"], extra["calibrl_passed"]))
    try:
        return ppo_loss(config, model_output, data, dp_group)
    finally:
        _BATCH.reset(token)


def register(**settings: Any) -> None:
    """Register "calibrl" with verl's register_policy_loss and register_adv_est (idempotent); `settings` update
    SETTINGS (slope, guide_coef, weight, gap, pass_threshold)."""
    bad = set(settings) - set(SETTINGS)
    if bad:
        raise ValueError(f"settings: unknown keys {sorted(bad)}; expected some of {sorted(SETTINGS)}")
    SETTINGS.update(settings)
    from verl.trainer.ppo import core_algos

    core_algos.register_policy_loss(NAME)(compute_calibrl_policy_loss)
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME) is not compute_calibrl_advantage:
        core_algos.register_adv_est(NAME)(compute_calibrl_advantage)


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


try:  # VERL_USE_EXTERNAL_MODULES=calibrl.integrations.verl registers on import inside verl's workers
    import verl.trainer.ppo.core_algos as _core  # noqa: F401
except Exception:  # verl not installed: the module stays importable, register() raises on use
    pass
else:
    register()
