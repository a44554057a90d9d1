"""Diagnostics probes: token entropy (chunked, also straight from hidden states + LM head), entropy summaries, group
rarity, CalibRL gate activation, expert-gap quantiles, Cov(logp, A) and the policy/guidance gradient split.

Every probe returns python floats (None where not applicable, never NaN) under the metric names of the contract,
except the per-token entropy functions, which return tensors. Probes never build autograd graphs, except
gradient_split, which differentiates the losses it is given.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from calibrl import _kernels as K
from calibrl import _validate as V
from calibrl.probes_entropy import entropy_from_hidden, token_entropy

__all__ = ["token_entropy", "entropy_from_hidden", "entropy_summary", "group_rarity", "gate_activation",
           "expert_gap", "cov_logp_adv", "gradient_split"]


# ------------------------------------------------------------------------------------------------ entropy
def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> Optional[float]:
    n = int(m.sum())
    return float((torch.where(m, x, 0.0).double()).sum()) / n if n else None


def _row_mask(x, name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """A [B] bool/{0,1} tensor with one entry per row of ref, on ref's device; returned as bool."""
    V.mask_like(x, name, ref, ref_name + " rows", shape=(ref.shape[0],))
    return V.binary(x, name)


def entropy_summary(entropy: torch.Tensor, mask: torch.Tensor, passed: torch.Tensor,
                    expert_entropy: Optional[torch.Tensor] = None, expert_mask: Optional[torch.Tensor] = None) -> dict:
    """Mean token entropy over on-policy tokens (entropy_mean), tokens of passed rows (entropy_passed), of failed
    rows (entropy_failed) and of expert rows (entropy_expert; None without expert rows).
    entropy, mask [B,T]; passed [B]; expert_entropy, expert_mask [E,Te] (entropy's dtype and device).
    Entropies must be finite and >= 0 at masked-in positions. Means are accumulated in float64."""
    V.tensor(entropy, "entropy", ndim=2)
    V.floating(entropy, "entropy")
    V.mask_like(mask, "mask", entropy, "entropy")
    V.mask_like(passed, "passed", entropy, "entropy rows", shape=(entropy.shape[0],))
    if expert_entropy is not None:
        V.float_like(expert_entropy, "expert_entropy", entropy, "entropy", ndim=2)
        if expert_mask is None:
            raise ValueError("expert_mask: expected a tensor like expert_entropy when expert_entropy is given")
        V.mask_like(expert_mask, "expert_mask", expert_entropy, "expert_entropy")
    m = V.mask_values(mask, "mask")
    V.finite(entropy, "entropy", m)
    V.nonneg(entropy, "entropy", m)
    p = V.binary(passed, "passed")[:, None]
    out = {"entropy_mean": _masked_mean(entropy, m), "entropy_passed": _masked_mean(entropy, m & p),
           "entropy_failed": _masked_mean(entropy, m & ~p), "entropy_expert": None}
    if expert_entropy is not None:
        em = V.mask_values(expert_mask, "expert_mask", allow_empty=True)
        V.finite(expert_entropy, "expert_entropy", em)
        V.nonneg(expert_entropy, "expert_entropy", em)
        out["entropy_expert"] = _masked_mean(expert_entropy, em)
    return out


# ------------------------------------------------------------------------------------------------ groups
def _quantiles(x: torch.Tensor, qs: Sequence[float]) -> list:
    if x.numel() == 0:
        return [None] * len(qs)
    return torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64, device=x.device)).tolist()


