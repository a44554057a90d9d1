"""The RL loop: rollout -> rewards -> advantages -> update (PPO epochs x mini-batches x micro-batches) -> probes ->
History row, each stage timed in the row.

`train(cfg)` runs a whole run in runs/<name>/ (config.json, history.jsonl, samples.jsonl, checkpoint/, adapter/);
`Trainer` exposes the pieces (`step()`, `evaluate()`, `save_checkpoint()`) for notebooks. Every mode takes the same
number of optimizer steps per RL step (ppo_epochs * minibatches): mini-batches are whole prompts, and an expert row
travels with its prompt instead of adding a mini-batch. Micro-batches are whole prompts too (`loss_norm` says how
their losses combine). A mini-batch with a non-finite log-prob, loss or gradient is skipped (no optimizer step, the
reason in the row); `max_consecutive_skips` in a row stop the run with an error after the row is written.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from calibrl import stepstats
from calibrl.config import TrainConfig
from calibrl.history import History, load_checkpoint, save_checkpoint
from calibrl.models import Policy
from calibrl.rollout import RewardFn, RolloutBatch, rollout, rows_logprobs, score_rollout, with_advantages

EVAL_SEED = 1_000_003
"""Seed of the held-out prompts: the same for every seed and mode of a comparison."""
NEW_FIELD_DEFAULTS = dict(sampler="auto", gradient_checkpointing=None, loss_norm="micro-batch",
                          expert_horizon="on-policy", max_consecutive_skips=5)
"""TrainConfig fields added after runs were saved: a saved config without them resumes at these values."""


class TooManySkips(RuntimeError):
    """`max_consecutive_skips` optimizer steps in a row were skipped for non-finite values."""


def lora_config(cfg: TrainConfig):
    """The one LoRA recipe (calibrl.models.default_lora_config) at the run's rank and alpha."""
    from calibrl.models import default_lora_config

    return default_lora_config(cfg.lora_r, cfg.lora_alpha)


def check_inputs(cfg: TrainConfig, policy: Any, train_data: Any, eval_data: Any | None) -> None:
    """Every bad input that can be caught before training: raises ValueError naming it."""
    from calibrl.prefix import checkpointing

    cfg.validate()
    proc = getattr(policy, "processor", None)  # the one getattr: `policy` is not yet known to be a Policy
    if proc is None or not hasattr(proc, "image_processor"):
        raise ValueError(f"policy.processor: expected a multimodal processor (with an image_processor) for model "
                         f"{cfg.model!r}, got {type(proc).__name__}")
    if not isinstance(policy, Policy):
        raise ValueError(f"policy: expected a calibrl.models.Policy, got {type(policy).__name__}")
    if cfg.sampler == "shared-prefix" and checkpointing(policy.model):
        raise ValueError("sampler: 'shared-prefix' cannot run with gradient checkpointing on; use 'auto' or 'generate'")
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is None and name == "eval_data":
            continue
        cols = set(getattr(data, "column_names", None) or [])
        if len(data) == 0:
            raise ValueError(f"{name}: expected a non-empty dataset, got 0 rows")
        for col in ("image", "question", "answer"):
            if col not in cols:
                raise ValueError(f"{name}: expected a column {col!r}, got columns {sorted(cols)}")
    if cfg.loss.needs_expert and "solution" not in set(train_data.column_names):
        raise ValueError(f"train_data: mode {cfg.loss.mode!r} needs the expert column 'solution', got columns "
                         f"{sorted(train_data.column_names)}")
    if (cfg.loss.kl_coef or cfg.loss.entropy_coef) and cfg.loss.mode not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"kl_coef/entropy_coef: supported only with grpo, dr_grpo, dapo, got mode {cfg.loss.mode!r}")
    if cfg.loss.kl_coef and not policy.is_lora:
        raise ValueError("kl_coef: needs a LoRA policy (the start policy is the model with its adapter disabled)")


NONFINITE_OLD = "non-finite old log-prob"
"""skip_reason of a step whose rollout produced non-finite old/expert log-probs (no update, no rollout probes)."""


