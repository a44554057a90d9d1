"""CalibRL inside TRL 1.16's GRPOTrainer: same loss (calibrl.losses.calibrl_loss), same probes (calibrl.probes).

    from calibrl.integrations.trl import CalibRLConfig, CalibRLTrainer, calibrl_reward, to_trl_dataset
    args = CalibRLConfig(output_dir="out", num_generations=8, per_device_train_batch_size=8, report_to="tensorboard")
    trainer = CalibRLTrainer(model="Qwen/Qwen2.5-VL-3B-Instruct", reward_funcs=calibrl_reward, args=args,
                             train_dataset=to_trl_dataset(make_dataset("count", 512, 0)), peft_config=lora)
    trainer.train()           # or: accelerate launch --num_processes 8 train.py  (DDP / DeepSpeed / FSDP)

What the subclass changes (everything else, generation included, is TRL's):
1. `_generate_and_score_completions`: after TRL's own pass, (a) advantages are recomputed with
   calibrl.advantage.group_advantages over the on-policy rows of each group (TRL's groups: N global rows,
   group = row // num_generations), A = r - mean without std scaling by default (`scale_rewards="none"`; "group"
   divides by the Bessel std + 1e-4 as TRL); unscorable rows (all reward functions None) are left out of the
   group statistics and get A = 0; (b) passed = calibrl.advantage.pass_mask(r, threshold=pass_threshold) (with
   calibrl_reward, r = acc + 0.1 fmt, so passed = acc); (c) the expert solution of each prompt (dataset column
   `expert_column`, default "solution", the official convention) is tokenized as a response (calibrl.rollout.
   tokenize_experts: no chat template, EOS appended, cut to max_expert_length) after the same prompt and image,
   and its per-token log-probs and entropies are computed with TRL's own `_get_per_token_logps_and_entropies`
   under no_grad, right where TRL computes the old log-probs: same model state, detached. One forward per group,
   not per row.
2. `_compute_loss`: TRL's loss is replaced by calibrl_loss (old log-probs = TRL's, or logp.detach() when TRL skips
   them, i.e. exactly on-policy), divided by the gradient-accumulation steps (the official per-micro-batch
   token-mean then /grad-accum). The probes go into TRL's metrics (`calibrl/<name>`), so every `report_to`
   backend (tensorboard, wandb, trackio, ...) receives them: loss terms and clip statistics (mean over ranks);
   entropy split, gate shares, expert gap, Cov(logp, A) on the micro-batch gathered from all ranks; group
   rarity per generation batch; the policy-vs-guidance gradient split every `grad_split_every` steps.
Differences from calibrl's own trainer: TRL scores the full vocabulary (calibrl sets its suppressed vision ids to
-inf in both sampling and scoring); probes are per micro-batch, averaged over TRL's logging window (calibrl pools
the whole rollout); the gradient split is the mean over ranks of each rank's micro-batch gradient; TRL has no
mini-batch/PPO-epoch loop of its own beyond num_iterations and steps_per_generation.
Unsupported TRL options raise ValueError in CalibRLConfig: beta != 0, entropy bonus, top_entropy_quantile < 1,
sequence-level importance sampling, delta, off_policy_mask_threshold, vLLM importance-sampling correction (the
official recipe applies none of these), loss_type other than "bnpo" (choose the aggregation with `loss_agg`).
vLLM generation (use_vllm=True, colocate or server) works unchanged otherwise, since old and expert log-probs are
both recomputed by the trainer's model; it is documented, not tested here (no GPU).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from calibrl import probes
from calibrl.advantage import group_advantages, group_stats, pass_mask
from calibrl.losses import AGG_MODES, GAPS, WEIGHTS, calibrl_loss, policy_loss
from calibrl.rewards import score
from calibrl.rollout import tokenize_experts

PREFIX = "calibrl/"
_MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "image_position_ids")
_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
_LOSS_KEYS = ("pg_loss", "guide_loss", "loss", "clipfrac", "approx_kl", "dualclip_frac")
_RARITY_KEYS = ("uniform_frac", "all_pass_frac", "all_fail_frac", "abs_adv_mean", "nonzero_adv_frac")


@dataclass
class CalibRLConfig(GRPOConfig):
    """GRPOConfig plus CalibRL's knobs (defaults: the official recipe). Every GRPOConfig field keeps its meaning,
    except the ones listed in the module docstring."""
    slope: float = field(default=0.5, metadata={"help": "LeakyReLU negative slope alpha of the gate, in [0, 1]."})
    guide_coef: float = field(default=0.1, metadata={"help": "lambda, weight of the guidance term (>= 0)."})
    weight: str = field(default="abs-adv", metadata={"help": "abs-adv (|A| weighting, official) or none."})
    gap: str = field(default="token", metadata={"help": "token (official), sequence (paper) or mean-token."})
    expert_column: str = field(default="solution", metadata={"help": "dataset column with the expert solution."})
    clip_c: Optional[float] = field(default=3.0, metadata={"help": "dual-clip constant (None: off, as TRL)."})
    loss_agg: str = field(default="token-mean", metadata={"help": "calibrl/verl aggregation mode per micro-batch."})
    pass_threshold: float = field(default=0.1, metadata={"help": "passed = reward > threshold (official 0.1)."})
    max_expert_length: Optional[int] = field(default=None, metadata={
        "help": "expert tokens kept, EOS included (default max_completion_length)."})
    grad_split_every: int = field(default=0, metadata={
        "help": "log the policy/guidance gradient split every N optimizer steps (0: never; 2 extra backwards)."})
    scale_rewards: str = field(default="none", metadata={"help": "none (official: A = r - mean) or group."})
    loss_type: str = field(default="bnpo", metadata={"help": "kept at bnpo; calibrl_loss replaces TRL's loss."})

    def __post_init__(self):
        super().__post_init__()
        _check_config(self)


def _check_config(a: CalibRLConfig) -> None:
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    if not (num(a.slope) and 0.0 <= a.slope <= 1.0):
        raise ValueError(f"slope: expected a number in [0, 1], got {a.slope!r}")
    if not (num(a.guide_coef) and a.guide_coef >= 0):
        raise ValueError(f"guide_coef: expected a number >= 0, got {a.guide_coef!r}")
    for name, value, allowed in (("weight", a.weight, WEIGHTS), ("gap", a.gap, GAPS),
                                 ("loss_agg", a.loss_agg, AGG_MODES), ("scale_rewards", a.scale_rewards,
                                                                       ("none", "group"))):
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    if a.clip_c is not None and not (num(a.clip_c) and a.clip_c > 1):
        raise ValueError(f"clip_c: expected None or a number > 1, got {a.clip_c!r}")
    if not (isinstance(a.expert_column, str) and a.expert_column):
        raise ValueError(f"expert_column: expected a non-empty column name, got {a.expert_column!r}")
    if not num(a.pass_threshold):
        raise ValueError(f"pass_threshold: expected a number, got {a.pass_threshold!r}")
    for name in ("max_expert_length", "grad_split_every"):
        v = getattr(a, name)
        lo = 0 if name == "grad_split_every" else 2
        if not (v is None and name == "max_expert_length") and not (isinstance(v, int) and not isinstance(v, bool)
                                                                     and v >= lo):
            raise ValueError(f"{name}: expected an int >= {lo}{' or None' if lo == 2 else ''}, got {v!r}")
    unsupported = [("loss_type", a.loss_type != "bnpo", "calibrl_loss replaces TRL's loss; choose loss_agg"),
                   ("beta", a.beta != 0.0, "calibrl_loss has no KL term (the official recipe uses none)"),
                   ("entropy_coef", a.entropy_coef != 0.0 or a.use_adaptive_entropy, "no entropy bonus"),
                   ("top_entropy_quantile", a.top_entropy_quantile < 1.0, "no entropy mask"),
                   ("importance_sampling_level", a.importance_sampling_level != "token", "token ratios only"),
                   ("delta", a.delta is not None, "no two-sided clip; see clip_c"),
                   ("off_policy_mask_threshold", a.off_policy_mask_threshold is not None, "no off-policy mask"),
                   ("vllm_importance_sampling_correction", a.use_vllm and a.vllm_importance_sampling_correction,
                    "set it False with use_vllm: old and expert log-probs are the trainer's, as in the official code"),
                   ("multi_objective_aggregation", a.multi_objective_aggregation != "sum_then_normalize",
                    "rewards are summed, then centred per group")]
    for name, bad, why in unsupported:
        if bad:
            raise ValueError(f"{name}: not supported by CalibRLTrainer ({why}), got {getattr(a, name)!r}")


def calibrl_reward(completions: list, answer: list, **_: Any) -> list[float]:
    """TRL reward function: calibrl.rewards.score (acc + 0.1 fmt) of each completion against the `answer` column."""
    text = lambda c: c[-1]["content"] if isinstance(c, list) else c
    return [float(score(text(c), a)["reward"]) for c, a in zip(completions, answer)]


def to_trl_dataset(ds: Any) -> Any:
    """A calibrl task dataset (image, question, answer, solution) in TRL's VLM format: a conversational `prompt`
    with an image placeholder, plus the `image`, `answer` and `solution` columns."""
    from calibrl.data import build_messages

    cols = set(getattr(ds, "column_names", None) or [])
    missing = {"image", "question", "answer"} - cols
    if missing:
        raise ValueError(f"ds: expected columns image, question, answer (and solution), missing {sorted(missing)}")
    return ds.map(lambda e: {"prompt": build_messages(e["question"])})


class CalibRLTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages, loss and extra metrics are calibrl's (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        a = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(a, CalibRLConfig):
            raise ValueError(f"args: expected a CalibRLConfig, got {type(a).__name__}")
        super().__init__(*args, **kwargs)
        data = self.train_dataset
        cols = set(getattr(data, "column_names", None) or [])
        if data is not None and cols and a.expert_column not in cols:
            raise ValueError(f"train_dataset: expected the expert column {a.expert_column!r}, got {sorted(cols)}")
        if a.grad_split_every and self.is_deepspeed_enabled:
            raise ValueError("grad_split_every: not supported under DeepSpeed (partitioned parameters)")
        tok = self._tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.eos_token_ids[0]
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        self._expert_tok = types.SimpleNamespace(tokenizer=tok, eos_token_id=eos, pad_token_id=pad)

    # ------------------------------------------------------------------------------------------ rollout side
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._calibrl_rewards = out  # [N_global, n_funcs], gathered over processes
        return out

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        a, device = self.args, self.accelerator.device
        rpf = self._calibrl_rewards
        scorable = ~torch.isnan(rpf).all(dim=1)                              # [N]
        rewards = torch.where(scorable, (rpf * self.reward_weights.to(rpf.device)[None]).nansum(1), 0.0)
        n_gen = self.num_generations if mode == "train" else self.num_generations_eval
        gids = torch.arange(rewards.numel(), device=rewards.device) // n_gen  # TRL's groups
        adv = group_advantages(rewards, gids, scale=a.scale_rewards, eps=1e-4, on_policy=scorable)
        adv = torch.where(scorable, adv, 0.0)
        passed = pass_mask(rewards, threshold=a.pass_threshold) & scorable
        mixed = ~group_stats(rewards, gids, passed)["uniform"][torch.unique(gids, return_inverse=True)[1]]
        self._log_rarity(mode, rewards[scorable], gids[scorable], passed[scorable])
        n = len(inputs)
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        out["advantages"] = adv[local].to(device=device, dtype=torch.float32)
        out["calibrl_passed"] = passed[local].to(device)
        out["calibrl_mixed"] = mixed[local].to(device)
        out["calibrl_group"] = gids[local].to(device)
        out.update(self._expert_logps(out, inputs, gids[local].cpu(), mode))
        return out

    def _expert_logps(self, out: dict, inputs: list[dict], gids: torch.Tensor, mode: str) -> dict:
        """Old log-probs and entropies [B,Te] of each row's expert solution after the row's own prompt and image,
        computed once per group (the rows of a group are consecutive here, before TRL shuffles)."""
        col = self.args.expert_column
        first = torch.ones_like(gids, dtype=torch.bool)
        first[1:] = gids[1:] != gids[:-1]
        reps = first.nonzero().squeeze(-1).tolist()                          # one row per group
        inv = (torch.cumsum(first.long(), 0) - 1).to(self.accelerator.device)  # row -> its group's rep
        sols = [inputs[i].get(col) for i in range(len(inputs))]
        for i in range(len(inputs)):
            if sols[i] != sols[reps[int(inv[i])]]:
                raise ValueError(f"{col}: rows of one TRL group carry different expert solutions (row {i})")
        max_len = self.args.max_expert_length or self.max_completion_length
        e_ids, e_mask = tokenize_experts(self._expert_tok, [sols[i] for i in reps], max_len)
        device = self.accelerator.device
        e_ids, e_mask = e_ids.to(device), e_mask.to(device)
        batch = {k: out[k] for k in _MM_KEYS if k in out}
        batch.update(prompt_ids=out["prompt_ids"], prompt_mask=out["prompt_mask"])
        p_len = out["prompt_ids"].shape[1]
        for k in _TYPE_KEYS:  # prompt part only, then zeros over the expert response (TRL does the same)
            if k in out:
                batch[k] = out[k][:, :p_len]
        sel = unsplit_pixel_values_by_grid(_select_rows(split_pixel_values_by_grid(batch), reps))
        for k in _TYPE_KEYS:
            if k in sel:
                sel[k] = torch.cat([sel[k], sel[k].new_zeros(e_ids.shape)], 1)
        p_ids, p_mask = sel.pop("prompt_ids"), sel.pop("prompt_mask")
        bs = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            e_lp, e_ent, _ = self._get_per_token_logps_and_entropies(
                self.model, torch.cat([p_ids, e_ids], 1), torch.cat([p_mask, e_mask.long()], 1), e_ids.shape[1],
                batch_size=bs, compute_entropy=True, **sel)
        e_lp = torch.where(e_mask, e_lp.float(), 0.0)
        e_ent = torch.where(e_mask, e_ent.float(), 0.0)
        self._metrics[mode][PREFIX + "expert_len_mean"].append(self._global_mean(e_mask.sum(1).float()))
        return {"calibrl_expert_logps": e_lp[inv], "calibrl_expert_mask": e_mask[inv],
                "calibrl_expert_entropy": e_ent[inv]}

    # --------------------------------------------------------------------------------------------- loss side
    def _compute_loss(self, model, inputs):
        a = self.args
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        mask = mask.bool()
        logits_to_keep = inputs["completion_ids"].size(1)
        mm = {k: inputs.get(k) for k in _MM_KEYS + _TYPE_KEYS}
        logp, ent, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), logits_to_keep, compute_entropy=True,
            **mm)
        logp, ent = logp.float(), ent.float()  # bf16 models give bf16 log-probs; calibrl takes one float dtype
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old.float()
        adv, passed = inputs["advantages"], inputs["calibrl_passed"]
        e_lp, e_mask = inputs["calibrl_expert_logps"], inputs["calibrl_expert_mask"]
        clip = dict(clip_low=self.epsilon_low, clip_high=self.epsilon_high, clip_c=a.clip_c, agg=a.loss_agg,
                    norm_len=self.max_completion_length)
        loss, info = calibrl_loss(logp, old, e_lp, adv, mask, passed, slope=a.slope, guide_coef=a.guide_coef,
                                  weight=a.weight, gap=a.gap, expert_mask=e_mask, **clip)
        mode = "train" if self.model.training else "eval"
        accum = getattr(self, "current_gradient_accumulation_steps", a.gradient_accumulation_steps)  # set by train()
        accum = accum if mode == "train" else 1
        loss = loss / accum
        for k in _LOSS_KEYS:
            self._metrics[mode][PREFIX + k].append(self._global_mean(torch.tensor(info[k], device=logp.device)))
        self._metrics[mode]["entropy"].append(self._global_mean(ent.detach()[mask]))  # TRL's metric, same meaning
        if (mode == "train" and a.grad_split_every and self.state.global_step % a.grad_split_every == 0
                and self._step % accum == 0):
            pg, _ = policy_loss(logp, old, adv, mask, **clip)
            params = [p for p in model.parameters() if p.requires_grad]
            split = probes.gradient_split(pg / accum, loss - pg / accum, params)
            for k, v in split.items():
                self._metrics[mode][PREFIX + k].append(self._global_mean(torch.tensor(
                    float("nan") if v is None else v, device=logp.device)))
        self._log_probes(mode, old.detach(), ent.detach(), mask, adv, passed, inputs["calibrl_mixed"],
                         inputs["calibrl_group"], e_lp, e_mask, inputs["calibrl_expert_entropy"])
        return loss

    # ------------------------------------------------------------------------------------------------ metrics
    def _global_mean(self, x: torch.Tensor) -> float:
        """Mean of the values of a local tensor over all ranks (pooled: each value counts once)."""
        stats = torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)])
        stats = self.accelerator.reduce(stats, reduction="sum") if self.accelerator.num_processes > 1 else stats
        return float(stats[0] / stats[1])

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of `t` from every rank (rank order), padded with 0 / False along dim 1 to the widest rank."""
        if self.accelerator.num_processes == 1:
            return t
        if t.dtype == torch.bool:
            return self._gather(t.long()).bool()
        if t.dim() > 1:
            t = self.accelerator.pad_across_processes(t.contiguous(), dim=1, pad_index=0)
        return self.accelerator.gather(t.contiguous())

    def _log(self, mode: str, values: dict, keys=None) -> None:
        for k, v in values.items():
            if (keys is None or k in keys) and not isinstance(v, (list, tuple)):
                self._metrics[mode][PREFIX + k].append(float("nan") if v is None else float(v))

    def _log_rarity(self, mode: str, rewards, gids, passed) -> None:
        if rewards.numel():
            self._log(mode, probes.group_rarity(rewards, gids, passed, scale=self.args.scale_rewards), _RARITY_KEYS)
        self._log(mode, {"pass_rate": float(passed.float().mean()) if passed.numel() else None})

    def _log_probes(self, mode, old, ent, mask, adv, passed, mixed, group, e_lp, e_mask, e_ent) -> None:
        """calibrl.probes on this micro-batch, gathered from every rank (identical on each rank)."""
        old, ent, mask, e_lp, e_mask, e_ent = map(self._gather, (old, ent, mask, e_lp, e_mask, e_ent))
        adv, passed, mixed, group = map(self._gather, (adv.float(), passed, mixed, group))
        values = probe_values(old, ent, mask, adv, passed, mixed, group, e_lp, e_mask, e_ent, self.args.slope)
        self._log(mode, values)


