"""GRPO-family policy loss and the CalibRL loss, written like their equations.

Shapes: B on-policy rows, T response tokens; `mask` [B,T] is true on real response tokens. Every loss returns
(loss, info) with `info` a dict of python floats. Positions outside `mask` are replaced by 0 with torch.where before
any arithmetic, so -inf log-probs at padded positions never produce NaN (in the value or the gradient).
Each public function validates its inputs (calibrl._validate: shapes, one device, one floating dtype, binary masks,
finite values, log-probs <= 0) and calls the unchecked kernel of calibrl._kernels, re-exported here as
*_kernel for training loops that validated their batch once. bf16/fp16 inputs are computed in float32.
LUFFY and RL-PLUS live in calibrl.losses_hybrid (which imports calibrl._kernels, never this module) and are
re-exported here.
"""
from __future__ import annotations

from typing import Optional

import torch

from calibrl import _kernels as K
from calibrl import _validate as V
from calibrl._kernels import aggregate_kernel, calibrl_loss_kernel, policy_loss_kernel
from calibrl.losses_hybrid import luffy_loss, luffy_loss_kernel, rlplus_loss, rlplus_loss_kernel

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
WEIGHTS = ("abs-adv", "none")
GAPS = ("token", "sequence", "mean-token")
GATE_KEYS = ("gate_passed_below", "gate_passed_above", "gate_failed_above", "gate_failed_below", "gate_weight_mean",
             "gate_tie_frac")


# ------------------------------------------------------------------------------------------------ aggregation
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
    Returns a 0-d tensor (float32 for bf16/fp16 loss_mat, which is summed in float32).
    """
    V.tensor(loss_mat, "loss_mat", ndim=2)
    V.floating(loss_mat, "loss_mat")
    V.mask_like(mask, "mask", loss_mat, "loss_mat")
    V.choice(mode, "mode", AGG_MODES)
    if norm_len is not None:
        V.int_arg(norm_len, "norm_len")
    m = V.mask_values(mask, "mask")
    V.finite(loss_mat, "loss_mat", m)
    return aggregate_kernel(loss_mat, m, mode, norm_len=norm_len)


# ------------------------------------------------------------------------------------------------ policy term
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
    [-10, 10]); TRL has no dual clip (set clip_c=None to match it); bf16/fp16 inputs are computed in float32;
    old_logp, adv and ref_logp are detached (constants of the surrogate; entropy keeps its gradient).
    """
    m = V.policy_args(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg, norm_len, AGG_MODES)
    V.number(kl_coef, "kl_coef", lo=0.0)
    V.number(entropy_coef, "entropy_coef", lo=0.0)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("ref_logp: expected a [B,T] tensor when kl_coef > 0, got None")
        V.float_like(ref_logp, "ref_logp", logp, "logp", shape=logp.shape)
        V.logprob_values(ref_logp, "ref_logp", m)
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy: expected a [B,T] tensor when entropy_coef > 0, got None")
        V.float_like(entropy, "entropy", logp, "logp", shape=logp.shape)
        V.finite(entropy, "entropy", m)
        V.nonneg(entropy, "entropy", m)
    return policy_loss_kernel(logp, old_logp, adv, m, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c,
                              agg=agg, ref_logp=ref_logp, kl_coef=kl_coef, entropy=entropy,
                              entropy_coef=entropy_coef, norm_len=norm_len)


