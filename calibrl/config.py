"""Configuration dataclasses for the RL trainer: one loss config, one train config, one size dial.

`LossConfig.preset(mode)` gives each mode's recipe; `TrainConfig.from_budget("smoke" | "small" | "full", **overrides)`
sizes a run. Both validate themselves and raise `ValueError` naming the offending field.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from calibrl._fields import check_known as _check_known
from calibrl._fields import check_types, expected_words, field_types, parse_typed
from calibrl.runfiles import check_name

MODES = ("grpo", "dr_grpo", "dapo", "calibrl", "luffy", "rlplus")
"""Known loss modes."""
EXPERT_MODES = ("calibrl", "luffy", "rlplus")
"""Modes whose loss uses the expert solution (the dataset must have a `solution` column)."""
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
BUDGETS = ("smoke", "small", "full")


@dataclass
class LossConfig:
    """Which loss the update uses and its knobs. Use `LossConfig.preset(mode)` for a mode's recipe."""

    mode: str = "calibrl"
    """One of grpo, dr_grpo, dapo, calibrl, luffy, rlplus."""
    slope: float = 0.5
    """CalibRL LeakyReLU negative slope alpha in [0, 1] (official: 0.5, hard-coded there)."""
    guide_coef: float = 0.1
    """CalibRL guidance coefficient lambda >= 0 (official: 0.1, hard-coded there)."""
    weight: str = "abs-adv"
    """CalibRL guidance weight: "abs-adv" (|A_i|, official) or "none" (ablation)."""
    gap: str = "token"
    """CalibRL gap: "token" (per token, expert log-prob aligned by index, official code), "sequence" (the paper's
    sequence log-prob gap) or "mean-token" (the sequence gap with means instead of sums)."""
    clip_low: float = 0.2
    """PPO lower clip epsilon: the ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.2
    """PPO upper clip epsilon: the ratio is clipped at 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    clip_c: float | None = 3.0
    """Dual-clip constant c > 1 for negative advantages (verl's clip_ratio_c); None disables dual clip."""
    agg: str = "token-mean"
    """Loss aggregation over a micro-batch: token-mean, seq-mean-token-mean, seq-mean-token-sum,
    seq-mean-token-sum-norm (normalised by max_new_tokens)."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL to the start policy (LoRA adapter disabled); 0 = off (official recipes)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient; 0 = off (official recipes)."""
    scale: str = "none"
    """Advantage scaling: "none" (A = r - group mean, official CalibRL and GRPO baseline) or "group" (divide by std)."""
    luffy_gamma: float = 0.1
    """LUFFY policy-shaping gamma in f(p) = p / (p + gamma) on expert tokens (RL-PLUS keeps its own default)."""

    @classmethod
    def preset(cls, mode: str, **overrides: Any) -> "LossConfig":
        """The recipe of `mode`, then `overrides` on top.

        - grpo: token-mean, scale "none", clip 0.2/0.2, dual clip 3 -- the official CalibRL repo's GRPO baseline recipe
          (note: not TRL's default, which scales by the group std).
        - dr_grpo: seq-mean-token-sum-norm (sum over tokens / max_new_tokens), scale "none" (Dr. GRPO).
        - dapo: token-mean, clip_high 0.28, scale "group", dual clip 10 (the official repo's DAPO recipe, without
          dynamic sampling or the overlong penalty).
        - calibrl: official defaults: slope 0.5, guide_coef 0.1, |A| weight, token gap, token-mean, scale "none".
        - luffy / rlplus: token-mean, scale "none" (they share CalibRL's advantage: expert excluded from group stats).
        """
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        base: dict[str, Any] = {"mode": mode}
        if mode == "dr_grpo":
            base["agg"] = "seq-mean-token-sum-norm"
        elif mode == "dapo":
            base.update(clip_high=0.28, scale="group", clip_c=10.0)
        base.update(overrides)
        cfg = cls(**base)
        cfg.validate()
        return cfg

    @property
    def needs_expert(self) -> bool:
        """True when the loss itself uses the expert solution."""
        return self.mode in EXPERT_MODES

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (types first: a bool is not a number, nor the reverse)."""
        check_types(self)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if not (0.0 <= self.slope <= 1.0):
            raise ValueError(f"slope: expected a value in [0, 1], got {self.slope}")
        _finite_nonneg("guide_coef", self.guide_coef)
        if self.weight not in ("abs-adv", "none"):
            raise ValueError(f"weight: expected 'abs-adv' or 'none', got {self.weight!r}")
        if self.gap not in ("token", "sequence", "mean-token"):
            raise ValueError(f"gap: expected 'token', 'sequence' or 'mean-token', got {self.gap!r}")
        if not (isinstance(self.clip_low, (int, float)) and 0.0 <= self.clip_low < 1.0):
            raise ValueError(f"clip_low: expected a value in [0, 1), got {self.clip_low!r}")
        if not (isinstance(self.clip_high, (int, float)) and math.isfinite(self.clip_high) and self.clip_high >= 0):
            raise ValueError(f"clip_high: expected a finite value >= 0, got {self.clip_high!r}")
        if self.clip_c is not None and not (math.isfinite(self.clip_c) and self.clip_c > 1.0):
            raise ValueError(f"clip_c: expected None or a finite value > 1, got {self.clip_c!r}")
        if self.agg not in AGG_MODES:
            raise ValueError(f"agg: expected one of {AGG_MODES}, got {self.agg!r}")
        _finite_nonneg("kl_coef", self.kl_coef)
        _finite_nonneg("entropy_coef", self.entropy_coef)
        if self.scale not in ("none", "group"):
            raise ValueError(f"scale: expected 'none' or 'group', got {self.scale!r}")
        if not (math.isfinite(self.luffy_gamma) and self.luffy_gamma > 0):
            raise ValueError(f"luffy_gamma: expected a finite value > 0, got {self.luffy_gamma!r}")


@dataclass
class TrainConfig:
    """One RL run. Use `TrainConfig.from_budget(...)` for consistent sizes; every field can be overridden."""

    model: str = "tiny"
    """Policy to train: "tiny" (embedded default), a local path, or a hub id (passed to calibrl.models.load_policy)."""
    quantization: str | None = None
    """None (full precision) or "4bit" (bitsandbytes NF4 + LoRA, for hub VLMs on a GPU; see calibrl.models)."""
    task: str | None = None
    """Task family for calibrl.tasks.make_dataset; None = calibrl.tasks.DEFAULT_TASK."""
    expert_style: str = "expert"
    """Style of the expert solutions the expert modes see: "expert" (long, off-policy chains of thought, the paper's
    setting) or "policy" (the short style the warm start taught, i.e. an expert close to the policy, which makes
    CalibRL's gate split tokens instead of sitting on one side)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss mode and knobs (LossConfig.preset(mode) gives each recipe)."""
    steps: int = 40
    """Number of RL steps (one rollout + update each)."""
    prompts_per_step: int = 8
    """P: prompts per RL step (one image each, repeated G times)."""
    group_size: int = 8
    """G: on-policy samples per prompt (>= 2; the expert row, when used, is extra)."""
    max_new_tokens: int = 32
    """Maximum sampled response length in tokens (also the norm length of seq-mean-token-sum-norm)."""
    max_expert_tokens: int = 256
    """Expert solutions are tokenized up to this many tokens (EOS included); the probes that describe the expert
    (expert_len_mean, entropy_expert) read the whole row. What is trained on or summed is cut by `expert_horizon`."""
    expert_horizon: str = "on-policy"
    """Where an expert row is trained on (LUFFY, RL-PLUS) or summed (CalibRL's sequence and mean-token gaps):
    "on-policy" (default) cuts it to its first max_new_tokens tokens, the part a sampler limited to max_new_tokens
    could produce, so expert and on-policy sums cover the same horizon; "full" uses the whole row up to
    max_expert_tokens (what the official LUFFY/RL-PLUS code does with its long expert budget). CalibRL's default
    token gap reads only the first T positions either way."""
    temperature: float = 1.0
    """Sampling temperature; the training log-probs use the same temperature-scaled logits."""
    top_p: float = 1.0
    """Nucleus sampling threshold; log-probs are of the temperature-scaled (not top-p-truncated) distribution."""
    ppo_epochs: int = 1
    """Passes over the rollout per RL step."""
    minibatches: int = 2
    """Mini-batches per PPO epoch, one optimizer step each. Optimizer steps per RL step = ppo_epochs * minibatches
    in EVERY mode: mini-batches are made of whole prompts (on-policy rows plus, for LUFFY/RL-PLUS, the prompt's expert
    row), so an expert row never adds a step (the official code gives CalibRL 5 steps and GRPO 4; not repeated here)."""
    grad_accum: int = 1
    """Micro-batches per mini-batch whose gradients are accumulated before the optimizer step. Micro-batches are
    whole prompts (a prompt's rows and its expert row stay together), so grad_accum must be <= the prompts of a
    mini-batch; when it does not divide them, the micro-batches differ in size by one prompt."""
    loss_norm: str = "micro-batch"
    """How micro-batch losses combine into the mini-batch gradient. "micro-batch" (default): each micro-batch is
    aggregated on its own (e.g. its own token-mean) and divided by grad_accum -- the official CalibRL code's
    behaviour (its old verl fork). "mini-batch": each micro-batch is weighted by its share of the mini-batch's
    normalising units (tokens for token-mean, rows for the seq-mean modes, 1 for seq-mean-token-sum-norm), so the
    gradient equals that of one loss over the whole mini-batch -- verl 0.9.1's global normalisation. The two agree
    when grad_accum = 1."""
    max_consecutive_skips: int = 5
    """A mini-batch whose log-probs, loss or gradients are non-finite is skipped (no optimizer step; the History
    row says why); this many consecutive skipped optimizer steps stop the run with an error (history kept)."""
    lr: float = 5e-4
    """AdamW learning rate (constant) of the LoRA weights. On the shipped tiny model (GRPO, small budget, 1 seed):
    2e-4 moved it little (KL to start 0.003 after 12 steps); 1e-3 learned stably over 24 steps (KL 0.046, format
    0.94); 5e-4 is the default in between."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    lora_r: int = 16
    """LoRA rank on the language model's projections."""
    lora_alpha: int = 32
    """LoRA alpha."""
    seed: int = 0
    """Seed of the data order, sampling and mini-batch shuffling (same across modes of a comparison)."""
    train_size: int = 512
    """Number of procedurally generated training prompts (the data order cycles through them)."""
    eval_every: int = 10
    """Evaluate every this many steps (and at the last step); 0 disables evaluation."""
    eval_n: int = 32
    """Held-out prompts per evaluation (the same for every seed and mode)."""
    pass_k: int = 4
    """k of pass@k: samples per held-out prompt at `temperature`."""
    kl_every: int = 1
    """Log kl_to_start every this many steps (one no-grad forward with the adapter disabled); 0 = never."""
    grad_split_every: int = 1
    """Measure the policy-vs-guidance gradient split every this many steps (calibrl only); 0 = never."""
    recompute_old_logp: bool | None = None
    """False: old log-probs of on-policy rows are the sampler's own (recorded while decoding) and one forward
    computes the expert rows; True: one teacher-forced forward over on-policy and expert rows together; None (auto):
    True when the policy does not run in float32 (bf16/fp16/4-bit, where sampler and training kernels differ and the
    first mini-batch's ratio would not be 1), else False. Either way logp_gap_max compares the sampler's recorded
    log-probs with the training forward every step."""
    sampler: str = "auto"
    """Sampling path: "shared-prefix" (Qwen2/2.5-VL: the prompt runs once per prompt, its KV cache shared by the G
    rows, in sampling and in the training forward; not with gradient checkpointing), "generate" (transformers
    `generate` with a whitelisted config and a logits processor that is calibrl's distribution; any VLM) or "auto"
    (shared-prefix where supported). Both sample the same distribution and record its log-probs."""
    gradient_checkpointing: bool | None = None
    """Gradient checkpointing of the policy (passed to calibrl.models.load_policy): None = on for 4-bit, off
    otherwise. It disables the shared-prefix path (sampler "auto" then takes "generate")."""
    samples_per_step: int = 4
    """On-policy responses per step written to samples.jsonl (entropy heatmap)."""
    save_every: int = 1
    """Checkpoint (trainable weights, optimizer, RNG states, data position) at the start and every this many steps
    (default 1: every step, ~1% of a tiny-model step; the full budget uses 5); 0 = only at the end, and then a crash
    cannot be resumed. A kill at any point resumes from the last checkpoint, replaying later steps bit-identically."""
    threads: int | None = None
    """torch.set_num_threads for this run; None keeps the current setting."""
    out: str = "runs"
    """Parent directory of run directories."""
    name: str | None = None
    """Run directory name under `out`; None = "<mode>-s<seed>"."""

    @classmethod
    def from_budget(cls, budget: str = "small", **overrides: Any) -> "TrainConfig":
        """A config sized by one dial, then `overrides` (TrainConfig fields, LossConfig fields, or `mode`).

        - smoke: 3 steps, P=2, G=4, 24 new tokens (the tiny policy answers in about 19 tokens); seconds per mode on
          2 CPU cores (CI).
        - small: 60 steps, P=8, G=8, 32 new tokens, 2 mini-batches; about 75 s per mode on 2 quiet CPU cores.
        - full: 200 steps, P=16, G=8, 48 new tokens, 4 mini-batches; for a GPU or a long CPU run.
        """
        sizes: dict[str, dict[str, Any]] = {
            "smoke": dict(steps=3, prompts_per_step=2, group_size=4, max_new_tokens=24, minibatches=2, train_size=32,
                          eval_every=3, eval_n=4, pass_k=2, samples_per_step=2),
            "small": dict(steps=60, prompts_per_step=8, group_size=8, max_new_tokens=32, minibatches=2, train_size=512,
                          eval_every=10, eval_n=32, pass_k=4),
            "full": dict(steps=200, prompts_per_step=16, group_size=8, max_new_tokens=48, minibatches=4,
                         train_size=4096, eval_every=20, eval_n=128, pass_k=8, save_every=5),
        }
        if budget not in sizes:
            raise ValueError(f"budget: expected one of {BUDGETS}, got {budget!r}")
        loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
        loss_kw = {k: overrides.pop(k) for k in list(overrides) if k in loss_fields}
        loss = overrides.pop("loss", None)
        if loss is None:
            loss = LossConfig.preset(loss_kw.pop("mode", "calibrl"), **loss_kw)
        elif loss_kw:
            loss = dataclasses.replace(loss, **loss_kw)
        _check_known(cls, overrides, also=loss_fields)
        cfg = cls(loss=loss, **{**sizes[budget], **overrides})
        cfg.validate()
        return cfg

    @property
    def run_name(self) -> str:
        """The run directory name: `name`, or "<mode>-s<seed>"."""
        return self.name or f"{self.loss.mode}-s{self.seed}"

    @property
    def opt_steps_per_rl_step(self) -> int:
        """Optimizer steps per RL step: ppo_epochs * minibatches, whatever the mode."""
        return self.ppo_epochs * self.minibatches

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not isinstance(self.loss, LossConfig):
            raise ValueError(f"loss: expected a LossConfig, got {type(self.loss).__name__}")
        self.loss.validate()
        check_types(self)
        if self.quantization not in (None, "4bit"):
            raise ValueError(f"quantization: expected None or '4bit', got {self.quantization!r}")
        if self.expert_style not in ("expert", "policy"):
            raise ValueError(f"expert_style: expected 'expert' or 'policy', got {self.expert_style!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: expected 'tiny', a path or a hub id, got {self.model!r}")
        ints = dict(steps=1, prompts_per_step=1, group_size=2, max_new_tokens=1, max_expert_tokens=2, ppo_epochs=1,
                    minibatches=1, grad_accum=1, lora_r=1, lora_alpha=1, train_size=1, eval_every=0, eval_n=1,
                    pass_k=1, kl_every=0, grad_split_every=0, samples_per_step=0, save_every=0,
                    max_consecutive_skips=1)
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if self.prompts_per_step % self.minibatches:
            raise ValueError(f"minibatches: must divide prompts_per_step={self.prompts_per_step} (mini-batches are "
                             f"whole prompts, so every mode takes the same optimizer steps), got {self.minibatches}")
        if self.prompts_per_step // self.minibatches < self.grad_accum:
            raise ValueError(f"grad_accum: expected <= prompts per mini-batch "
                             f"({self.prompts_per_step // self.minibatches}; micro-batches are whole prompts), "
                             f"got {self.grad_accum}")
        choices = dict(sampler=("auto", "shared-prefix", "generate"), loss_norm=("micro-batch", "mini-batch"),
                       expert_horizon=("on-policy", "full"))
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name}: expected one of {ok}, got {getattr(self, name)!r}")
        for name in ("recompute_old_logp", "gradient_checkpointing"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name}: expected None, True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: expected a finite value > 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        for name in ("lr", "max_grad_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite value > 0, got {v!r}")
        _finite_nonneg("weight_decay", self.weight_decay)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected None or an integer >= 1, got {self.threads!r}")
        if self.name is not None:
            check_name(self.name, "name")
        if not self.out:
            raise ValueError(f"out: expected a directory path, got {self.out!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the loss nested under "loss")."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict` (as written to runs/<name>/config.json)."""
        if not isinstance(d, dict):
            raise ValueError(f"d: expected a dict (a config.json object), got {type(d).__name__}")
        d = dict(d)
        loss = d.pop("loss", {})
        if not isinstance(loss, dict):
            raise ValueError(f"loss: expected a JSON object of LossConfig fields, got {type(loss).__name__}")
        _check_known(LossConfig, loss, "loss.")
        _check_known(cls, d)
        cfg = cls(loss=LossConfig(**loss), **d)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        """`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def config_keys() -> dict[str, str]:
    """Every key `parse_value` / `TrainConfig.from_budget` accepts (TrainConfig and LossConfig fields but the
    nested `loss`), with its expected type in words."""
    out = {}
    for cls in (TrainConfig, LossConfig):
        types = field_types(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = expected_words(*types[f.name]) if f.name in types else "a JSON value"
    out.pop("loss", None)
    return out


def parse_value(key: str, text: str) -> Any:
    """The value of `--set KEY=TEXT`, parsed by the field's type: bools from true/false/yes/no/on/off/1/0, integers
    and numbers from ASCII digits, none/null for optional fields, strings as written (JSON quotes removed); fields
    of other types from JSON. ValueError (one line naming the key and the expected type) for an unknown key or a
    value of the wrong type."""
    keys = config_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"--set {key}: unknown key{hint}; valid keys: {', '.join(sorted(keys))}")
    cls = TrainConfig if key in {f.name for f in dataclasses.fields(TrainConfig)} else LossConfig
    types = field_types(cls)
    if key not in types:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--set {key}: expected a JSON value, got {text!r}") from None
    return parse_typed(text, *types[key], f"--set {key}")


def _finite_nonneg(name: str, v: Any) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name}: expected a finite value >= 0, got {v!r}")
