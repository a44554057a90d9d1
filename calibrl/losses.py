"""GRPO-family policy loss and the CalibRL loss, written like their equations.

Shapes: B on-policy rows, T response tokens; `mask` [B,T] is true on real response tokens. Every loss returns
(loss, info) with `info` a dict of python floats. Positions outside `mask` are replaced by 0 with torch.where before
any arithmetic, so -inf log-probs at padded positions never produce NaN (in the value or the gradient).
LUFFY and RL-PLUS live in calibrl.losses_hybrid and are re-exported here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from calibrl import _validate as V

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
WEIGHTS = ("abs-adv", "none")
GAPS = ("token", "sequence", "mean-token")
GATE_KEYS = ("gate_passed_below", "gate_passed_above", "gate_failed_above", "gate_failed_below", "gate_weight_mean",
             "gate_tie_frac")


# ------------------------------------------------------------------------------------------------ aggregation
def _agg(mat: torch.Tensor, m: torch.Tensor, mode: str, norm_len: Optional[int],
         n_tok: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Aggregate a [B,T] loss matrix that is already 0 outside the bool mask m (no validation).
    n_tok: m.sum(-1) if already computed."""
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


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, *, norm_len: Optional[int] = None
              ) -> torch.Tensor:
    """Aggregate a per-token loss matrix with one of verl's four modes.

    token-mean:               sum(l*m) / sum(m)
    seq-mean-token-mean:      mean over rows of (sum_t l*m / sum_t m)
    seq-mean-token-sum:       mean over rows of sum_t l*m
    seq-mean-token-sum-norm:  sum(l*m) / (norm_len or T)        (Dr.GRPO; no division by B, as the official
                              CalibRL fork of verl; verl 0.9.1 and TRL's dr_grpo also divide by the row count)
    Rows with no unmasked token are left out of the row means (as verl 0.9.1). Values at masked positions (even
    inf/NaN) are ignored. Args: loss_mat [B,T] float, mask [B,T] bool/{0,1}, norm_len int > 0 or None.
    Returns a 0-d tensor.
    """
    V.tensor(loss_mat, "loss_mat", ndim=2)
    V.floating(loss_mat, "loss_mat")
    m = V.mask(mask, "mask", loss_mat.shape, like="loss_mat")
    V.choice(mode, "mode", AGG_MODES)
    _check_norm_len(norm_len)
    mat = V.finite_sum(torch.where(m, loss_mat, 0.0), "loss_mat", masked=True)
    return _agg(mat, m, mode, norm_len)


def _check_norm_len(norm_len) -> None:
    if norm_len is not None and (isinstance(norm_len, bool) or not isinstance(norm_len, int) or norm_len <= 0):
        raise ValueError(f"norm_len: expected None or an int > 0, got {norm_len!r}")


# ------------------------------------------------------------------------------------------------ validation
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _prepare(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg, norm_len) -> tuple:
    """Validate the inputs every policy loss shares and mask them with torch.where before any arithmetic.

    Returns (m bool [B,T], mf float [B,T], n_tok [B], logp_m [B,T], old_m [B,T], a [B,1] or [B,T]), with logp_m,
    old_m and a equal to 0 outside the mask and all in the compute dtype (float32 for bf16/fp16 inputs)."""
    V.tensor(logp, "logp", ndim=2)
    V.floating(logp, "logp")
    m = V.mask(mask, "mask", logp.shape)
    V.tensor(old_logp, "old_logp", shape=logp.shape, like="logp")
    V.floating(old_logp, "old_logp")
    V.tensor(adv, "adv", ndim=(1, 2))
    V.floating(adv, "adv")
    if adv.dim() == 1 and adv.shape[0] != logp.shape[0]:
        raise ValueError(f"adv: expected shape ({logp.shape[0]},) or {tuple(logp.shape)} like logp, "
                         f"got {tuple(adv.shape)}")
    if adv.dim() == 2:
        V.tensor(adv, "adv", shape=logp.shape, like="logp")
    V.number(clip_low, "clip_low", lo=0.0, hi=1.0, hi_open=True)
    V.number(clip_high, "clip_high", lo=0.0)
    if clip_c is not None:
        V.number(clip_c, "clip_c", lo=1.0, lo_open=True)
    V.choice(agg, "agg", AGG_MODES)
    _check_norm_len(norm_len)
    dt = _compute_dtype(logp)
    logp_m = V.finite_sum(torch.where(m, logp, 0.0).to(dt), "logp", masked=True)        # [B,T] pads -> 0
    old_m = V.finite_sum(torch.where(m, old_logp.detach(), 0.0).to(dt), "old_logp", masked=True)
    if adv.dim() == 1:
        a = V.finite(adv, "adv").to(dt)[:, None]                                          # [B,1]
    else:
        a = V.finite_sum(torch.where(m, adv, 0.0).to(dt), "adv", masked=True)             # [B,T]
    return m, m.to(dt), m.sum(-1), logp_m, old_m, a