# ------------------------------------------------------------------------------------------------ CalibRL gate
def gate_full_side(gap: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """Bool [broadcast of gap and passed]: True where CalibRL's LeakyReLU is on its slope-1 side.

    gap = logp - e (token [B,T] or row [B,1] level); passed bool/{0,1} [B,1] or gap's shape. x = -s gap with
    s = +1 passed, -1 failed; weight 1 iff x > 0: passed rows with logp < e, failed rows with logp > e. Otherwise
    weight = slope (x = 0 included, as torch.nn.functional.leaky_relu's gradient)."""
    V.tensor(gap, "gap", ndim=2)
    V.floating(gap, "gap")
    p = _gate_passed(passed, gap, gap.shape)
    V.finite(gap, "gap")
    return K.gate_full_side(gap, p)


def _gate_passed(passed, gap: torch.Tensor, shape) -> torch.Tensor:
    """passed: [B,1] or `shape` ([B,T]), on gap's device, binary; returns it as bool."""
    V.tensor(passed, "passed", ndim=2)
    if passed.shape[0] != shape[0] or passed.shape[1] not in (1, shape[1]):
        raise ValueError(f"passed: expected shape ({shape[0]}, 1) or {tuple(shape)}, got {tuple(passed.shape)}")
    V.mask_like(passed, "passed", gap, "gap", shape=passed.shape)
    return V.binary(passed, "passed")


def gate_fractions(gap: torch.Tensor, mask: torch.Tensor, passed: torch.Tensor, slope: float) -> dict:
    """Gate activation over the tokens in `mask` (bool [B,T]); gap = logp - e ([B,T] per token or [B,1] per row),
    passed bool [B,1]/[B,T]. The one definition behind calibrl_loss's info and probes.gate_activation.

    gate_tie_frac: share of the tokens with gap == 0 exactly (x = 0, e.g. a prefix shared with the expert);
    gate_passed_below / gate_passed_above: share of passed-row non-tie tokens on the weight-1 / slope side;
    gate_failed_above / gate_failed_below: share of failed-row non-tie tokens on the weight-1 / slope side;
    gate_weight_mean: mean gate weight (1 or slope, without |A|) over all tokens, ties included (weight = slope,
    the loss's own convention). None where no such tokens."""
    V.tensor(gap, "gap", ndim=2)
    V.floating(gap, "gap")
    V.tensor(mask, "mask", ndim=2)
    if mask.shape[0] != gap.shape[0] or gap.shape[1] not in (1, mask.shape[1]):
        want = f"({gap.shape[0]}, T) for any T" if gap.shape[1] == 1 else str(tuple(gap.shape))
        raise ValueError(f"mask: expected shape {want} like gap, got {tuple(mask.shape)}")
    V.mask_like(mask, "mask", gap, "gap", shape=mask.shape)
    p = _gate_passed(passed, gap, mask.shape)
    V.number(slope, "slope", lo=0.0, hi=1.0)
    m = V.mask_values(mask, "mask", allow_empty=True)
    V.finite(gap, "gap", m if gap.shape == m.shape else m.any(-1, keepdim=True))
    return K.gate_fractions(gap, m, p, float(slope))


def expert_baseline(expert_logp: torch.Tensor, T: int, expert_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """e_t [B,T] for the token gap: expert_logp detached, 0 where expert_mask is False, cut or 0-padded to width T
    (the official code's e_t = 0 past the expert's end)."""
    V.tensor(expert_logp, "expert_logp", ndim=2)
    V.floating(expert_logp, "expert_logp")
    V.int_arg(T, "T", lo=0)
    em = None
    if expert_mask is not None:
        V.mask_like(expert_mask, "expert_mask", expert_logp, "expert_logp")
        em = V.mask_values(expert_mask, "expert_mask", allow_empty=True)
    V.logprob_values(expert_logp, "expert_logp", em)
    return K.expert_baseline(expert_logp, T, em)


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
    (d) log r is clamped to [-20, 20] as verl; (e) old_logp, adv and expert_logp are detached here (the official code
    gets them from a no-grad pass). Deviations from the paper: the default gap is per token by index
    with a detached pi_old expert side (paper: sequence-level, pi_theta on both sides, no KL term; the sequence
    option keeps the expert side detached).
    """
    B, T = V.expert_pair(logp, expert_logp, expert_mask)
    V.mask_like(passed, "passed", logp, "logp rows", shape=(B,))
    m = V.policy_args(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg, norm_len, AGG_MODES)
    em = None if expert_mask is None else V.mask_values(expert_mask, "expert_mask", allow_empty=True)
    p = V.binary(passed, "passed")                                         # [B] bool
    V.number(slope, "slope", lo=0.0, hi=1.0)
    V.number(guide_coef, "guide_coef", lo=0.0)
    V.choice(weight, "weight", WEIGHTS)
    V.choice(gap, "gap", GAPS)
    if gap == "token" and em is None:                                      # only the first T columns are used
        V.logprob_values(expert_logp[:, :T], "expert_logp")
    else:
        V.logprob_values(expert_logp, "expert_logp", em)
    return calibrl_loss_kernel(logp, old_logp, expert_logp, adv, m, p, slope=slope, guide_coef=guide_coef,
                               weight=weight, gap=gap, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c,
                               agg=agg, expert_mask=em, norm_len=norm_len)


__all__ = ["aggregate", "policy_loss", "calibrl_loss", "luffy_loss", "rlplus_loss", "gate_full_side",
           "gate_fractions", "expert_baseline", "AGG_MODES", "WEIGHTS", "GAPS", "GATE_KEYS", "aggregate_kernel",
           "policy_loss_kernel", "calibrl_loss_kernel", "luffy_loss_kernel", "rlplus_loss_kernel"]
