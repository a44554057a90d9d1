"""LUFFY and RL-PLUS losses (hybrid-policy baselines that train on expert tokens), as in CalibRL's official
`luffy` and `rlplus` modes. Expert rows are passed explicitly: expert_logp_theta [E,Te] (with grad),
expert_adv [E] or [E,Te], expert_mask [E,Te]. Re-exported by calibrl.losses (this module imports only
calibrl._kernels and calibrl._validate: one-way). Each public loss validates and calls its *_kernel."""
from __future__ import annotations

from typing import Optional

import torch

from calibrl import _kernels as K
from calibrl import _validate as V

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _check_expert(logp: torch.Tensor, expert_logp_theta, expert_adv, expert_mask, expert_old_logp=None
                  ) -> torch.Tensor:
    """Validate the expert rows (structure first, then values); returns the bool expert mask [E,Te]."""
    V.tensor(logp, "logp", ndim=2)
    V.floating(logp, "logp")
    V.float_like(expert_logp_theta, "expert_logp_theta", logp, "logp", ndim=2)
    if expert_mask is None:
        raise ValueError("expert_mask: expected a [E,Te] bool/{0,1} tensor like expert_logp_theta, got None")
    V.mask_like(expert_mask, "expert_mask", expert_logp_theta, "expert_logp_theta")
    E = expert_logp_theta.shape[0]
    V.float_like(expert_adv, "expert_adv", logp, "logp", ndim=(1, 2))
    want = (E,) if expert_adv.dim() == 1 else tuple(expert_logp_theta.shape)
    V.tensor(expert_adv, "expert_adv", shape=want, like="expert_logp_theta rows")
    if expert_old_logp is not None:
        V.float_like(expert_old_logp, "expert_old_logp", logp, "logp", shape=expert_logp_theta.shape)
    em = V.mask_values(expert_mask, "expert_mask", allow_empty=True)
    V.logprob_values(expert_logp_theta, "expert_logp_theta", em)
    V.finite(expert_adv, "expert_adv", em if expert_adv.dim() == 2 else None)
    if expert_old_logp is not None:
        V.logprob_values(expert_old_logp, "expert_old_logp", em)
    return em


