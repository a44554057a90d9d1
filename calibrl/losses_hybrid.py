"""LUFFY and RL-PLUS losses (hybrid-policy baselines that train on expert tokens), as in CalibRL's official
`luffy` and `rlplus` modes. Expert rows are passed explicitly: expert_logp_theta [E,Te] (with grad),
expert_adv [E] or [E,Te], expert_mask [E,Te]. Re-exported by calibrl.losses."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from calibrl import _validate as V
from calibrl.losses import _agg, _floats, _pg_terms, _prepare


def _check_expert(logp: torch.Tensor, expert_logp_theta, expert_adv, expert_mask, expert_old_logp=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the expert rows; returns (bool expert mask [E,Te], expert advantage [E,1] or [E,Te])."""
    V.tensor(expert_logp_theta, "expert_logp_theta", ndim=2)
    V.floating(expert_logp_theta, "expert_logp_theta")
    if expert_mask is None:
        raise ValueError("expert_mask: expected a [E,Te] bool/{0,1} tensor like expert_logp_theta, got None")
    em = V.mask(expert_mask, "expert_mask", expert_logp_theta.shape, like="expert_logp_theta", allow_empty=True)
    V.finite(expert_logp_theta, "expert_logp_theta", em)
    E = expert_logp_theta.shape[0]
    V.tensor(expert_adv, "expert_adv", ndim=(1, 2))
    V.floating(expert_adv, "expert_adv")
    want = (E,) if expert_adv.dim() == 1 else tuple(expert_logp_theta.shape)
    V.tensor(expert_adv, "expert_adv", shape=want, like="expert_logp_theta rows")
    V.finite(expert_adv, "expert_adv", em if expert_adv.dim() == 2 else None)
    if expert_old_logp is not None:
        V.float_tensor(expert_old_logp, "expert_old_logp", shape=expert_logp_theta.shape,
                       like="expert_logp_theta", where=em)
    ea = expert_adv[:, None] if expert_adv.dim() == 1 else torch.where(em, expert_adv, 0.0)
    return em, ea


def _agg_union(on_mat: torch.Tensor, m: torch.Tensor, off_mat: torch.Tensor, em: torch.Tensor, agg: str,
               norm_len: Optional[int]) -> torch.Tensor:
    """Aggregate on-policy [B,T] and expert [E,Te] loss matrices as one batch of rows of width max(T, Te)."""
    W = max(on_mat.shape[1], off_mat.shape[1])
    pad = lambda x: F.pad(x, (0, W - x.shape[1]))
    mat = torch.cat([pad(on_mat), pad(off_mat.to(on_mat.dtype))])
    mask = torch.cat([pad(m), pad(em)])
    return _agg(mat, mask, agg, norm_len)


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
    """
    m, mf, n_tok, logp_m, old_m, a = _prepare(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg,
                                               norm_len)
    em, ea = _check_expert(logp, expert_logp_theta, expert_adv, expert_mask)
    V.number(gamma, "gamma", lo=0.0, lo_open=True)
    dt = logp_m.dtype
    on_mat, stats = _pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)   # [B,T]
    p_e = torch.exp(torch.where(em, expert_logp_theta, 0.0).to(dt))        # [E,Te] pi_theta of expert tokens
    shaped = p_e / (p_e + gamma)                                           # [E,Te] f(p)
    off_mat = torch.where(em, -ea.to(dt) * shaped, 0.0)                    # [E,Te]
    loss = _agg_union(on_mat, m, off_mat, em, agg, norm_len)
    pg = _agg(on_mat, m, agg, norm_len, n_tok)
    info = _floats({"pg_loss": pg, "loss": loss, **stats})
    info["expert_loss"] = float(_agg(off_mat, em, agg, norm_len).detach()) if bool(em.any()) else None
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
    the ratio is computed as exp(logp - log(0.75 exp(old) + 0.25)) for stability (same value).
    """
    m, mf, n_tok, logp_m, old_m, a = _prepare(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg,
                                               norm_len)
    em, ea = _check_expert(logp, expert_logp_theta, expert_adv, expert_mask, expert_old_logp)
    V.number(gamma, "gamma", lo=0.0)
    dt = logp_m.dtype
    on_mat, stats = _pg_terms(logp_m, old_m, a, mf, clip_low, clip_high, clip_c)   # [B,T]
    lp_e = torch.where(em, expert_logp_theta, 0.0).to(dt)                  # [E,Te]
    old_e = torch.where(em, expert_old_logp, 0.0).to(dt)                   # [E,Te]
    log_mix = torch.log(0.75 * torch.exp(old_e) + 0.25)                    # [E,Te] log(pi_old/2 + pi_omega/2)
    ratio_e = torch.exp(lp_e - log_mix)                                    # [E,Te] MIS ratio
    adv_e = ea.to(dt) * (1.0 - torch.exp(lp_e.detach())).clamp(min=0.0) ** gamma   # [E,Te] exploration adv
    off_mat = torch.where(em, -adv_e * ratio_e, 0.0)                       # [E,Te]
    loss = _agg_union(on_mat, m, off_mat, em, agg, norm_len)
    pg = _agg(on_mat, m, agg, norm_len, n_tok)
    info = _floats({"pg_loss": pg, "loss": loss, **stats})
    has_e = bool(em.any())
    info["expert_loss"] = float(_agg(off_mat, em, agg, norm_len).detach()) if has_e else None
    info["expert_ratio_mean"] = float((ratio_e.detach() * em).sum() / em.sum()) if has_e else None
    return loss, info