def group_rarity(rewards: torch.Tensor, group_ids: torch.Tensor, passed: torch.Tensor, *, bins: int = 10,
                 scale: str = "none") -> dict:
    """Group rarity: the uniform/all-pass/all-fail fractions and abs_adv_mean of calibrl.advantage.group_stats,
    plus pass_rate_hist (group counts over `bins` equal bins of the pass rate in [0, 1], last bin closed),
    pass_rate_edges, abs_adv_q10/q50/q90 (|A| over rows) and nonzero_adv_frac (rows with A != 0)."""
    from calibrl.advantage import group_advantages, group_stats

    V.int_arg(bins, "bins")
    gs = group_stats(rewards, group_ids, passed, scale=scale)
    rate = gs["pass_rate"].double()
    hist = torch.histc(rate, bins=bins, min=0.0, max=1.0).long().tolist()
    adv = group_advantages(rewards, group_ids, scale=scale).abs()
    q = _quantiles(adv, (0.1, 0.5, 0.9))
    return {k: gs[k] for k in ("uniform_frac", "all_pass_frac", "all_fail_frac", "abs_adv_mean")} | {
        "pass_rate_hist": hist, "pass_rate_edges": torch.linspace(0, 1, bins + 1).tolist(),
        "abs_adv_q10": q[0], "abs_adv_q50": q[1], "abs_adv_q90": q[2],
        "nonzero_adv_frac": float((adv != 0).double().mean())}


# ------------------------------------------------------------------------------------------------ gate
def gate_activation(logp: torch.Tensor, expert_logp: torch.Tensor, mask: torch.Tensor, passed: torch.Tensor,
                    slope: float = 0.5, *, rows: Optional[torch.Tensor] = None, adv: Optional[torch.Tensor] = None,
                    expert_mask: Optional[torch.Tensor] = None) -> dict:
    """Which side of CalibRL's LeakyReLU each on-policy token falls on (token gap, e_t as in calibrl_loss).

    gate_tie_frac: share of tokens with logp == e_t exactly (x = 0; they get the slope weight in the loss);
    gate_passed_below / gate_passed_above: share of passed-row non-tie tokens with logp < e_t (weight 1) / > e_t;
    gate_failed_above / gate_failed_below: share of failed-row non-tie tokens with logp > e_t (weight 1) / < e_t;
    gate_weight_mean: mean gate weight (1 or slope) over all tokens, ties included. rows [B] bool selects rows
    (pass the rows of non-uniform groups for the contract's definition). With adv [B], also guide_weight_mean:
    mean |A| x gate weight (the effective token weight of the guidance term). Same definitions and the same code
    as calibrl_loss's info (calibrl._kernels.gate_fractions, gap in the loss's compute dtype)."""
    B, T = V.expert_pair(logp, expert_logp, expert_mask)
    V.mask_like(mask, "mask", logp, "logp")
    V.mask_like(passed, "passed", logp, "logp rows", shape=(B,))
    if rows is not None:
        V.mask_like(rows, "rows", logp, "logp rows", shape=(B,))
    if adv is not None:
        V.float_like(adv, "adv", logp, "logp", shape=(B,))
    V.number(slope, "slope", lo=0.0, hi=1.0)
    m = V.mask_values(mask, "mask", allow_empty=True)
    V.logprob_values(logp, "logp", m)
    em = None if expert_mask is None else V.mask_values(expert_mask, "expert_mask", allow_empty=True)
    V.logprob_values(expert_logp if em is not None else expert_logp[:, :T], "expert_logp", em)
    p = V.binary(passed, "passed")[:, None]
    if rows is not None:
        m = m & V.binary(rows, "rows")[:, None]
    if adv is not None:
        V.finite(adv, "adv")
    dt = K.compute_dtype(logp)                                            # as calibrl_loss
    e = K.expert_baseline(expert_logp, T, em).to(dt)
    gap = torch.where(m, logp.detach(), 0.0).to(dt) - e                   # [B,T] logp - e_t (as calibrl_loss)
    out = K.gate_fractions(gap, m, p, float(slope))
    if adv is not None:
        full = K.gate_full_side(gap, p)
        w = adv.detach().abs().to(dt)[:, None] * torch.where(full, 1.0, float(slope))
        out["guide_weight_mean"] = _masked_mean(w, m)
    return out