def _expert_adv(expert_adv: torch.Tensor, em: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Expert advantage [E,1] or [E,Te] (0 outside em), detached (a constant of the loss), in dtype dt."""
    ea = expert_adv.detach()
    return (ea[:, None] if ea.dim() == 1 else torch.where(em, ea, 0.0)).to(dt)


def luffy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
               expert_logp_theta: torch.Tensor, expert_adv: torch.Tensor, expert_mask: torch.Tensor, *,
               gamma: float = 0.1, clip_low: float = 0.2, clip_high: float = 0.2, clip_c: Optional[float] = 3.0,
               agg: str = "token-mean", norm_len: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """LUFFY: clipped surrogate on on-policy tokens, policy shaping f(p) = p / (p + gamma) on expert tokens.

        on-policy  l_{i,t} = dual-clip PPO term (as policy_loss)
        expert     l_{j,t} = -A_j f(pi_theta(y_{j,t})),   f(p) = p / (p + gamma),  p = exp(expert_logp_theta)
        L          = agg over the union of on-policy and expert rows (rows padded to width max(T, Te))

    No ratio and no clipping on expert tokens (behaviour probability taken as 1); the gradient of f is
    gamma / (p + gamma)^2 * grad p, which emphasises low-probability expert tokens.
    Args: logp, old_logp, mask [B,T]; adv [B] or [B,T]; expert_logp_theta [E,Te] with grad; expert_adv [E] or
    [E,Te]; expert_mask [E,Te] (E may be 0); gamma > 0.
    info: pg_loss (agg of on-policy rows alone), expert_loss (agg of expert rows alone, None without expert
    tokens), loss, clipfrac, approx_kl, dualclip_frac (on-policy tokens).
    Deviations: as CalibRL's `luffy` mode, the expert reward is excluded from the group statistics (original
    LUFFY includes it; compute expert_adv accordingly); no prefix-guidance or entropy regularisation of LUFFY.
    old_logp, adv and expert_adv are detached (constants); bf16/fp16 inputs are computed in float32.
    """
    em = _check_expert(logp, expert_logp_theta, expert_adv, expert_mask)
    m = V.policy_args(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg, norm_len, AGG_MODES)
    V.number(gamma, "gamma", lo=0.0, lo_open=True)
    return luffy_loss_kernel(logp, old_logp, adv, m, expert_logp_theta, expert_adv, em, gamma=gamma,
                             clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, agg=agg, norm_len=norm_len)


def luffy_loss_kernel(logp, old_logp, adv, mask, expert_logp_theta, expert_adv, expert_mask, *, gamma=0.1,
                      clip_low=0.2, clip_high=0.2, clip_c=3.0, agg="token-mean", norm_len=None):
    """luffy_loss without validation (mask and expert_mask bool)."""
    m, em = mask, expert_mask
    mf, n_tok, logp_m, old_m, a = K.masked_inputs(logp, old_logp, adv, m)
    dt = logp_m.dtype
    on_mat, stats = K.pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)  # [B,T]
    p_e = torch.exp(torch.where(em, expert_logp_theta, 0.0).to(dt))        # [E,Te] pi_theta of expert tokens
    shaped = p_e / (p_e + gamma)                                           # [E,Te] f(p)
    off_mat = torch.where(em, -_expert_adv(expert_adv, em, dt) * shaped, 0.0)   # [E,Te]
    loss = K.agg_union(on_mat, m, off_mat, em, agg, norm_len)
    pg = K.agg_mat(on_mat, m, agg, norm_len, n_tok)
    info = K.floats({"pg_loss": pg, "loss": loss, **stats})
    info["expert_loss"] = float(K.agg_mat(off_mat, em, agg, norm_len).detach()) if bool(em.any()) else None
    return loss, info


def rlplus_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                expert_logp_theta: torch.Tensor, expert_old_logp: torch.Tensor, expert_adv: torch.Tensor,
                expert_mask: torch.Tensor, *, gamma: float = 0.5, clip_low: float = 0.2, clip_high: float = 0.2,
                clip_c: Optional[float] = 3.0, agg: str = "token-mean", norm_len: Optional[int] = None
                ) -> tuple[torch.Tensor, dict]:
    """RL-PLUS: multiple-importance-sampling ratio and exploration-based advantage on expert tokens.

        on-policy  l_{i,t} = dual-clip PPO term (as policy_loss)
        expert     pi_omega = (pi_old + 1) / 2                     (proxy for the unknown expert policy)
                   r_{j,t}  = pi_theta / (pi_old / 2 + pi_omega / 2) = pi_theta / (0.75 pi_old + 0.25)
                   A'_{j,t} = A_j (1 - sg(pi_theta))^gamma          (gamma = 0.5 in the official code)
                   l_{j,t}  = -A'_{j,t} r_{j,t}                     (unclipped)
        L          = agg over the union of on-policy and expert rows (rows padded to width max(T, Te))

    Here `gamma` is RL-PLUS's exploration exponent (not LUFFY's shaping constant).
    Args: as luffy_loss plus expert_old_logp [E,Te] (the expert tokens' log-probs under pi_old).
    info: pg_loss, expert_loss, loss, clipfrac, approx_kl, dualclip_frac (on-policy tokens), expert_ratio_mean.
    Deviations: the expert reward is excluded from the group statistics (as RL-PLUS's and CalibRL's code);
    the ratio is computed as exp(logp - log(0.75 exp(old) + 0.25)) for stability (same value); old_logp, adv,
    expert_old_logp and expert_adv are detached (constants); bf16/fp16 inputs are computed in float32.
    """
    em = _check_expert(logp, expert_logp_theta, expert_adv, expert_mask, expert_old_logp)
    if expert_old_logp is None:
        raise ValueError("expert_old_logp: expected a [E,Te] tensor like expert_logp_theta, got None")
    m = V.policy_args(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg, norm_len, AGG_MODES)
    V.number(gamma, "gamma", lo=0.0)
    return rlplus_loss_kernel(logp, old_logp, adv, m, expert_logp_theta, expert_old_logp, expert_adv, em,
                              gamma=gamma, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, agg=agg,
                              norm_len=norm_len)


def rlplus_loss_kernel(logp, old_logp, adv, mask, expert_logp_theta, expert_old_logp, expert_adv, expert_mask, *,
                       gamma=0.5, clip_low=0.2, clip_high=0.2, clip_c=3.0, agg="token-mean", norm_len=None):
    """rlplus_loss without validation (mask and expert_mask bool)."""
    m, em = mask, expert_mask
    mf, n_tok, logp_m, old_m, a = K.masked_inputs(logp, old_logp, adv, m)
    dt = logp_m.dtype
    on_mat, stats = K.pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)  # [B,T]
    lp_e = torch.where(em, expert_logp_theta, 0.0).to(dt)                  # [E,Te]
    old_e = torch.where(em, expert_old_logp.detach(), 0.0).to(dt)          # [E,Te] a constant: detached
    log_mix = torch.log(0.75 * torch.exp(old_e) + 0.25)                    # [E,Te] log(pi_old/2 + pi_omega/2)
    ratio_e = torch.exp(lp_e - log_mix)                                    # [E,Te] MIS ratio
    explore = (1.0 - torch.exp(lp_e.detach())).clamp(min=0.0) ** gamma    # [E,Te] (1 - sg(pi_theta))^gamma
    adv_e = _expert_adv(expert_adv, em, dt) * explore                      # [E,Te] exploration adv
    off_mat = torch.where(em, -adv_e * ratio_e, 0.0)                       # [E,Te]
    loss = K.agg_union(on_mat, m, off_mat, em, agg, norm_len)
    pg = K.agg_mat(on_mat, m, agg, norm_len, n_tok)
    info = K.floats({"pg_loss": pg, "loss": loss, **stats})
    has_e = bool(em.any())
    info["expert_loss"] = float(K.agg_mat(off_mat, em, agg, norm_len).detach()) if has_e else None
    info["expert_ratio_mean"] = float(torch.where(em, ratio_e.detach(), 0.0).sum() / em.sum()) if has_e else None
    return loss, info
