"""Diagnostics probes: token entropy (chunked, also straight from hidden states + LM head), entropy summaries, group
rarity, CalibRL gate activation, expert-gap quantiles, Cov(logp, A) and the policy/guidance gradient split.

Every probe returns python floats (None where not applicable, never NaN) under the metric names of the contract,
except the per-token entropy functions, which return tensors. Probes never build autograd graphs, except
gradient_split, which differentiates the losses it is given.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from calibrl import _validate as V
from calibrl.losses import expert_baseline, gate_fractions, gate_full_side


# ------------------------------------------------------------------------------------------------ entropy
def _entropy_rows(logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """H = -sum_v p log p over the last dim, in float32, for an [n, V] chunk; -inf logits (suppressed ids)
    contribute 0. inplace=True reuses `logits` (a fresh float32 chunk) to keep two [n, V] buffers at most."""
    z = logits.float()
    if not inplace and z.data_ptr() == logits.data_ptr():
        z = z.clone()                                                    # never modify the caller's logits
    z.sub_(torch.logsumexp(z, -1, keepdim=True))                          # [n,V] log p
    p = torch.exp(z)                                                     # [n,V] p
    p.mul_(z)                                                            # [n,V] p log p (NaN = 0 * -inf)
    return -torch.nansum(p, -1)                                          # [n]


@torch.no_grad()
def token_entropy(logits: torch.Tensor, *, chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim, computed `chunk_size` positions at a time in
    float32. logits [..., V] (any float dtype; -inf entries, e.g. suppressed ids, are fine). Returns float32 [...]."""
    V.tensor(logits, "logits")
    V.floating(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a [..., V] tensor with V > 0, got shape {tuple(logits.shape)}")
    _check_chunk(chunk_size, "chunk_size")
    V.number(temperature, "temperature", lo=0.0, lo_open=True)
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk_size):
        z = flat[i:i + chunk_size]
        out[i:i + chunk_size] = _entropy_rows(z / temperature if temperature != 1.0 else z)
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def entropy_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None, chunk_size: int = 256, temperature: float = 1.0,
                        suppress_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Token entropy straight from final hidden states and the LM-head weight, `chunk_size` positions at a time,
    so a large-vocabulary model (e.g. V = 151,936) never holds a full [B,T,V] logits tensor: the peak extra
    memory is about 3 x chunk_size x V x 4 bytes.

    hidden [B,T,H] or [N,H]; lm_head_weight [V,H]; bias [V] or None; mask like hidden[..., 0] (only those
    positions are computed, others get 0); suppress_ids: vocabulary ids masked to -inf before the softmax (the
    vision special tokens). Returns float32 entropy of shape hidden.shape[:-1].
    """
    V.tensor(hidden, "hidden", ndim=(2, 3))
    V.floating(hidden, "hidden")
    V.tensor(lm_head_weight, "lm_head_weight", ndim=2)
    V.floating(lm_head_weight, "lm_head_weight")
    if lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight: expected shape (V, {hidden.shape[-1]}) matching hidden's last dim, "
                         f"got {tuple(lm_head_weight.shape)}")
    if bias is not None:
        V.float_tensor(bias, "bias", shape=(lm_head_weight.shape[0],), like="lm_head_weight rows")
    _check_chunk(chunk_size, "chunk_size")
    V.number(temperature, "temperature", lo=0.0, lo_open=True)
    lead = hidden.shape[:-1]
    m = None if mask is None else V.mask(mask, "mask", lead, like="hidden[..., 0]", allow_empty=True)
    h = hidden.reshape(-1, hidden.shape[-1])
    idx = torch.arange(h.shape[0], device=h.device) if m is None else m.reshape(-1).nonzero().squeeze(-1)
    out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    w = lm_head_weight if lm_head_weight.dtype == h.dtype else lm_head_weight.to(h.dtype)
    sup = None
    if suppress_ids:
        sup = torch.as_tensor(list(suppress_ids), dtype=torch.long, device=h.device)
    for i in range(0, idx.numel(), chunk_size):
        rows = idx[i:i + chunk_size]
        z = h[rows] @ w.T                                                 # [n,V] one chunk of logits
        if bias is not None:
            z = z + bias.to(z.dtype)
        z = z.float()
        if temperature != 1.0:
            z = z / temperature
        if sup is not None:
            z[:, sup] = float("-inf")
        out[rows] = _entropy_rows(z, inplace=True)
        del z
    return out.reshape(lead)


def _check_chunk(n, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name}: expected an int > 0, got {n!r}")


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> Optional[float]:
    n = int(m.sum())
    return float((torch.where(m, x, 0.0).double()).sum()) / n if n else None


def entropy_summary(entropy: torch.Tensor, mask: torch.Tensor, passed: torch.Tensor,
                    expert_entropy: Optional[torch.Tensor] = None, expert_mask: Optional[torch.Tensor] = None) -> dict:
    """Mean token entropy over on-policy tokens (entropy_mean), tokens of passed rows (entropy_passed), of failed
    rows (entropy_failed) and of expert rows (entropy_expert; None without expert rows).
    entropy, mask [B,T]; passed [B]; expert_entropy, expert_mask [E,Te]."""
    V.float_tensor(entropy, "entropy", ndim=2, check_finite=False)
    m = V.mask(mask, "mask", entropy.shape, like="entropy")
    V.finite(entropy, "entropy", m)
    p = V.binary(V.tensor(passed, "passed", shape=(entropy.shape[0],), like="entropy rows"), "passed")[:, None]
    out = {"entropy_mean": _masked_mean(entropy, m), "entropy_passed": _masked_mean(entropy, m & p),
           "entropy_failed": _masked_mean(entropy, m & ~p), "entropy_expert": None}
    if expert_entropy is not None:
        V.float_tensor(expert_entropy, "expert_entropy", ndim=2, check_finite=False)
        if expert_mask is None:
            raise ValueError("expert_mask: expected a tensor like expert_entropy when expert_entropy is given")
        em = V.mask(expert_mask, "expert_mask", expert_entropy.shape, like="expert_entropy", allow_empty=True)
        V.finite(expert_entropy, "expert_entropy", em)
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

    _check_chunk(bins, "bins")
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
    (pass the rows of non-uniform groups for the contract's definition). With adv [B], also guide_weight_mean: mean |A| x gate weight (the
    effective token weight of the guidance term). Same definitions as calibrl_loss's info (shared code)."""
    V.float_tensor(logp, "logp", ndim=2, check_finite=False)
    m = V.mask(mask, "mask", logp.shape, allow_empty=True)
    V.finite(logp, "logp", m)
    V.float_tensor(expert_logp, "expert_logp", ndim=2, check_finite=False)
    if expert_logp.shape[0] != logp.shape[0]:
        raise ValueError(f"expert_logp: expected {logp.shape[0]} rows like logp, got {tuple(expert_logp.shape)}")
    em = None if expert_mask is None else V.mask(expert_mask, "expert_mask", expert_logp.shape,
                                                 like="expert_logp", allow_empty=True)
    V.finite(expert_logp, "expert_logp", em)
    p = V.binary(V.tensor(passed, "passed", shape=(logp.shape[0],), like="logp rows"), "passed")[:, None]
    V.number(slope, "slope", lo=0.0, hi=1.0)
    if rows is not None:
        m = m & V.binary(V.tensor(rows, "rows", shape=(logp.shape[0],), like="logp rows"), "rows")[:, None]
    dt = torch.float32 if logp.dtype in (torch.float16, torch.bfloat16) else logp.dtype   # as calibrl_loss
    e = expert_baseline(expert_logp, logp.shape[1], em).to(dt)
    gap = torch.where(m, logp, 0.0).to(dt) - e                            # [B,T] logp - e_t (as calibrl_loss)
    out = gate_fractions(gap, m, p, float(slope))
    if adv is not None:
        full = gate_full_side(gap, p)
        V.float_tensor(adv, "adv", shape=(logp.shape[0],), like="logp rows")
        w = adv.abs()[:, None] * torch.where(full, 1.0, float(slope))
        out["guide_weight_mean"] = _masked_mean(w, m)
    return out


