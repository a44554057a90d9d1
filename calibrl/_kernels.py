"""Unchecked kernels of the policy losses: the math of calibrl.losses and calibrl.losses_hybrid without validation.

The public functions validate their inputs once and call these; a training loop that has validated a whole batch
may call them per micro-batch (re-exported as calibrl.losses.*_kernel). Arguments are those of the public function,
with `mask` (and `passed`, `expert_mask`) already bool. The kernels still do what the math needs: positions outside
the mask are replaced by 0 with torch.where before any arithmetic, half precision is computed in float32, and
inputs that are constants in the equation (old_logp, adv, ref_logp, expert_logp) are detached.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16 tensors, else their dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# ------------------------------------------------------------------------------------------------ aggregation
def agg_mat(mat: torch.Tensor, m: torch.Tensor, mode: str, norm_len: Optional[int],
        n_tok: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Aggregate a [B,T] loss matrix that is already 0 outside the bool mask m. n_tok: m.sum(-1) if known."""
    if mode == "seq-mean-token-sum-norm":
        return mat.sum() / (norm_len if norm_len is not None else mat.shape[-1])
    if n_tok is None:
        n_tok = m.sum(-1)                                     # [B] tokens per row
    if mode == "token-mean":
        return mat.sum() / n_tok.sum().clamp(min=1)
    row_sum = mat.sum(-1)                                     # [B]
    per_row = row_sum / n_tok.clamp(min=1) if mode == "seq-mean-token-mean" else row_sum
    has_tok = (n_tok > 0).to(mat.dtype)                       # rows without tokens do not count
    return (per_row * has_tok).sum() / has_tok.sum().clamp(min=1)


def aggregate_kernel(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, *, norm_len: Optional[int] = None
                     ) -> torch.Tensor:
    """calibrl.losses.aggregate without validation (half precision summed in float32)."""
    return agg_mat(torch.where(mask, loss_mat, 0.0).to(compute_dtype(loss_mat)), mask, mode, norm_len)


def masked_inputs(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, m: torch.Tensor) -> tuple:
    """(mf [B,T], n_tok [B], logp_m, old_m [B,T], a [B,1] or [B,T]): 0 outside the mask, in the compute dtype;
    old_logp and adv detached (constants of the surrogate)."""
    dt = compute_dtype(logp)
    logp_m = torch.where(m, logp, 0.0).to(dt)                                  # [B,T] pads -> 0
    old_m = torch.where(m, old_logp.detach(), 0.0).to(dt)
    a = adv.detach().to(dt)[:, None] if adv.dim() == 1 else torch.where(m, adv.detach(), 0.0).to(dt)
    return m.to(dt), m.sum(-1), logp_m, old_m, a


# ------------------------------------------------------------------------------------------------ policy term
def pg_terms(logp_m: torch.Tensor, old_m: torch.Tensor, a: torch.Tensor, mf: torch.Tensor, clip_low: float,
             clip_high: float, clip_c: Optional[float]) -> tuple[torch.Tensor, dict]:
    """Dual-clip PPO per-token loss [B,T] (0 outside the mask) and its detached statistics (0-d tensors).

    For A > 0, max(-A r, -A clip(r, lo, hi)) = -A min(r, hi); for A < 0 it is -A max(r, lo), and the dual clip
    caps that at -A c: -A clamp(r, lo, c). So the loss is -A clamp(r, lo_A, hi_A) with per-token bounds, the
    same value and gradient as the max/min form (verl's) with one clamp instead of three max/min/where passes.
    """
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    inf = float("inf")
    neg, pos = a < 0, a > 0                                              # [B,1] or [B,T]
    k = lambda v: a.new_tensor(v)                                        # constants in the compute dtype
    lo_a = torch.where(neg, k(lo), k(0.0))                               # lower bound of r: lo where A < 0
    hi_a = torch.where(pos, k(hi), k(clip_c if clip_c is not None else inf))   # upper: hi (A>0), c (A<0)
    hi_a = torch.where(neg | pos, hi_a, k(inf))                          # A = 0: no bound (loss is 0)
    log_ratio = (logp_m - old_m).clamp(-20.0, 20.0)                      # [B,T] verl clamps before exp
    ratio = torch.exp(log_ratio)                                         # [B,T] r = pi_theta / pi_old
    r_eff = torch.clamp(ratio, min=lo_a, max=hi_a)                       # [B,T] clipped (and dual-clipped) r
    pg = (-a * mf) * r_eff                                               # [B,T] -A r_eff, 0 outside the mask
    with torch.no_grad():                                                # pads: r = 1, never clipped
        above, below = ratio > hi_a, ratio < lo_a                        # [B,T]
        n = mf.sum().clamp(min=1)
        if a.shape[1] == 1:                                              # per-row advantage: count per row
            up, down = above.sum(-1, keepdim=True), below.sum(-1, keepdim=True)
            clipped = torch.where(neg, down, up).sum()                   # A>0: r > hi; A<0: r < lo
            dual = torch.where(neg, up, 0).sum() if clip_c is not None else torch.zeros((), device=a.device)
        else:
            clipped = ((above & pos) | (below & neg)).sum()
            dual = (above & neg).sum() if clip_c is not None else torch.zeros((), device=a.device)
        stats = {"clipfrac": clipped / n, "approx_kl": -log_ratio.sum() / n, "dualclip_frac": dual / n}
    return pg, stats