def expert_gap(logp: torch.Tensor, expert_logp: torch.Tensor, mask: torch.Tensor, expert_len: torch.Tensor) -> dict:
    """Quantiles of logp - e_t over on-policy tokens (expert_gap_q10/q50/q90; e_t = 0 at t >= the expert's length,
    the official baseline) and expert_past_end_frac, the share of on-policy token positions at or beyond the
    expert's length. logp, mask [B,T]; expert_logp [B,Te] (logp's dtype and device); expert_len [B] int >= 0.
    An expert longer than its tensor is fine as long as no on-policy position falls between the tensor's end and
    the expert's (there e_t is unknown: a ValueError, where it used to read as past the end). Gaps in float32
    (float64 for float64 inputs), quantiles in float64."""
    B, T = V.expert_pair(logp, expert_logp)
    V.mask_like(mask, "mask", logp, "logp")
    V.tensor(expert_len, "expert_len", shape=(B,), like="logp rows")
    V.integer(expert_len, "expert_len")
    V.same_device("expert_len", expert_len, logp, "logp")
    te = expert_logp.shape[1]
    if bool((expert_len < 0).any()):
        raise ValueError(f"expert_len: expected non-negative lengths, got {expert_len.tolist()}")
    m = V.mask_values(mask, "mask")
    t_idx = torch.arange(T, device=logp.device)[None, :]
    unknown = m & (t_idx >= te) & (t_idx < expert_len[:, None])           # inside the expert, outside its tensor
    if bool(unknown.any()):
        raise ValueError(f"expert_len: row {int(unknown.any(-1).nonzero()[0])} has an expert of "
                         f"{int(expert_len[unknown.any(-1)][0])} tokens but expert_logp holds {te}; expected "
                         f"e_t for every on-policy position inside the expert (lengths <= {te} or a wider tensor)")
    V.logprob_values(logp, "logp", m)
    valid = torch.arange(te, device=logp.device)[None, :] < expert_len[:, None]
    V.logprob_values(expert_logp, "expert_logp", valid)
    e = K.expert_baseline(expert_logp, max(T, te), valid)[:, :T]
    dt = K.compute_dtype(logp)                                            # float32 for half precision
    gap = (logp.detach().to(dt) - e.to(dt))[m]
    q = _quantiles(gap, (0.1, 0.5, 0.9))
    past = torch.arange(T, device=logp.device)[None, :] >= expert_len[:, None]
    return {"expert_gap_q10": q[0], "expert_gap_q50": q[1], "expert_gap_q90": q[2],
            "expert_past_end_frac": float((past & m).sum()) / float(m.sum())}


def cov_logp_adv(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 weight: Optional[torch.Tensor] = None) -> float:
    """Cov(logp, A) over on-policy tokens (population covariance, in float64; the entropy-dynamics proxy: positive
    values sharpen the policy). adv [B] or [B,T]; weight [B,T] optional token weights (e.g. CalibRL's |A| x gate
    weight) multiply A first, giving the covariance "with the guided weights". All in logp's dtype and device."""
    V.tensor(logp, "logp", ndim=2)
    V.floating(logp, "logp")
    V.mask_like(mask, "mask", logp, "logp")
    V.float_like(adv, "adv", logp, "logp", ndim=(1, 2))
    if adv.dim() == 1 and adv.shape[0] != logp.shape[0]:
        raise ValueError(f"adv: expected shape ({logp.shape[0]},) like logp rows, got {tuple(adv.shape)}")
    if adv.dim() == 2:
        V.tensor(adv, "adv", shape=logp.shape, like="logp")
    if weight is not None:
        V.float_like(weight, "weight", logp, "logp", shape=logp.shape)
    m = V.mask_values(mask, "mask")
    V.logprob_values(logp, "logp", m)
    a = adv.detach()[:, None].expand_as(logp) if adv.dim() == 1 else adv.detach()
    V.finite(a, "adv", m)
    if weight is not None:
        V.finite(weight, "weight", m)
        a = a.double() * weight.detach().double()
    lp, av = logp.detach()[m].double(), a[m].double()
    return float(((lp - lp.mean()) * (av - av.mean())).mean())