# ------------------------------------------------------------------------------------------------ policy term
def _pg_terms(logp_m: torch.Tensor, old_m: torch.Tensor, a: torch.Tensor, mf: torch.Tensor, clip_low: float,
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


def _floats(d: dict) -> dict:
    """Detached 0-d tensors -> python floats with a single device sync."""
    keys = list(d)
    vals = torch.stack([d[k].detach().to(torch.float64).reshape(()) for k in keys]).tolist()
    return dict(zip(keys, vals))


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, clip_c: Optional[float] = 3.0,
                agg: str = "token-mean", ref_logp: Optional[torch.Tensor] = None, kl_coef: float = 0.0,
                entropy: Optional[torch.Tensor] = None, entropy_coef: float = 0.0, norm_len: Optional[int] = None
                ) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO clipped surrogate with clip-higher and dual clip (verl's "vanilla" policy loss).

        r    = exp(logp - old_logp)
        l    = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        l    = min(l, -A clip_c)                  where A < 0 and clip_c is not None (dual clip)
        L    = agg(l) + kl_coef * agg(k3) - entropy_coef * agg(H),   k3 = exp(ref - logp) - (ref - logp) - 1

    Args: logp [B,T] (with grad), old_logp [B,T], adv [B] or [B,T], mask [B,T]; ref_logp [B,T] only when
    kl_coef > 0; entropy [B,T] only when entropy_coef > 0. clip_c None disables the dual clip.
    info: pg_loss, loss, clipfrac (tokens where the clipped branch is active, verl's pg_clipfrac), approx_kl
    (token mean of old_logp - logp), dualclip_frac (verl's pg_clipfrac_lower), kl and entropy when used.
    Deviations: log r is clamped to [-20, 20] before exp (as verl); the k3 KL is not clamped (verl clamps to
    [-10, 10]); TRL has no dual clip (set clip_c=None to match it); bf16/fp16 inputs are computed in float32.
    """
    m, mf, n_tok, logp_m, old_m, a = _prepare(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg,
                                               norm_len)
    V.number(kl_coef, "kl_coef", lo=0.0)
    V.number(entropy_coef, "entropy_coef", lo=0.0)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("ref_logp: expected a [B,T] tensor when kl_coef > 0, got None")
        V.float_tensor(ref_logp, "ref_logp", shape=logp.shape, like="logp", where=m)
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy: expected a [B,T] tensor when entropy_coef > 0, got None")
        V.float_tensor(entropy, "entropy", shape=logp.shape, like="logp", where=m)
    dt = logp_m.dtype
    pg_mat, stats = _pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)   # [B,T]
    pg = _agg(pg_mat, m, agg, norm_len, n_tok)                           # scalar
    loss = pg
    if kl_coef > 0:
        d = torch.where(m, ref_logp, 0.0).to(dt) - logp_m                # [B,T] log(pi_ref / pi_theta), 0 on pads
        k3 = torch.exp(d) - d - 1.0                                      # [B,T] k3 estimator (0 on pads)
        kl = _agg(k3, m, agg, norm_len, n_tok)
        loss = loss + kl_coef * kl
        stats["kl"] = kl
    if entropy_coef > 0:
        ent = _agg(torch.where(m, entropy, 0.0).to(dt), m, agg, norm_len, n_tok)
        loss = loss - entropy_coef * ent
        stats["entropy"] = ent
    return loss, _floats({"pg_loss": pg, "loss": loss, **stats})


# ------------------------------------------------------------------------------------------------ CalibRL gate
def gate_full_side(gap: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """Bool [same as gap]: True where CalibRL's LeakyReLU is on its slope-1 side.

    gap = logp - e (token or row level); passed broadcastable to gap. x = -s gap with s = +1 passed, -1 failed;
    weight 1 iff x > 0: passed rows with logp < e, failed rows with logp > e. Otherwise weight = slope
    (x = 0 included, as torch.nn.functional.leaky_relu's gradient)."""
    return torch.where(passed, gap < 0, gap > 0)


def gate_fractions(gap: torch.Tensor, mask: torch.Tensor, passed: torch.Tensor, slope: float) -> dict:
    """Gate activation over the tokens in `mask` (bool [B,T]); gap = logp - e ([B,T] per token or [B,1] per row),
    passed bool [B,1]/[B,T]. The one definition behind calibrl_loss's info and probes.gate_activation.

    gate_tie_frac: share of the tokens with gap == 0 exactly (x = 0, e.g. a prefix shared with the expert);
    gate_passed_below / gate_passed_above: share of passed-row non-tie tokens on the weight-1 / slope side;
    gate_failed_above / gate_failed_below: share of failed-row non-tie tokens on the weight-1 / slope side;
    gate_weight_mean: mean gate weight (1 or slope, without |A|) over all tokens, ties included (weight = slope,
    the loss's own convention). None where no such tokens."""
    p = passed.expand_as(mask)
    full = mask & gate_full_side(gap, passed).expand_as(mask)             # [B,T] weight-1 side
    tie = mask & (gap == 0).expand_as(mask)                               # [B,T] x = 0 exactly
    counts = torch.stack([(mask & p).sum(), (full & p).sum(), (tie & p).sum(),
                          (mask & ~p).sum(), (full & ~p).sum(), (tie & ~p).sum()]).tolist()
    return _gate_dict(*counts, slope)


def _gate_dict(n_p: int, n_pf: int, n_pt: int, n_f: int, n_ff: int, n_ft: int, slope: float) -> dict:
    """Fractions from counts: tokens / weight-1 side / ties, of passed (n_p*) and failed (n_f*) rows."""
    frac = lambda k, tot: k / tot if tot else None
    n, n_full = n_p + n_f, n_pf + n_ff
    return {"gate_passed_below": frac(n_pf, n_p - n_pt), "gate_passed_above": frac(n_p - n_pt - n_pf, n_p - n_pt),
            "gate_failed_above": frac(n_ff, n_f - n_ft), "gate_failed_below": frac(n_f - n_ft - n_ff, n_f - n_ft),
            "gate_weight_mean": frac(n_full + slope * (n - n_full), n), "gate_tie_frac": frac(n_pt + n_ft, n)}


def expert_baseline(expert_logp: torch.Tensor, T: int, expert_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """e_t [B,T] for the token gap: expert_logp detached, 0 where expert_mask is False, cut or 0-padded to width T
    (the official code's e_t = 0 past the expert's end)."""
    e = expert_logp.detach()
    if expert_mask is not None:
        e = torch.where(expert_mask.bool(), e, 0.0)
    if e.shape[1] >= T:
        return e[:, :T]
    return F.pad(e, (0, T - e.shape[1]))


def calibrl_loss(logp: torch.Tensor, old_logp: torch.Tensor, expert_logp: torch.Tensor, adv: torch.Tensor,
                 mask: torch.Tensor, passed: torch.Tensor, *, slope: float = 0.5, guide_coef: float = 0.1,
                 weight: str = "abs-adv", gap: str = "token", clip_low: float = 0.2, clip_high: float = 0.2,
                 clip_c: Optional[float] = 3.0, agg: str = "token-mean", expert_mask: Optional[torch.Tensor] = None,
                 norm_len: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """CalibRL: dual-clip policy term plus the expert-calibrated LeakyReLU guidance term.

        s_i     = +1 if passed_i else -1
        g_{i,t} = -s_i (logp_{i,t} - e_{i,t})                      gap="token" (default, official code)
        l^guide = w_i LeakyReLU(g; slope),   w_i = |A_i| (weight="abs-adv") or 1 (weight="none")
        L       = agg(l^pg) + guide_coef * agg(l^guide)             l^pg as in policy_loss

    e_{i,t} = expert_logp detached (the expert's old log-probs under pi_old, aligned by token index), 0 where
    expert_mask is False and past the expert's width (official: 0 past the expert's end).
    gap="sequence" (the paper's notation, Delta_i = log pi(tau_i) - log pi(tau_expert)): computes
        Delta_i = sum_t mask logp_{i,t} - sum_t expert_mask e_{i,t}    (expert_mask defaults to all ones)
        L_i     = w_i LeakyReLU(-s_i Delta_i; slope)
    and spreads L_i evenly over row i's tokens (L_i / n_i per token) before `agg`; under token-mean this is
    sum_i L_i / sum_i n_i, so each token gets the same gradient size as under the token gap. gap="mean-token" is
    the same with both sums replaced by means (a length-robust variant). With adv [B,T], w_i is the row's token
    mean of |A|. In the sequence modes, expert_logp may be wider than logp (the whole expert is summed).
    Args: logp, old_logp, mask [B,T]; expert_logp [B,Te] (Te = T for the defaults; shorter is 0-padded, longer
    cut); adv [B] or [B,T]; passed [B] bool/{0,1}; slope in [0,1]; guide_coef >= 0.
    info: pg_loss, guide_loss (agg of l^guide, before guide_coef), loss, clipfrac, approx_kl, dualclip_frac,
    and the gate shares of gate_fractions: gate_tie_frac (tokens with logp == e exactly), gate_passed_below/above,
    gate_failed_above/below over the non-tie tokens, gate_weight_mean over all unmasked tokens.

    Deviations from the official code: none in the defaults' math, except (a) at t = L_e (the expert's EOS + 1)
    the official remove-padding path holds one junk log-prob; here it holds whatever expert_logp holds there
    (0 if expert_mask excludes it); (b) the official loss is divided by the gradient-accumulation count outside
    the loss (not done here); (c) clip statistics are over on-policy tokens only (official: also expert rows);
    (d) log r is clamped to [-20, 20] as verl; (e) old_logp and expert_logp are detached here (the official code
    gets them from a no-grad pass). Deviations from the paper: the default gap is per token by index
    with a detached pi_old expert side (paper: sequence-level, pi_theta on both sides, no KL term; the sequence
    option keeps the expert side detached).
    """
    m, mf, n_tok, logp_m, old_m, a = _prepare(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg,
                                               norm_len)
    B, T = logp.shape
    V.tensor(expert_logp, "expert_logp", ndim=2)
    V.floating(expert_logp, "expert_logp")
    if expert_logp.shape[0] != B:
        raise ValueError(f"expert_logp: expected {B} rows like logp, got shape {tuple(expert_logp.shape)}")
    em = None
    if expert_mask is not None:
        em = V.mask(expert_mask, "expert_mask", expert_logp.shape, like="expert_logp", allow_empty=True)
    V.tensor(passed, "passed", shape=(B,), like="logp rows")
    p = V.binary(passed, "passed")[:, None]                               # [B,1] bool
    V.number(slope, "slope", lo=0.0, hi=1.0)
    V.number(guide_coef, "guide_coef", lo=0.0)
    V.choice(weight, "weight", WEIGHTS)
    V.choice(gap, "gap", GAPS)

    dt = logp_m.dtype
    pg_mat, stats = _pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)    # [B,T]
    neg_s = 1.0 - 2.0 * p.to(dt)                                           # [B,1] -s: -1 passed, +1 failed
    w = (a.abs() * mf) if weight == "abs-adv" else mf                      # [B,T] |A| (0 outside the mask)
    if gap == "token":
        e = expert_baseline(expert_logp, T, em).to(dt)                     # [B,T] e_t, detached
        V.finite_sum(e, "expert_logp", masked=em is not None)
        gap_t = logp_m - e                                                 # [B,T] logp - e_t
        x = neg_s * gap_t                                                  # [B,T] -s (logp - e_t)
        guide_mat = w * F.leaky_relu(x, slope)                             # [B,T]
    else:
        e = expert_logp.detach().to(dt)
        ef = em.to(dt) if em is not None else torch.ones_like(e)
        e = V.finite_sum(torch.where(ef > 0, e, 0.0), "expert_logp", masked=em is not None)
        pol_seq = logp_m.sum(-1)                                           # [B] log pi(tau_i)
        exp_seq = e.sum(-1)                                                # [B] log pi_old(tau_expert)
        if gap == "mean-token":
            pol_seq = pol_seq / n_tok.clamp(min=1)
            exp_seq = exp_seq / ef.sum(-1).clamp(min=1)
        gap_t = (pol_seq - exp_seq)[:, None]                               # [B,1] Delta_i
        x = neg_s * gap_t                                                  # [B,1] -s Delta_i
        w_row = (w.sum(-1) / n_tok.clamp(min=1))[:, None]                  # [B,1] row mean of |A| (or 1)
        row_loss = w_row * F.leaky_relu(x, slope)                          # [B,1] L_i
        guide_mat = (row_loss / n_tok.clamp(min=1)[:, None]) * mf          # [B,T] L_i / n_i on row i's tokens
    pg = _agg(pg_mat, m, agg, norm_len, n_tok)                             # scalar
    guide = _agg(guide_mat, m, agg, norm_len, n_tok)                       # scalar
    loss = pg + guide_coef * guide
    info = _floats({"pg_loss": pg, "guide_loss": guide, "loss": loss, **stats})
    with torch.no_grad():
        info.update(gate_fractions(gap_t, m, p, slope))
    return loss, info


from calibrl.losses_hybrid import luffy_loss, rlplus_loss  # noqa: E402  (re-export)

__all__ = ["aggregate", "policy_loss", "calibrl_loss", "luffy_loss", "rlplus_loss", "gate_full_side",
           "gate_fractions", "expert_baseline", "AGG_MODES"]
