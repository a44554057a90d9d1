"""Group advantages, pass masks and per-group statistics (pure tensor code).

CalibRL's official code (like its GRPO baseline) uses A_i = r_i - mean(on-policy rewards of the group), without
dividing by the std (`norm_adv_by_std_in_grpo=False`); the expert row's reward never enters the group statistics.
"""
from __future__ import annotations

import torch

from calibrl import _validate as V

SCALES = ("none", "group")


def _check_rewards(rewards, group_ids) -> tuple[torch.Tensor, torch.Tensor]:
    V.tensor(rewards, "rewards", ndim=1)
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise ValueError(f"rewards: expected a real (float or int) tensor, got dtype {rewards.dtype}")
    if rewards.numel() == 0:
        raise ValueError("rewards: expected at least one row, got an empty tensor")
    V.tensor(group_ids, "group_ids", shape=rewards.shape, like="rewards")
    V.integer(group_ids, "group_ids")
    V.same_device("group_ids", group_ids, rewards, "rewards")
    V.finite(rewards, "rewards")
    return rewards, group_ids


def _group_moments(r: torch.Tensor, inv: torch.Tensor, n_groups: int, sel: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group count, mean and Bessel std over the rows in `sel` (float64). Singleton: mean 0, std 1 (verl).
    A group whose selected rewards are all equal gets that value as its mean exactly (std exactly 0), so its
    advantages are exactly 0 whatever the rounding of the sum."""
    w = sel.to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, w)
    total = torch.zeros_like(count).index_add_(0, inv, r * w)
    mean = total / count.clamp(min=1)
    big = torch.finfo(torch.float64).max
    hi = torch.full_like(count, -big).scatter_reduce(0, inv, torch.where(sel, r, -big), reduce="amax")
    lo = torch.full_like(count, big).scatter_reduce(0, inv, torch.where(sel, r, big), reduce="amin")
    mean = torch.where((hi == lo) & (count > 0), hi, mean)
    sq = torch.zeros_like(count).index_add_(0, inv, (r - mean[inv]) ** 2 * w)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    single = count <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return count, mean, std


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "none", eps: float = 1e-6,
                     on_policy: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO outcome advantage per row.

    A_i = r_i - mean_g, and with scale="group" A_i = (r_i - mean_g) / (std_g + eps), where mean_g and the
    Bessel-corrected std_g are taken over the on-policy rows of row i's group (all rows when `on_policy` is None).
    A group with a single on-policy row has mean 0 and std 1 (verl's convention). Rows with on_policy False (e.g.
    expert rows for LUFFY/RL-PLUS) get an advantage against their group's on-policy statistics but do not enter
    them (the official code's behaviour); a group with no on-policy row is treated as a singleton.

    Computed in float64; a group whose on-policy rewards are all equal gets advantages exactly 0 (also with
    scale="group"). Args: rewards [N] (float or int), group_ids [N] (int, same device), scale "none" | "group",
    eps > 0 (verl 1e-6, TRL 1e-4; eps <= 0 is rejected), on_policy [N] bool or None. Returns [N] float64 for
    float64 rewards, else float32 (half precision and integer rewards are upcast).
    """
    _check_rewards(rewards, group_ids)
    V.choice(scale, "scale", SCALES)
    V.number(eps, "eps", lo=0.0, lo_open=True)
    if on_policy is None:
        sel = torch.ones_like(rewards, dtype=torch.bool)
    else:
        V.mask_like(on_policy, "on_policy", rewards, "rewards")
        sel = V.mask_values(on_policy, "on_policy")
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    _, mean, std = _group_moments(r, inv, n_groups, sel)
    adv = r - mean[inv]
    if scale == "group":
        adv = adv / (std[inv] + eps)
    out = adv.to(out_dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"rewards: the advantages overflow {out_dtype} (|A| up to {float(adv.abs().max()):.3g}); "
                         f"expected rewards of a representable scale")
    return out


def pass_mask(rewards: torch.Tensor, *, threshold: float = 0.1) -> torch.Tensor:
    """Passed rows: reward > threshold (official code: r = acc + 0.1 fmt, pass iff r > 0.1), compared in the
    rewards' own precision (a float32 or bf16 reward 0.1 equals the threshold 0.1 and does not pass). Returns
    bool [N]."""
    V.tensor(rewards, "rewards", ndim=1)
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise ValueError(f"rewards: expected a real (float or int) tensor, got dtype {rewards.dtype}")
    V.finite(rewards, "rewards")
    V.number(threshold, "threshold")
    return rewards.detach() > threshold


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, passed: torch.Tensor, *, scale: str = "none",
                eps: float = 1e-6) -> dict:
    """Per-group rarity statistics of on-policy rows.

    Returns a dict: pass_rate (float Tensor[n_groups], groups in sorted group-id order), uniform (bool
    Tensor[n_groups]: all rewards of the group equal, so every advantage and CalibRL's guidance vanish),
    uniform_frac, all_pass_frac, all_fail_frac (python floats, fractions of groups) and abs_adv_mean (mean |A|
    over rows, advantages as group_advantages(rewards, group_ids, scale=scale, eps=eps)). passed [N] bool/{0,1}
    on rewards' device.
    """
    _check_rewards(rewards, group_ids)
    V.mask_like(passed, "passed", rewards, "rewards")
    p = V.binary(passed, "passed")
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    r = rewards.detach().to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    n_pass = torch.zeros_like(count).index_add_(0, inv, p.to(torch.float64))
    pass_rate = (n_pass / count).to(torch.float32)
    big = torch.finfo(torch.float64).max
    hi = torch.full_like(count, -big).scatter_reduce(0, inv, r, reduce="amax")
    lo = torch.full_like(count, big).scatter_reduce(0, inv, r, reduce="amin")
    uniform = hi == lo
    adv = group_advantages(rewards, group_ids, scale=scale, eps=eps)
    return {
        "pass_rate": pass_rate,
        "uniform": uniform,
        "uniform_frac": float(uniform.double().mean()),
        "all_pass_frac": float((pass_rate == 1).double().mean()),
        "all_fail_frac": float((pass_rate == 0).double().mean()),
        "abs_adv_mean": float(adv.abs().double().mean()),
    }