# ------------------------------------------------------------------------------------------------ gradients
def gradient_split(pg_loss: torch.Tensor, guide_loss: torch.Tensor, params: Sequence[torch.Tensor], *,
                   accumulate: bool = False) -> dict:
    """Gradient norms of the policy term and the guidance term, and their cosine, for the given parameters.

    pg_loss, guide_loss: finite 0-d tensors sharing a graph (e.g. pg from policy_loss and guide = total - pg,
    which includes guide_coef). accumulate=False: the graph is retained so the caller can still backward the
    total. accumulate=True: the two gradients are summed into each parameter's .grad, exactly what backward of
    pg_loss + guide_loss would add, so the caller saves that third backward pass (the graph is freed).
    Parameters without a gradient path count as zero; parameters may live on several devices. Norms and the
    dot product are accumulated in float64. Returns grad_norm_pg, grad_norm_guide, grad_cos_pg_guide (in
    [-1, 1]); a norm is None when its gradient is not finite (the caller's step is then skipped), the cosine is
    None when a norm is 0 or None. Never NaN.
    """
    for name, t in (("pg_loss", pg_loss), ("guide_loss", guide_loss)):
        V.tensor(t, name)
        if t.numel() != 1 or not t.requires_grad:
            raise ValueError(f"{name}: expected a scalar tensor that requires grad, got shape {tuple(t.shape)} "
                             f"requires_grad={t.requires_grad}")
    if not isinstance(accumulate, bool):
        raise ValueError(f"accumulate: expected a bool, got {accumulate!r}")
    params = list(params) if not torch.is_tensor(params) else [params]
    if not params or not all(torch.is_tensor(p) and p.requires_grad for p in params):
        raise ValueError("params: expected a non-empty sequence of tensors that require grad")
    for name, t in (("pg_loss", pg_loss), ("guide_loss", guide_loss)):
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"{name}: expected a finite loss, got {float(t.detach()):.4g}")
    grads_pg = torch.autograd.grad(pg_loss, params, retain_graph=True, allow_unused=True)
    grads_gd = torch.autograd.grad(guide_loss, params, retain_graph=not accumulate, allow_unused=True)
    if accumulate:
        with torch.no_grad():
            for p, a, b in zip(params, grads_pg, grads_gd):
                if a is None and b is None:
                    continue
                g = a + b if a is not None and b is not None else (a if a is not None else b)
                p.grad = g.clone() if p.grad is None else p.grad + g
    n_pg, n_gd, dot = _norms_and_dot(grads_pg, grads_gd, params)
    cos = None
    if n_pg and n_gd and math.isfinite(dot):
        cos = max(-1.0, min(1.0, dot / (n_pg * n_gd)))
    return {"grad_norm_pg": n_pg, "grad_norm_guide": n_gd, "grad_cos_pg_guide": cos}


def _norms_and_dot(grads_a, grads_b, params) -> tuple:
    """(|a|, |b|, a.b) over all parameters in float64; a norm is None when not finite. One flat vector per
    device (the sums of several devices are added as python floats)."""
    by_dev: dict = {}
    for ga, gb, p in zip(grads_a, grads_b, params):
        za = (ga if ga is not None else torch.zeros_like(p)).detach().reshape(-1).double()
        zb = (gb if gb is not None else torch.zeros_like(p)).detach().reshape(-1).double()
        by_dev.setdefault(p.device, ([], []))
        by_dev[p.device][0].append(za)
        by_dev[p.device][1].append(zb)
    sq_a = sq_b = dot = 0.0
    for va, vb in by_dev.values():
        fa, fb = torch.cat(va), torch.cat(vb)
        na, nb = float(fa.norm()), float(fb.norm())
        sq_a, sq_b, dot = sq_a + na * na, sq_b + nb * nb, dot + float(fa @ fb)
        if len(by_dev) == 1:                                             # the usual case: norms as computed
            fin = lambda v: v if math.isfinite(v) else None
            return fin(na), fin(nb), dot
    fin = lambda v: math.sqrt(v) if math.isfinite(v) else None
    return fin(sq_a), fin(sq_b), dot
