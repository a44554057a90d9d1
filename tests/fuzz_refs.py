"""Reference implementations of the public tensor API for the fuzz campaign (tests/fuzz_cases.py).

Written independently of calibrl: float64, python loops over rows, verl's max/min form of the clipped surrogate
(calibrl uses one clamp), explicit per-row token lists for the aggregation. Differentiable in the variable
argument (logp / loss_mat / expert_logp_theta) so gradients can be compared too.
"""
import math

import torch
import torch.nn.functional as F

D = torch.float64


def _rows(mat, m):
    """Masked values of each row (list of 1-D float64 tensors)."""
    return [mat[i][m[i]] for i in range(mat.shape[0])]


def agg_rows(rows, mode, width, norm_len):
    """Aggregate a list of per-row token-loss vectors (verl's four modes)."""
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(r.sum() for r in rows) / max(n, 1)
    if mode == "seq-mean-token-sum-norm":
        return sum(r.sum() for r in rows) / (norm_len if norm_len is not None else width)
    kept = [r for r in rows if len(r)]
    per = [r.mean() if mode == "seq-mean-token-mean" else r.sum() for r in kept]
    return sum(per) / max(len(per), 1)


def aggregate(loss_mat, mask, mode, norm_len=None):
    m = mask.bool()
    return agg_rows(_rows(loss_mat.to(D), m), mode, loss_mat.shape[1], norm_len)


def _adv_mat(adv, shape):
    a = adv.detach().to(D)
    return a[:, None].expand(shape) if a.dim() == 1 else a