class Trainer:
    """One run. Build with a config (and optionally a ready policy/datasets), then `run()` or `step()` by hand."""

    def __init__(self, cfg: TrainConfig, *, policy: Any = None, train_data: Any = None, eval_data: Any = None,
                 resume: bool = False, overwrite: bool = False, run_dir: str | Path | None = None,
                 reward_fn: RewardFn | None = None):
        from calibrl.tasks import DEFAULT_TASK, make_dataset

        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.out) / cfg.run_name
        History.check_target(self.run_dir, resume=resume, overwrite=overwrite)  # before any model loads
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        task = cfg.task or DEFAULT_TASK
        if train_data is None:
            train_data = make_dataset(task, cfg.train_size, cfg.seed, style=cfg.expert_style)
        if eval_data is None and cfg.eval_every:
            eval_data = make_dataset(task, cfg.eval_n, EVAL_SEED)
        torch.manual_seed(cfg.seed)  # same LoRA init for every mode of a seed
        if policy is None:
            from calibrl.models import load_policy

            policy = load_policy(cfg.model, lora=lora_config(cfg), quantization=cfg.quantization,
                                 gradient_checkpointing=cfg.gradient_checkpointing)
        check_inputs(cfg, policy, train_data, eval_data)
        self.policy, self.train_data, self.eval_data = policy, train_data, eval_data
        self.has_expert = "solution" in set(train_data.column_names)
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("policy.model: expected trainable parameters (LoRA or full), got none")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.history = History.create(self.run_dir, cfg.to_dict(), resume=resume, overwrite=overwrite)
        self.step_num = 0
        self.reward_fn = reward_fn
        self.consecutive_skips = 0
        if resume:
            self._resume()
        else:
            torch.manual_seed(cfg.seed)
            if cfg.save_every:  # a step-0 checkpoint: a kill during step 1 resumes too
                self.save_checkpoint()
        self._record_environment(resume)  # after a resume succeeded: a refused one leaves every file as it was

    def _record_environment(self, resume: bool) -> None:
        """env.json: where the run started and every environment it was resumed in; a resume in another environment
        (versions or processor) warns that it continues, but not bit-identically."""
        from calibrl.runenv import ENV_FILE, differences, environment
        from calibrl.runfiles import atomic_write_json, read_json

        path, env = self.run_dir / ENV_FILE, environment()
        if not resume:
            atomic_write_json(path, {"created": env, "resumed": []})
            return
        saved = read_json(path, "env") if path.is_file() else {}
        saved = saved if isinstance(saved, dict) else {}
        created = saved.get("created") if isinstance(saved.get("created"), dict) else None  # None: unknown (older run)
        changed = differences(created, env) if created else []
        if changed:
            warnings.warn(f"{path}: resuming in another environment ({'; '.join(changed)}): the run continues, but "
                          f"not bit-identically to an uninterrupted one", RuntimeWarning, stacklevel=3)
        atomic_write_json(path, {"created": created, "resumed": list(saved.get("resumed") or []) + [env]})

    # ------------------------------------------------------------------------------------------------ data
    def prompt_indices(self, step: int) -> list[int]:
        """Dataset indices of the prompts of RL step `step` (1-based): a seeded permutation per pass over the data,
        so the order depends only on (seed, step) and resumes exactly."""
        import numpy as np

        n, p = len(self.train_data), self.cfg.prompts_per_step
        out = []
        for k in range((step - 1) * p, step * p):
            epoch, pos = divmod(k, n)
            out.append(int(np.random.default_rng([self.cfg.seed, epoch]).permutation(n)[pos]))
        return out

    # ---------------------------------------------------------------------------------------------- update
    @property
    def expert_horizon(self) -> int | None:
        """Tokens of an expert row that are trained on or summed (None = the whole row)."""
        return self.cfg.max_new_tokens if self.cfg.expert_horizon == "on-policy" else None

    def _loss(self, lp: torch.Tensor, b: RolloutBatch, rows: torch.Tensor, ent: torch.Tensor | None,
              e_lp: torch.Tensor | None, e_rows: torch.Tensor | None, *,
              checked: bool = False) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """Loss of one micro-batch by mode: (loss, info, policy term tensor for the gradient split or None).
        `checked=False` calls the unchecked kernels (the batch was validated once by `_check_batch`)."""
        from calibrl import losses

        pick = (lambda name: getattr(losses, name)) if checked else (lambda name: getattr(losses, name + "_kernel"))
        policy_loss, calibrl_loss = pick("policy_loss"), pick("calibrl_loss")
        luffy_loss, rlplus_loss = pick("luffy_loss"), pick("rlplus_loss")
        lc, cfg = self.cfg.loss, self.cfg
        t = lp.shape[1]
        old, adv, mask = b.old_logp[rows, :t], b.adv[rows].to(lp.device), b.mask[rows, :t]
        clip = dict(clip_low=lc.clip_low, clip_high=lc.clip_high, clip_c=lc.clip_c, agg=lc.agg,
                    norm_len=cfg.max_new_tokens)
        if lc.mode in ("grpo", "dr_grpo", "dapo") or (e_rows is not None and len(e_rows) == 0):
            # (a LUFFY/RL-PLUS micro-batch without an expert row: its on-policy rows get the plain surrogate)
            ref = b.ref_logp[rows, :t] if lc.kl_coef else None
            loss, info = policy_loss(lp, old, adv, mask, ref_logp=ref, kl_coef=lc.kl_coef, entropy=ent,
                                            entropy_coef=lc.entropy_coef, **clip)
            return loss, info, None
        e_mask_all = b.expert_train_mask(self.expert_horizon)
        if lc.mode == "calibrl":
            # the expert row of each on-policy row's prompt (old log-probs, detached) with its mask cut to the
            # horizon: the token gap aligns it by index with e_t = 0 past the expert's end; the sequence gaps sum it
            er = b.row_prompt[rows]
            passed = b.passed[rows].to(lp.device)
            loss, info = calibrl_loss(lp, old, b.expert_old_logp[er], adv, mask, passed, slope=lc.slope,
                                             guide_coef=lc.guide_coef, weight=lc.weight, gap=lc.gap,
                                             expert_mask=e_mask_all[er], **clip)
            pg, _ = policy_loss(lp, old, adv, mask, **clip)
            return loss, info, pg
        te = e_lp.shape[1]
        e_mask, e_adv = e_mask_all[e_rows, :te], b.expert_adv[e_rows].to(lp.device)
        if lc.mode == "luffy":
            loss, info = luffy_loss(lp, old, adv, mask, e_lp, e_adv, e_mask, gamma=lc.luffy_gamma, **clip)
        else:
            loss, info = rlplus_loss(lp, old, adv, mask, e_lp, b.expert_old_logp[e_rows, :te], e_adv, e_mask,
                                            **clip)
        return loss, info, None

    def _check_batch(self, b: RolloutBatch) -> str | None:
        """Validate every row of the rollout once per RL step with the checked losses (old log-probs standing in for
        the new ones); the micro-batch loop then calls the unchecked kernels. Returns a skip reason when the
        rollout's own log-probs are not finite (the step is skipped, not crashed); raises on malformed tensors."""
        expert_rows = self.cfg.loss.mode in ("luffy", "rlplus")
        if not torch.isfinite(b.old_logp[b.mask]).all() or (
                b.expert_mask.numel() and not torch.isfinite(b.expert_old_logp[b.expert_mask]).all()):
            return NONFINITE_OLD
        with torch.no_grad():
            self._loss(b.old_logp, b, torch.arange(b.n_rows), b.entropy if self.cfg.loss.entropy_coef else None,
                       b.expert_old_logp if expert_rows else None,
                       torch.arange(len(b.prompt_ids)) if expert_rows else None, checked=True)
        return None

    def _forward(self, b: RolloutBatch, rows: torch.Tensor, e_rows: torch.Tensor | None):
        """Log-probs with grad for on-policy rows (and expert rows, cut to the horizon, for LUFFY/RL-PLUS) in one
        forward, on the path that sampled."""
        pol, cfg = self.policy, self.cfg
        comp, mask, prompts = b.completion_ids[rows], b.mask[rows], b.row_prompt[rows]
        kw = dict(temperature=cfg.temperature, return_entropy=bool(cfg.loss.entropy_coef), sampler=b.sampler)
        if e_rows is None or len(e_rows) == 0:
            lp, ent = rows_logprobs(pol, b.prompt_inputs, prompts, comp, mask, **kw)
            return lp, ent, (None if e_rows is None else lp[:0])
        e_mask = b.expert_train_mask(self.expert_horizon)[e_rows]
        te = int(e_mask.sum(1).max())
        t = comp.shape[1]
        width = max(t, te)
        pad = lambda x, v: torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), v)], 1)
        all_comp = torch.cat([pad(comp, pol.pad_token_id), pad(b.expert_ids[e_rows, :te], pol.pad_token_id)])
        all_mask = torch.cat([pad(mask, False), pad(e_mask[:, :te], False)])
        lp, ent = rows_logprobs(pol, b.prompt_inputs, torch.cat([prompts, e_rows]), all_comp, all_mask, **kw)
        n = len(rows)
        return lp[:n, :t], (ent[:n, :t] if ent is not None else None), lp[n:, :te]

    def _micro_weights(self, b: RolloutBatch, micro: list[torch.Tensor], expert_rows: bool) -> list[float]:
        """Scale of each micro-batch loss (`loss_norm`): 1/k, or its share of the mini-batch's normalising units."""
        cfg, g = self.cfg, self.cfg.group_size
        if cfg.loss_norm == "micro-batch":
            return [1.0 / len(micro)] * len(micro)
        agg = cfg.loss.agg
        if agg == "seq-mean-token-sum-norm":  # a sum over tokens / a constant: micro-batch losses add up
            return [1.0] * len(micro)
        e_mask = b.expert_train_mask(self.expert_horizon)
        units = []
        for prompts in micro:
            rows = (prompts[:, None] * g + torch.arange(g)[None, :]).reshape(-1)
            if agg == "token-mean":
                u = float(b.mask[rows].sum()) + (float(e_mask[prompts].sum()) if expert_rows else 0.0)
            else:
                u = float(len(rows)) + (float(len(prompts)) if expert_rows else 0.0)
            units.append(u)
        total = sum(units)
        return [u / total for u in units]

    def update(self, b: RolloutBatch) -> dict:
        """PPO epochs x mini-batches x micro-batches (whole prompts) on one rollout. Returns the update's metrics."""
        cfg = self.cfg
        p, g = len(b.prompt_ids), cfg.group_size
        expert_rows = cfg.loss.mode in ("luffy", "rlplus")
        infos, norms, gaps, reasons, split = [], [], [], [], None
        opt_steps = skipped = 0
        bad = self._check_batch(b)
        self.policy.model.train(True)
        for epoch in range(cfg.ppo_epochs):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_num * 101 + epoch)
            order = torch.randperm(p, generator=gen)
            for mb_prompts in order.chunk(cfg.minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                micro = list(mb_prompts.tensor_split(cfg.grad_accum))
                weights = self._micro_weights(b, micro, expert_rows)
                reason = bad
                for k, (erows, w) in enumerate([] if bad else zip(micro, weights)):
                    mrows = torch.cat([torch.arange(i * g, (i + 1) * g) for i in erows.tolist()])
                    lp, ent, e_lp = self._forward(b, mrows, erows if expert_rows else None)
                    m = b.mask[mrows, : lp.shape[1]].to(lp.device)
                    if not torch.isfinite(lp.detach()[m]).all() or (e_lp is not None and
                                                                    not torch.isfinite(e_lp.detach()).all()):
                        reason = "non-finite log-prob"
                        break
                    loss, info, pg = self._loss(lp, b, mrows, ent, e_lp, erows if expert_rows else None)
                    if not torch.isfinite(loss):
                        reason = "non-finite loss"
                        break
                    if epoch == 0 and opt_steps == 0 and skipped == 0:  # policy not yet updated: must equal sampler
                        gaps.append((lp.detach() - b.sampler_logp[mrows, : lp.shape[1]])[m].abs().max().item())
                    scaled = loss / cfg.grad_accum if cfg.loss_norm == "micro-batch" else loss * w
                    if pg is not None and split is None and k == 0 and self._every(cfg.grad_split_every):
                        pg_scaled = pg / cfg.grad_accum if cfg.loss_norm == "micro-batch" else pg * w
                        split = stepstats.grad_split(scaled, pg_scaled, self.params)
                    else:
                        scaled.backward()
                    infos.append(info)
                if reason is None and not all(q.grad is None or torch.isfinite(q.grad).all() for q in self.params):
                    reason = "non-finite gradient"
                if reason is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    reasons.append(reason)
                    self.consecutive_skips += 1
                    continue
                self.consecutive_skips = 0
                norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)))
                self.optimizer.step()
                opt_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.policy.eval_mode_ok:  # not 4-bit on CPU (see Policy.eval_mode_ok)
            self.policy.model.train(False)
        out = stepstats.mean_infos(infos)
        out.update(split or {})
        out.update(grad_norm=sum(norms) / len(norms) if norms else None, skipped=int(skipped > 0),
                   opt_steps=opt_steps, logp_gap_max=max(gaps) if gaps else None, lr=cfg.lr,
                   skipped_steps=skipped, skip_reason=reasons[0] if reasons else None,
                   consecutive_skips=self.consecutive_skips)
        return out

    def _every(self, n: int) -> bool:
        return bool(n) and self.step_num % n == 0

    # ------------------------------------------------------------------------------------------------ step
    def step(self) -> dict:
        """One RL step: rollout -> rewards -> advantages -> update -> probes -> (eval) -> History row, appended and
        returned. Raises TooManySkips (after writing the row) when `max_consecutive_skips` is reached."""
        cfg = self.cfg
        self.step_num += 1
        cuda = self.policy.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.policy.device)
        t0 = time.perf_counter()
        idx = self.prompt_indices(self.step_num)
        examples = [self.train_data[i] for i in idx]
        if not self.has_expert:
            examples = [dict(e, solution=None) for e in examples]
        want_ref = bool(cfg.loss.kl_coef) or (self._every(cfg.kl_every) and self.policy.is_lora)
        b = rollout(self.policy, examples, cfg, prompt_ids=idx, ref_logp=want_ref)
        b = score_rollout(b, self.policy, examples, self.reward_fn)
        b = with_advantages(b, cfg.loss.scale)
        row: dict[str, Any] = {"step": self.step_num, "mode": cfg.loss.mode, "seed": cfg.seed,
                               "sampler": b.sampler, "temperature": b.temperature}
        t1 = time.perf_counter()
        row.update(self.update(b))
        t2 = time.perf_counter()
        broken = row.get("skip_reason") == NONFINITE_OLD  # the rollout's own log-probs: probes would raise on them
        if not broken:
            row.update(stepstats.rollout_probes(b, cfg))
        t3 = time.perf_counter()
        if self._every(cfg.eval_every) or (cfg.eval_every and self.step_num == cfg.steps):
            row.update(self.evaluate())
        t4 = time.perf_counter()
        row.update(b.timings)
        row.update(update_s=t2 - t1, probes_s=t3 - t2, eval_s=t4 - t3, time_s=t4 - t0)
        if cuda:
            row["mem_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.policy.device) / 2**30
            row["mem_peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.policy.device) / 2**30
        row = self.history.append(row)
        if not broken:
            self.history.append_samples(stepstats.sample_rows(b, self.policy.tokenizer, self.step_num,
                                                              cfg.samples_per_step))
        if cfg.save_every and self.step_num % cfg.save_every == 0:
            self.save_checkpoint()
        if self.consecutive_skips >= cfg.max_consecutive_skips:
            raise TooManySkips(f"step {self.step_num}: {self.consecutive_skips} consecutive optimizer steps skipped "
                               f"({row.get('skip_reason')}); stopping. The history up to this step is in "
                               f"{self.run_dir}; lower lr or check the data (max_consecutive_skips="
                               f"{cfg.max_consecutive_skips})")
        return row

    def run(self, on_step: Callable[[dict], None] | None = None) -> History:
        """Steps until cfg.steps, calling `on_step(row)` after each; saves a final checkpoint and the adapter."""
        while self.step_num < self.cfg.steps:
            row = self.step()
            if on_step is not None:
                on_step(row)
        self.save_checkpoint()
        if self.policy.is_lora:
            self.policy.model.save_pretrained(str(self.run_dir / "adapter"))
        self.history.mark_done(self.step_num)  # done.json: history.finished_step(run_dir) == cfg.steps
        return self.history

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self, chunk: int = 32) -> dict:
        """Greedy accuracy and format rate, and pass@k at `temperature`, on the held-out prompts, from
        calibrl.evaluate.evaluate (the one held-out evaluator; the trainer's RNG stream is not reseeded); also writes
        the greedy answers to runs/<name>/eval.jsonl (the `eval --out` schema plus "step")."""
        from calibrl.evaluate import evaluate

        cfg = self.cfg
        kw = dict(max_new_tokens=cfg.max_new_tokens, seed=None, sampler=cfg.sampler)
        greedy = evaluate(self.policy, self.eval_data, temperature=0, n_samples=1, batch_size=chunk,
                          return_rows=True, **kw)
        sampled = evaluate(self.policy, self.eval_data, temperature=cfg.temperature, n_samples=cfg.pass_k,
                           batch_size=chunk * cfg.pass_k, top_p=cfg.top_p, **kw)
        stepstats.write_jsonl(self.run_dir / "eval.jsonl", [dict(r, step=self.step_num) for r in greedy["rows"]])
        return {"eval_greedy_acc": greedy["accuracy"], "eval_pass_at_k": sampled["pass_at_k"],
                "eval_format_rate": greedy["format_rate"]}

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Trainable weights, optimizer, RNG states (torch, python, numpy) and step -> runs/<name>/checkpoint/."""
        return save_checkpoint(self.run_dir, self.step_num, self.policy.model, self.optimizer)

    def _resume(self) -> None:
        saved = {**NEW_FIELD_DEFAULTS, **dict(self.history.config)}
        if saved.get("recompute_old_logp") is False and "sampler" not in self.history.config:
            saved["recompute_old_logp"] = None  # saved before auto existed: False then is today's auto on fp32
        mine = self.cfg.to_dict()
        for k in ("steps", "save_every", "out", "threads"):
            saved.pop(k, None)
            mine.pop(k, None)
        if saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"resume: config differs from the saved run in {diff}")
        self.step_num = load_checkpoint(self.run_dir, self.policy.model, self.optimizer)
        self.history.truncate(self.step_num)


def train(cfg: TrainConfig, *, policy: Any = None, train_data: Any = None, eval_data: Any = None,
          resume: bool = False, overwrite: bool = False, on_step: Callable[[dict], None] | None = None,
          run_dir: str | Path | None = None, reward_fn: RewardFn | None = None) -> History:
    """Train one run described by `cfg` into runs/<name>/ and return its History.

    `resume=True` continues a run from its last checkpoint (bit-identical on CPU); `overwrite=True` replaces an
    existing run directory (otherwise an existing one is refused). `on_step(row)` is called after every step
    (e.g. a live plot)."""
    tr = Trainer(cfg, policy=policy, train_data=train_data, eval_data=eval_data, resume=resume,
                 overwrite=overwrite, run_dir=run_dir, reward_fn=reward_fn)
    return tr.run(on_step)