def floats(d: dict) -> dict:
    """Detached 0-d tensors -> python floats with a single device sync."""
    keys = list(d)
    vals = torch.stack([d[k].detach().to(torch.float64).reshape(()) for k in keys]).tolist()
    return dict(zip(keys, vals))


def policy_loss_kernel(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                       clip_low: float = 0.2, clip_high: float = 0.2, clip_c: Optional[float] = 3.0,
                       agg: str = "token-mean", ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0,
                       entropy: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
                       norm_len: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """calibrl.losses.policy_loss without validation."""
    m = mask
    mf, n_tok, logp_m, old_m, a = masked_inputs(logp, old_logp, adv, m)
    dt = logp_m.dtype
    pg_mat, stats = pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)    # [B,T]
    pg = agg_mat(pg_mat, m, agg, norm_len, n_tok)                       # scalar
    loss = pg
    if kl_coef > 0:
        d = torch.where(m, ref_logp.detach(), 0.0).to(dt) - logp_m       # [B,T] log(pi_ref / pi_theta), 0 on pads
        k3 = torch.exp(d) - d - 1.0                                      # [B,T] k3 estimator (0 on pads)
        kl = agg_mat(k3, m, agg, norm_len, n_tok)
        loss = loss + kl_coef * kl
        stats["kl"] = kl
    if entropy_coef > 0:
        ent = agg_mat(torch.where(m, entropy, 0.0).to(dt), m, agg, norm_len, n_tok)
        loss = loss - entropy_coef * ent
        stats["entropy"] = ent
    return loss, floats({"pg_loss": pg, "loss": loss, **stats})