def _pg_mat(lp, old, a, clip_low, clip_high, clip_c):
    r = torch.exp((lp - old).clamp(-20, 20))
    l1 = torch.max(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
    if clip_c is not None:
        l1 = torch.where(a < 0, torch.min(l1, -a * clip_c), l1)
    return l1


def _masked64(x, m):
    return torch.where(m, x.to(D), torch.zeros((), dtype=D))


def policy(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.2, clip_c=3.0, agg="token-mean", ref_logp=None,
           kl_coef=0.0, entropy=None, entropy_coef=0.0, norm_len=None):
    m = mask.bool()
    lp, old = _masked64(logp, m), _masked64(old_logp.detach(), m)
    a = _adv_mat(torch.where(m, adv, 0) if adv.dim() == 2 else adv, logp.shape)
    T = logp.shape[1]
    pg = agg_rows(_rows(_pg_mat(lp, old, a, clip_low, clip_high, clip_c), m), agg, T, norm_len)
    loss = pg
    if kl_coef > 0:
        d = _masked64(ref_logp.detach(), m) - lp
        loss = loss + kl_coef * agg_rows(_rows(torch.exp(d) - d - 1, m), agg, T, norm_len)
    if entropy_coef > 0:
        loss = loss - entropy_coef * agg_rows(_rows(_masked64(entropy, m), m), agg, T, norm_len)
    return loss, {"pg_loss": float(pg.detach()), "loss": float(loss.detach())}


def gate_counts(gap, m, passed):
    """Gate fractions by counting tokens one by one (gap [B,T] or [B,1] float64, m bool [B,T], passed [B])."""
    c = {"p": 0, "pf": 0, "pt": 0, "f": 0, "ff": 0, "ft": 0}
    for i in range(m.shape[0]):
        for t in range(m.shape[1]):
            if not m[i, t]:
                continue
            g = float(gap[i, t if gap.shape[1] > 1 else 0])
            k = "p" if bool(passed[i]) else "f"
            c[k] += 1
            c[k + "t"] += g == 0
            c[k + "f"] += (g < 0) if k == "p" else (g > 0)
    return c


def gate_dict(c, slope):
    fr = lambda a, b: a / b if b else None
    n, full = c["p"] + c["f"], c["pf"] + c["ff"]
    return {"gate_passed_below": fr(c["pf"], c["p"] - c["pt"]),
            "gate_passed_above": fr(c["p"] - c["pt"] - c["pf"], c["p"] - c["pt"]),
            "gate_failed_above": fr(c["ff"], c["f"] - c["ft"]),
            "gate_failed_below": fr(c["f"] - c["ft"] - c["ff"], c["f"] - c["ft"]),
            "gate_weight_mean": fr(full + slope * (n - full), n), "gate_tie_frac": fr(c["pt"] + c["ft"], n)}


def expert_baseline(expert_logp, T, expert_mask=None):
    B, te = expert_logp.shape
    out = torch.zeros(B, T, dtype=D)
    for i in range(B):
        for t in range(min(T, te)):
            if expert_mask is None or bool(expert_mask[i, t]):
                out[i, t] = float(expert_logp[i, t])
    return out


def calibrl(logp, old_logp, expert_logp, adv, mask, passed, slope=0.5, guide_coef=0.1, weight="abs-adv",
            gap="token", clip_low=0.2, clip_high=0.2, clip_c=3.0, agg="token-mean", expert_mask=None, norm_len=None):
    m = mask.bool()
    B, T = logp.shape
    lp, old = _masked64(logp, m), _masked64(old_logp.detach(), m)
    a = _adv_mat(torch.where(m, adv, 0) if adv.dim() == 2 else adv, logp.shape)
    s = torch.where(passed.bool(), 1.0, -1.0).to(D)[:, None]
    w = a.abs() if weight == "abs-adv" else torch.ones_like(a)
    em = None if expert_mask is None else expert_mask.bool()
    if gap == "token":
        g = lp - expert_baseline(expert_logp, T, em)
        guide = w * F.leaky_relu(-s * g, slope)
    else:
        e = expert_logp.detach().to(D)
        e = torch.where(em, e, 0.0) if em is not None else e
        n = m.sum(-1).to(D)
        pol, ex = lp.sum(-1), e.sum(-1)
        if gap == "mean-token":
            ne = em.sum(-1).to(D) if em is not None else torch.full((B,), float(e.shape[1]), dtype=D)
            pol, ex = pol / n.clamp(min=1), ex / ne.clamp(min=1)
        g = (pol - ex)[:, None]
        w_row = torch.stack([w[i][m[i]].mean() if m[i].any() else w.new_zeros(()) for i in range(B)])[:, None]
        guide = (w_row * F.leaky_relu(-s * g, slope) / n.clamp(min=1)[:, None]).expand(B, T)
    pg = agg_rows(_rows(_pg_mat(lp, old, a, clip_low, clip_high, clip_c), m), agg, T, norm_len)
    gd = agg_rows(_rows(guide, m), agg, T, norm_len)
    loss = pg + guide_coef * gd
    info = {"pg_loss": float(pg.detach()), "guide_loss": float(gd.detach()), "loss": float(loss.detach())}
    info.update(gate_dict(gate_counts(g.detach(), m, passed), slope))
    return loss, info


def _union(on_mat, m, off_mat, em, agg, norm_len):
    W = max(on_mat.shape[1], off_mat.shape[1])
    return agg_rows(_rows(on_mat, m) + _rows(off_mat, em), agg, W, norm_len)


def luffy(logp, old_logp, adv, mask, e_lp, e_adv, e_mask, gamma=0.1, clip_low=0.2, clip_high=0.2, clip_c=3.0,
          agg="token-mean", norm_len=None):
    m, em = mask.bool(), e_mask.bool()
    lp, old = _masked64(logp, m), _masked64(old_logp.detach(), m)
    on = _pg_mat(lp, old, _adv_mat(torch.where(m, adv, 0) if adv.dim() == 2 else adv, logp.shape),
                 clip_low, clip_high, clip_c)
    p = torch.exp(_masked64(e_lp, em))
    off = -_adv_mat(torch.where(em, e_adv, 0) if e_adv.dim() == 2 else e_adv, e_lp.shape) * p / (p + gamma)
    loss = _union(on, m, off, em, agg, norm_len)
    return loss, {"pg_loss": float(agg_rows(_rows(on, m), agg, logp.shape[1], norm_len).detach()),
                  "loss": float(loss.detach())}


def rlplus(logp, old_logp, adv, mask, e_lp, e_old, e_adv, e_mask, gamma=0.5, clip_low=0.2, clip_high=0.2,
           clip_c=3.0, agg="token-mean", norm_len=None):
    m, em = mask.bool(), e_mask.bool()
    lp, old = _masked64(logp, m), _masked64(old_logp.detach(), m)
    on = _pg_mat(lp, old, _adv_mat(torch.where(m, adv, 0) if adv.dim() == 2 else adv, logp.shape),
                 clip_low, clip_high, clip_c)
    le, oe = _masked64(e_lp, em), _masked64(e_old.detach(), em)
    ratio = torch.exp(le) / (0.75 * torch.exp(oe) + 0.25)
    ea = _adv_mat(torch.where(em, e_adv, 0) if e_adv.dim() == 2 else e_adv, e_lp.shape)
    off = -ea * (1 - torch.exp(le.detach())).clamp(min=0) ** gamma * ratio
    loss = _union(on, m, off, em, agg, norm_len)
    return loss, {"pg_loss": float(agg_rows(_rows(on, m), agg, logp.shape[1], norm_len).detach()),
                  "loss": float(loss.detach())}


# ------------------------------------------------------------------------------------------------ advantages
def group_advantages(rewards, group_ids, scale="none", eps=1e-6, on_policy=None):
    r = [float(x) for x in rewards]
    gid = [int(x) for x in group_ids]
    sel = [True] * len(r) if on_policy is None else [bool(x) for x in on_policy]
    out = []
    for i in range(len(r)):
        vals = [r[j] for j in range(len(r)) if gid[j] == gid[i] and sel[j]]
        if len(vals) <= 1:
            mean, std = 0.0, 1.0
        elif max(vals) == min(vals):
            mean, std = vals[0], 0.0
        else:
            mean = math.fsum(vals) / len(vals)
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        a = r[i] - mean
        out.append(a / (std + eps) if scale == "group" else a)
    return torch.tensor(out, dtype=D)


def pass_mask(rewards, threshold=0.1):
    """Compared in the rewards' own precision (a float32 reward 0.1 does not pass threshold 0.1)."""
    if rewards.is_floating_point():
        return torch.tensor([bool(r > torch.tensor(threshold, dtype=rewards.dtype)) for r in rewards.detach()])
    return torch.tensor([float(r) > threshold for r in rewards])


def group_stats(rewards, group_ids, passed, scale="none", eps=1e-6):
    gids = sorted(set(int(x) for x in group_ids))
    rate, uni = [], []
    for g in gids:
        idx = [i for i in range(len(rewards)) if int(group_ids[i]) == g]
        rate.append(sum(bool(passed[i]) for i in idx) / len(idx))
        uni.append(len({float(rewards[i]) for i in idx}) == 1)
    adv = group_advantages(rewards, group_ids, scale, eps)
    n = len(gids)
    return {"pass_rate": torch.tensor(rate, dtype=torch.float32), "uniform": torch.tensor(uni),
            "uniform_frac": sum(uni) / n, "all_pass_frac": sum(x == 1 for x in rate) / n,
            "all_fail_frac": sum(x == 0 for x in rate) / n, "abs_adv_mean": float(adv.abs().mean())}


# ------------------------------------------------------------------------------------------------ probes
def _entropy_row(z):
    z = z.to(D)
    keep = z != float("-inf")
    lp = z[keep] - torch.logsumexp(z[keep], 0)
    return float(-(lp.exp() * lp).sum())


def token_entropy(logits, chunk_size=1024, temperature=1.0):
    flat = logits.detach().reshape(-1, logits.shape[-1]).to(D) / temperature
    return torch.tensor([_entropy_row(z) for z in flat], dtype=torch.float32).reshape(logits.shape[:-1])


def entropy_from_hidden(hidden, lm_head_weight, bias=None, mask=None, chunk_size=256, temperature=1.0,
                        suppress_ids=None):
    h = hidden.detach().reshape(-1, hidden.shape[-1]).to(D)
    z = h @ lm_head_weight.detach().to(D).T
    if bias is not None:
        z = z + bias.detach().to(D)
    z = z / temperature
    if suppress_ids:
        z[:, list(suppress_ids)] = float("-inf")
    keep = [True] * h.shape[0] if mask is None else mask.reshape(-1).bool().tolist()
    out = [(_entropy_row(z[i]) if keep[i] else 0.0) for i in range(h.shape[0])]
    return torch.tensor(out, dtype=torch.float32).reshape(hidden.shape[:-1])


def _mean(x, m):
    v = x.detach().to(D)[m]
    return float(v.mean()) if v.numel() else None


def entropy_summary(entropy, mask, passed, expert_entropy=None, expert_mask=None):
    m, p = mask.bool(), passed.bool()[:, None].expand_as(mask)
    return {"entropy_mean": _mean(entropy, m), "entropy_passed": _mean(entropy, m & p),
            "entropy_failed": _mean(entropy, m & ~p),
            "entropy_expert": None if expert_entropy is None else _mean(expert_entropy, expert_mask.bool())}


def group_rarity(rewards, group_ids, passed, bins=10, scale="none"):
    gs = group_stats(rewards, group_ids, passed, scale)
    hist = [0] * bins
    for x in gs["pass_rate"].tolist():
        hist[min(int(x * bins), bins - 1)] += 1
    adv = group_advantages(rewards, group_ids, scale).abs()
    q = torch.quantile(adv, torch.tensor([0.1, 0.5, 0.9], dtype=D)).tolist()
    return {k: gs[k] for k in ("uniform_frac", "all_pass_frac", "all_fail_frac", "abs_adv_mean")} | {
        "pass_rate_hist": hist, "pass_rate_edges": [i / bins for i in range(bins + 1)],
        "abs_adv_q10": q[0], "abs_adv_q50": q[1], "abs_adv_q90": q[2],
        "nonzero_adv_frac": float((adv != 0).to(D).mean())}


def gate_activation(logp, expert_logp, mask, passed, slope=0.5, rows=None, adv=None, expert_mask=None):
    m = mask.bool()
    if rows is not None:
        m = m & rows.bool()[:, None]
    g = _masked64(logp.detach(), m) - expert_baseline(expert_logp, logp.shape[1],
                                                      None if expert_mask is None else expert_mask.bool())
    out = gate_dict(gate_counts(g, m, passed), slope)
    if adv is not None:
        full = torch.where(passed.bool()[:, None], g < 0, g > 0)
        w = adv.detach().to(D).abs()[:, None] * torch.where(full, 1.0, slope).to(D)
        out["guide_weight_mean"] = _mean(w, m)
    return out


def expert_gap(logp, expert_logp, mask, expert_len):
    m = mask.bool()
    B, T = logp.shape
    gaps, past = [], 0
    for i in range(B):
        for t in range(T):
            if m[i, t]:
                e = float(expert_logp[i, t]) if t < int(expert_len[i]) else 0.0
                gaps.append(float(logp[i, t]) - e)
                past += t >= int(expert_len[i])
    q = torch.quantile(torch.tensor(gaps, dtype=D), torch.tensor([0.1, 0.5, 0.9], dtype=D)).tolist()
    return {"expert_gap_q10": q[0], "expert_gap_q50": q[1], "expert_gap_q90": q[2],
            "expert_past_end_frac": past / len(gaps)}


def cov_logp_adv(logp, adv, mask, weight=None):
    m = mask.bool()
    a = _adv_mat(adv, logp.shape)
    if weight is not None:
        a = a * weight.detach().to(D)
    lp, av = logp.detach().to(D)[m], a[m]
    return float(((lp - lp.mean()) * (av - av.mean())).mean())


def gate_full_side(gap, passed):
    return torch.where(passed.bool(), gap < 0, gap > 0)


def gate_fractions(gap, mask, passed, slope):
    m = mask.bool()
    return gate_dict(gate_counts(gap.to(D), m, passed.bool().reshape(-1) if passed.shape[1] == 1 else
                                 passed.bool()[:, 0]), slope)