def expert_gap(logp: torch.Tensor, expert_logp: torch.Tensor, mask: torch.Tensor, expert_len: torch.Tensor) -> dict:
    """Quantiles of logp - e_t over on-policy tokens (expert_gap_q10/q50/q90; e_t = 0 at t >= the expert's length,
    the official baseline) and expert_past_end_frac, the share of on-policy token positions at or beyond the
    expert's length. logp, mask [B,T]; expert_logp [B,Te]; expert_len [B] int (tokens of row i's expert)."""
    V.float_tensor(logp, "logp", ndim=2, check_finite=False)
    m = V.mask(mask, "mask", logp.shape)
    V.finite(logp, "logp", m)
    V.float_tensor(expert_logp, "expert_logp", ndim=2, check_finite=False)
    B, T = logp.shape
    if expert_logp.shape[0] != B:
        raise ValueError(f"expert_logp: expected {B} rows like logp, got {tuple(expert_logp.shape)}")
    V.tensor(expert_len, "expert_len", shape=(B,), like="logp rows")
    if expert_len.is_floating_point() or expert_len.dtype == torch.bool or bool((expert_len < 0).any()):
        raise ValueError("expert_len: expected non-negative integer lengths")
    width = max(T, expert_logp.shape[1])
    valid = torch.arange(expert_logp.shape[1], device=logp.device)[None, :] < expert_len[:, None]
    V.finite(expert_logp, "expert_logp", valid)
    e = expert_baseline(expert_logp, width, valid)[:, :T]
    gap = (logp - e)[m]
    q = _quantiles(gap, (0.1, 0.5, 0.9))
    past = torch.arange(T, device=logp.device)[None, :] >= expert_len[:, None]
    return {"expert_gap_q10": q[0], "expert_gap_q50": q[1], "expert_gap_q90": q[2],
            "expert_past_end_frac": float((past & m).sum()) / float(m.sum())}