# ------------------------------------------------------------------------------------------------ CalibRL gate
def gate_full_side(gap: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """Bool: True where the LeakyReLU of -s gap is on its slope-1 side (passed: gap < 0; failed: gap > 0)."""
    return torch.where(passed, gap < 0, gap > 0)


def gate_fractions(gap: torch.Tensor, mask: torch.Tensor, passed: torch.Tensor, slope: float) -> dict:
    """calibrl.losses.gate_fractions without validation (gap [B,T] or [B,1], mask bool [B,T], passed bool)."""
    p = passed.expand_as(mask)
    full = mask & gate_full_side(gap, passed).expand_as(mask)             # [B,T] weight-1 side
    tie = mask & (gap == 0).expand_as(mask)                               # [B,T] x = 0 exactly
    counts = torch.stack([(mask & p).sum(), (full & p).sum(), (tie & p).sum(),
                          (mask & ~p).sum(), (full & ~p).sum(), (tie & ~p).sum()]).tolist()
    return gate_dict(*counts, slope)


def gate_dict(n_p: int, n_pf: int, n_pt: int, n_f: int, n_ff: int, n_ft: int, slope: float) -> dict:
    """Fractions from counts: tokens / weight-1 side / ties, of passed (n_p*) and failed (n_f*) rows."""
    frac = lambda k, tot: k / tot if tot else None
    n, n_full = n_p + n_f, n_pf + n_ff
    return {"gate_passed_below": frac(n_pf, n_p - n_pt), "gate_passed_above": frac(n_p - n_pt - n_pf, n_p - n_pt),
            "gate_failed_above": frac(n_ff, n_f - n_ft), "gate_failed_below": frac(n_f - n_ft - n_ff, n_f - n_ft),
            "gate_weight_mean": frac(n_full + slope * (n - n_full), n), "gate_tie_frac": frac(n_pt + n_ft, n)}


def expert_baseline(expert_logp: torch.Tensor, T: int, expert_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """e_t [B,T]: expert_logp detached, 0 where expert_mask is False, cut or 0-padded to width T."""
    e = expert_logp.detach()
    if expert_mask is not None:
        e = torch.where(expert_mask, e, 0.0)
    if e.shape[1] >= T:
        return e[:, :T]
    return F.pad(e, (0, T - e.shape[1]))


def calibrl_loss_kernel(logp: torch.Tensor, old_logp: torch.Tensor, expert_logp: torch.Tensor, adv: torch.Tensor,
                        mask: torch.Tensor, passed: torch.Tensor, *, slope: float = 0.5, guide_coef: float = 0.1,
                        weight: str = "abs-adv", gap: str = "token", clip_low: float = 0.2, clip_high: float = 0.2,
                        clip_c: Optional[float] = 3.0, agg: str = "token-mean",
                        expert_mask: Optional[torch.Tensor] = None, norm_len: Optional[int] = None
                        ) -> tuple[torch.Tensor, dict]:
    """calibrl.losses.calibrl_loss without validation (passed bool [B])."""
    m, em = mask, expert_mask
    mf, n_tok, logp_m, old_m, a = masked_inputs(logp, old_logp, adv, m)
    p = passed[:, None]                                                    # [B,1] bool
    dt = logp_m.dtype
    pg_mat, stats = pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)    # [B,T]
    neg_s = 1.0 - 2.0 * p.to(dt)                                           # [B,1] -s: -1 passed, +1 failed
    w = (a.abs() * mf) if weight == "abs-adv" else mf                      # [B,T] |A| (0 outside the mask)
    if gap == "token":
        e = expert_baseline(expert_logp, logp.shape[1], em).to(dt)         # [B,T] e_t, detached
        gap_t = logp_m - e                                                 # [B,T] logp - e_t
        x = neg_s * gap_t                                                  # [B,T] -s (logp - e_t)
        guide_mat = w * F.leaky_relu(x, slope)                             # [B,T]
    else:
        e = expert_logp.detach().to(dt)
        e = torch.where(em, e, 0.0) if em is not None else e
        pol_seq = logp_m.sum(-1)                                           # [B] log pi(tau_i)
        exp_seq = e.sum(-1)                                                # [B] log pi_old(tau_expert)
        if gap == "mean-token":
            n_exp = em.sum(-1) if em is not None else torch.full_like(n_tok, e.shape[1])
            pol_seq = pol_seq / n_tok.clamp(min=1)
            exp_seq = exp_seq / n_exp.clamp(min=1)
        gap_t = (pol_seq - exp_seq)[:, None]                               # [B,1] Delta_i
        x = neg_s * gap_t                                                  # [B,1] -s Delta_i
        w_row = (w.sum(-1) / n_tok.clamp(min=1))[:, None]                  # [B,1] row mean of |A| (or 1)
        row_loss = w_row * F.leaky_relu(x, slope)                          # [B,1] L_i
        guide_mat = (row_loss / n_tok.clamp(min=1)[:, None]) * mf          # [B,T] L_i / n_i on row i's tokens
    pg = agg_mat(pg_mat, m, agg, norm_len, n_tok)                         # scalar
    guide = agg_mat(guide_mat, m, agg, norm_len, n_tok)                   # scalar
    loss = pg + guide_coef * guide
    info = floats({"pg_loss": pg, "guide_loss": guide, "loss": loss, **stats})
    with torch.no_grad():
        info.update(gate_fractions(gap_t, m, p, slope))
    return loss, info


# ------------------------------------------------------------------------------------------------ hybrid
def agg_union(on_mat: torch.Tensor, m: torch.Tensor, off_mat: torch.Tensor, em: torch.Tensor, mode: str,
              norm_len: Optional[int]) -> torch.Tensor:
    """Aggregate on-policy [B,T] and expert [E,Te] loss matrices as one batch of rows of width max(T, Te)."""
    W = max(on_mat.shape[1], off_mat.shape[1])
    pad = lambda x: F.pad(x, (0, W - x.shape[1]))
    mat = torch.cat([pad(on_mat), pad(off_mat.to(on_mat.dtype))])
    mask = torch.cat([pad(m), pad(em)])
    return agg_mat(mat, mask, mode, norm_len)