def probe_values(old, ent, mask, adv, passed, mixed, group, e_lp, e_mask, e_ent, slope: float) -> dict:
    """The probes CalibRLTrainer logs for one (gathered) micro-batch, straight from calibrl.probes: entropy split
    (the expert entropy over one expert row per group), gate shares over rows of non-uniform groups with
    guide_weight_mean, expert-gap quantiles, Cov(logp, A). Rows: on-policy rows [B,T]; e_* [B,Te] per row."""
    out: dict = {}
    _, inv = torch.unique(group, return_inverse=True)
    first = torch.full((int(inv.max()) + 1,), len(inv), dtype=torch.long, device=inv.device)
    first = first.scatter_reduce(0, inv, torch.arange(len(inv), device=inv.device), reduce="amin")
    out.update(probes.entropy_summary(ent, mask, passed, e_ent[first], e_mask[first]))
    out.update(probes.gate_activation(old, e_lp, mask, passed, slope, rows=mixed, adv=adv, expert_mask=e_mask))
    if mask.any():
        out.update(probes.expert_gap(old, e_lp, mask, e_mask.sum(1)))
        out["cov_logp_adv"] = probes.cov_logp_adv(old, adv, mask)
    return out


def _select_rows(batch: dict, rows: list[int]) -> dict:
    """Rows `rows` of a TRL per-sample dict (tensors, lists of per-sample tensors, 0-d tensors kept)."""
    def pick(v):
        if v is None or (torch.is_tensor(v) and v.ndim == 0):
            return v
        if torch.is_tensor(v):
            return v[torch.as_tensor(rows, device=v.device)]
        return [v[i] for i in rows]
    return {k: pick(v) for k, v in batch.items()}