def cov_logp_adv(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 weight: Optional[torch.Tensor] = None) -> float:
    """Cov(logp, A) over on-policy tokens (population covariance; the entropy-dynamics proxy: positive values
    sharpen the policy). adv [B] or [B,T]; weight [B,T] optional token weights (e.g. CalibRL's |A| x gate
    weight) multiply A first, giving the covariance "with the guided weights"."""
    V.float_tensor(logp, "logp", ndim=2, check_finite=False)
    m = V.mask(mask, "mask", logp.shape)
    V.finite(logp, "logp", m)
    V.tensor(adv, "adv", ndim=(1, 2))
    V.floating(adv, "adv")
    if adv.dim() == 1 and adv.shape[0] != logp.shape[0]:
        raise ValueError(f"adv: expected shape ({logp.shape[0]},) like logp rows, got {tuple(adv.shape)}")
    a = adv[:, None].expand_as(logp) if adv.dim() == 1 else V.tensor(adv, "adv", shape=logp.shape, like="logp")
    V.finite(a, "adv", m)
    if weight is not None:
        V.float_tensor(weight, "weight", shape=logp.shape, like="logp", where=m)
        a = a * weight
    lp, av = logp[m].double(), a[m].double()
    return float(((lp - lp.mean()) * (av - av.mean())).mean())


# ------------------------------------------------------------------------------------------------ gradients
def gradient_split(pg_loss: torch.Tensor, guide_loss: torch.Tensor, params: Sequence[torch.Tensor], *,
                   accumulate: bool = False) -> dict:
    """Gradient norms of the policy term and the guidance term, and their cosine, for the given parameters.

    pg_loss, guide_loss: 0-d tensors sharing a graph (e.g. pg from policy_loss and guide = total - pg, which
    includes guide_coef). accumulate=False: the graph is retained so the caller can still backward the total.
    accumulate=True: the two gradients are summed into each parameter's .grad, exactly what backward of
    pg_loss + guide_loss would add, so the caller saves that third backward pass (the graph is freed).
    Parameters without a gradient path count as zero. Returns grad_norm_pg, grad_norm_guide, grad_cos_pg_guide
    (None if a norm is 0).
    """
    for name, t in (("pg_loss", pg_loss), ("guide_loss", guide_loss)):
        V.tensor(t, name)
        if t.numel() != 1 or not t.requires_grad:
            raise ValueError(f"{name}: expected a scalar tensor that requires grad, got shape {tuple(t.shape)} "
                             f"requires_grad={t.requires_grad}")
    params = list(params)
    if not params or not all(torch.is_tensor(p) and p.requires_grad for p in params):
        raise ValueError("params: expected a non-empty sequence of tensors that require grad")
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                 for g, p in zip(gs, params)])
    if not isinstance(accumulate, bool):
        raise ValueError(f"accumulate: expected a bool, got {accumulate!r}")
    grads_pg = torch.autograd.grad(pg_loss, params, retain_graph=True, allow_unused=True)
    grads_gd = torch.autograd.grad(guide_loss, params, retain_graph=not accumulate, allow_unused=True)
    if accumulate:
        with torch.no_grad():
            for p, a, b in zip(params, grads_pg, grads_gd):
                if a is None and b is None:
                    continue
                g = a + b if a is not None and b is not None else (a if a is not None else b)
                p.grad = g.clone() if p.grad is None else p.grad + g
    g_pg, g_gd = flat(grads_pg), flat(grads_gd)
    n_pg, n_gd = float(g_pg.norm()), float(g_gd.norm())
    cos = float(g_pg @ g_gd) / (n_pg * n_gd) if n_pg > 0 and n_gd > 0 else None
    return {"grad_norm_pg": n_pg, "grad_norm_guide": n_gd, "grad_cos_pg_guide": cos}
