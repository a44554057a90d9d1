"""Per-step statistics for the trainer: the probes of calibrl.probes applied to a RolloutBatch, the gradient split,
and the samples.jsonl rows. Values are python floats or None (never NaN)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from calibrl.losses import GATE_KEYS

ENTROPY_KEYS = ("entropy_mean", "entropy_passed", "entropy_failed", "entropy_expert")
GAP_KEYS = ("expert_gap_q10", "expert_gap_q50", "expert_gap_q90", "expert_past_end_frac")


def rollout_probes(b: Any, cfg: Any) -> dict:
    """Every rollout-side probe of one step, from calibrl.probes (gate probes are counterfactual in modes that do
    not use the expert; they count tokens of non-uniform groups only). The entropy_* columns are the entropy of the
    sampling distribution at the row's `temperature`; entropy_t1_* the same at T = 1 (equal when temperature = 1)."""
    from calibrl import probes

    b = _on_cpu(b)
    m = b.mask
    row: dict[str, Any] = {
        "reward_mean": float(b.rewards.mean()), "acc_mean": float(b.passed.float().mean()),
        "format_rate": float(b.fmt.mean()), "response_len_mean": float(m.sum(1).float().mean()),
    }
    has_exp = bool(b.expert_mask.any()) if b.expert_mask.numel() else False
    row["expert_len_mean"] = float(b.expert_mask.sum(1).float().mean()) if has_exp else None
    # entropy_* are of the sampling (tempered) distribution, at the row's "temperature"; entropy_t1_* at T = 1
    row.update(probes.entropy_summary(b.entropy, m, b.passed, b.expert_entropy if has_exp else None,
                                      b.expert_mask if has_exp else None))
    if b.entropy_t1 is b.entropy and (not has_exp or b.expert_entropy_t1 is b.expert_entropy):
        t1 = {k: row[k] for k in ENTROPY_KEYS}
    else:
        t1 = probes.entropy_summary(b.entropy_t1, m, b.passed, b.expert_entropy_t1 if has_exp else None,
                                    b.expert_mask if has_exp else None)
    row.update({k.replace("entropy_", "entropy_t1_", 1): t1[k] for k in ENTROPY_KEYS})
    rar = probes.group_rarity(b.rewards, b.row_prompt, b.passed, scale=cfg.loss.scale)
    row.update({k: rar[k] for k in ("uniform_frac", "all_pass_frac", "all_fail_frac", "abs_adv_mean",
                                    "nonzero_adv_frac")})
    if has_exp:
        from calibrl.advantage import group_stats

        mixed = ~group_stats(b.rewards, b.row_prompt, b.passed)["uniform"][b.row_prompt]
        e_rows, e_mask = b.expert_old_logp[b.row_prompt], b.expert_mask[b.row_prompt]
        gate = probes.gate_activation(b.old_logp, e_rows, m, b.passed, cfg.loss.slope, rows=mixed, adv=b.adv,
                                      expert_mask=e_mask)
        row.update({k: gate.get(k) for k in GATE_KEYS + ("guide_weight_mean",)})
        row.update(probes.expert_gap(b.old_logp, e_rows, m, e_mask.sum(1)))
    else:
        row.update({k: None for k in GATE_KEYS + GAP_KEYS + ("guide_weight_mean",)})
    row["cov_logp_adv"] = probes.cov_logp_adv(b.old_logp, b.adv, m)
    row["kl_to_start"] = kl_to_start(b)
    return row


def _on_cpu(b: Any) -> Any:
    import dataclasses

    if b.mask.device.type == "cpu":
        return b
    moved = {f.name: getattr(b, f.name).cpu() for f in dataclasses.fields(b) if torch.is_tensor(getattr(b, f.name))}
    return dataclasses.replace(b, **moved)


def kl_to_start(b: Any) -> float | None:
    """Token-mean k3 estimate of KL(pi || pi_start) on the sampled tokens, or None when not computed."""
    if b.ref_logp is None:
        return None
    d = (b.ref_logp - b.old_logp)[b.mask]
    return float((torch.exp(d) - d - 1).clamp(min=0).mean())  # k3 >= 0; clamp float rounding at d ~ 0


def grad_split(total: torch.Tensor, pg: torch.Tensor, params: Sequence[torch.Tensor]) -> dict:
    """calibrl.probes.gradient_split of `total` into the policy term `pg` and the rest (the guide_coef-scaled
    guidance term); the two gradients are summed into .grad, standing in for the backward of `total`."""
    from calibrl import probes

    return probes.gradient_split(pg, total - pg, params, accumulate=True)


def mean_infos(infos: list[dict]) -> dict:
    """Mean of each loss-info key over the micro-batches of a step (None where never finite)."""
    keys = ("pg_loss", "guide_loss", "loss", "clipfrac", "approx_kl")
    out: dict[str, Any] = {}
    for k in keys:
        vals = [float(i[k]) for i in infos if i.get(k) is not None and math.isfinite(float(i[k]))]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def sample_rows(b: Any, tokenizer: Any, step: int, k: int) -> list[dict]:
    """The first `k` on-policy responses of the step as samples.jsonl rows (tokens, entropy, logp per token)."""
    b = _on_cpu(b)
    rows = []
    for r in range(min(k, b.n_rows)):
        m = b.mask[r]
        ids = b.completion_ids[r][m].tolist()
        rows.append({"step": step, "prompt_id": int(b.prompt_ids[int(b.row_prompt[r])]),
                     "tokens": [tokenizer.decode([i]) for i in ids], "entropy": b.entropy[r][m].tolist(),
                     "logp": b.old_logp[r][m].tolist(), "passed": bool(b.passed[r]), "reward": float(b.rewards[r])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines, replacing the file atomically (a crash or a full disk leaves the old file)."""
    from calibrl.runfiles import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
