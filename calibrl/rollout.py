"""Rollout: G samples per prompt, expert rows, and the old log-probs, from one sampling distribution on every path.

The invariant everything rests on: the trainer's teacher-forced log-probs are the sampler's. Both sampler paths draw
from calibrl.logprobs.sampler_log_softmax (suppressed ids at -inf, temperature) and record the chosen tokens'
log-probs while decoding, and the teacher-forced passes of the same path go through
calibrl.logprobs.head_token_logprobs:
- "shared-prefix" (calibrl.prefix, Qwen2/2.5-VL without gradient checkpointing): the image and prompt run once per
  prompt and their KV cache is shared by the prompt's G rows, in sampling and in the training forward;
- "generate" (calibrl.plain, any VLM): `generate` with a clean, whitelisted generation config (the checkpoint's
  repetition_penalty, top_k, ... are never inherited) and one forward per row for teacher forcing.
`sampler="auto"` takes the shared prefix where supported. Every EOS id of the checkpoint ends a response.

The data path of one RL step is split in stages: `rollout` (sample + old/expert/ref log-probs, no scoring),
`score_rollout` (rewards with a pluggable `reward_fn`) and `with_advantages`; `collect_rollout` runs all three.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from calibrl.config import TrainConfig
from calibrl.logprobs import entropy_from_logp, head_token_logprobs, sampler_log_softmax, token_logprobs  # noqa: F401
from calibrl.prompts import encode_prompts, select_rows  # noqa: F401  (public here for compatibility)

Inputs = dict[str, torch.Tensor]
SAMPLERS = ("auto", "shared-prefix", "generate")
RewardFn = Callable[[str, Any], dict]


# ------------------------------------------------------------------------------------------------- masks, paths
def _eos_list(eos_token_ids: int | Sequence[int]) -> list[int]:
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_ids: expected an int or a non-empty list of ints, got {eos_token_ids!r}")
    return ids


def response_mask(completion_ids: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    """Bool [N,T]: True up to and including the first EOS (any of `eos_token_ids`; all True when a row never ends).
    Works when an EOS id is also the pad id (the pads after the first EOS are masked)."""
    eos = torch.as_tensor(_eos_list(eos_token_ids), dtype=completion_ids.dtype, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).long()
    return (torch.cumsum(is_eos, 1) - is_eos) == 0  # no EOS strictly before t


def resolve_sampler(policy: Any, inputs: Inputs, sampler: str = "auto") -> str:
    """The sampler path for these inputs: "shared-prefix" or "generate". ValueError when "shared-prefix" is asked
    for but cannot run (the reason named)."""
    from calibrl import prefix

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    why = prefix.unsupported_reason(policy.model, inputs) if sampler != "generate" else "not asked for"
    if sampler == "shared-prefix" and why:
        raise ValueError(f"sampler: 'shared-prefix' cannot run: {why}; use 'generate' or 'auto'")
    return "shared-prefix" if why is None else "generate"


def sequence_logprobs(model: Any, inputs: Inputs, completion_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                      suppress_token_ids: Sequence[int], temperature: float = 1.0, return_entropy: bool = False,
                      fill_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-path teacher-forced log-probs [N,T] of `completion_ids` after the left-padded prompts `inputs` (N rows);
    0 where `completion_mask` is 0. Gradient flows outside `torch.no_grad()`."""
    from calibrl.logprobs import decoder_and_head
    from calibrl.plain import sequence_hidden

    n, t = completion_ids.shape
    if inputs["input_ids"].shape[0] != n or completion_mask.shape != (n, t):
        raise ValueError(f"completion_ids/completion_mask: expected [{inputs['input_ids'].shape[0]}, T] each, got "
                         f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}")
    m = completion_mask.bool()
    if not m.any():
        raise ValueError("completion_mask: expected at least one real completion token, got all zeros")
    fill = fill_token_id if fill_token_id is not None else int(completion_ids[m][0])
    hidden = sequence_hidden(model, inputs, completion_ids, m, fill)
    return head_token_logprobs(hidden, decoder_and_head(model)[1], completion_ids, m,
                               suppress_token_ids=suppress_token_ids, temperature=temperature,
                               return_entropy=return_entropy)


def _rows_logprobs(policy: Any, inputs: Inputs, row_prompt: torch.Tensor, comp: torch.Tensor, mask: torch.Tensor,
                   temperature: float, return_entropy: bool, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unchecked kernel of `rows_logprobs` (inputs already validated, path resolved)."""
    from calibrl import prefix
    from calibrl.logprobs import decoder_and_head
    from calibrl.plain import sequence_hidden

    if path == "shared-prefix":
        hidden = prefix.shared_hidden(policy.model, inputs, row_prompt, comp, mask, policy.eos_token_id)
    else:
        hidden = sequence_hidden(policy.model, select_rows(inputs, row_prompt), comp, mask, policy.eos_token_id)
    return head_token_logprobs(hidden, decoder_and_head(policy.model)[1], comp, mask,
                               suppress_token_ids=policy.suppress_token_ids, temperature=temperature,
                               return_entropy=return_entropy)


def rows_logprobs(policy: Any, inputs: Inputs, row_prompt: torch.Tensor, comp: torch.Tensor, mask: torch.Tensor, *,
                  temperature: float = 1.0, return_entropy: bool = False, chunk: int | None = None,
                  sampler: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log-probs [N,T] (and entropy) of completions `comp` after prompt `row_prompt[r]` of `inputs`
    (P prompts), by the teacher-forced pass of the `sampler` path; both equal the sampler's log-probs. Gradients flow
    unless under no_grad; `chunk` bounds rows per forward (no-grad passes)."""
    n = comp.shape[0]
    if comp.dim() != 2 or mask.shape != comp.shape or row_prompt.shape != (n,):
        raise ValueError(f"row_prompt/comp/mask: expected [N], [N,T], [N,T], got {tuple(row_prompt.shape)}, "
                         f"{tuple(comp.shape)}, {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("mask: expected at least one real completion token, got all zeros")
    path = resolve_sampler(policy, inputs, sampler)
    if not chunk or n <= chunk:
        return _rows_logprobs(policy, inputs, row_prompt, comp, mask.bool(), temperature, return_entropy, path)
    parts = [_rows_logprobs(policy, inputs, row_prompt[s:s + chunk], comp[s:s + chunk], mask[s:s + chunk].bool(),
                            temperature, return_entropy, path) for s in range(0, n, chunk)]
    return torch.cat([a for a, _ in parts]), (torch.cat([b for _, b in parts]) if return_entropy else None)


# ------------------------------------------------------------------------------------------------------ sampling
@dataclass
class Samples:
    """Sampler output, N = P*G rows grouped by prompt: tokens, mask up to and including the first EOS, and the
    sampler's own chosen-token log-probs and entropies (0 past the mask)."""

    completion_ids: torch.Tensor            # [N,T]
    mask: torch.Tensor                      # [N,T] bool
    logp: torch.Tensor                      # [N,T] recorded while decoding
    entropy: torch.Tensor                   # [N,T] at the sampling temperature
    entropy_t1: torch.Tensor | None = None  # [N,T] at T = 1 (when asked)
    path: str = "shared-prefix"


def sample_groups(policy: Any, inputs: Inputs, group_size: int, *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, greedy: bool = False, sampler: str = "auto",
                  entropy_t1: bool = False) -> Samples:
    """`group_size` responses per prompt (rows grouped by prompt) from calibrl's sampling distribution on the
    `sampler` path; the sampler's chosen-token log-probs are always recorded."""
    from calibrl import plain, prefix

    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
    path = resolve_sampler(policy, inputs, sampler)
    kw = dict(max_new_tokens=max_new_tokens, eos_token_ids=policy.eos_token_ids, pad_token_id=policy.pad_token_id,
              suppress_token_ids=policy.suppress_token_ids, temperature=temperature, top_p=top_p, greedy=greedy,
              entropy_t1=entropy_t1)
    if path == "shared-prefix":
        comp, mask, lp, ent, e1 = prefix.sample_shared(policy.model, inputs, group_size, **kw)
        return Samples(comp, mask, lp, ent, e1, path)
    rows = torch.arange(inputs["input_ids"].shape[0]).repeat_interleave(group_size)
    comp, lp, ent, e1 = plain.sample_generate(policy.model, select_rows(inputs, rows), **kw)
    mask = response_mask(comp, policy.eos_token_ids)
    zero = lambda x: None if x is None else torch.where(mask, x, torch.zeros_like(x))
    return Samples(comp, mask, zero(lp), zero(ent), zero(e1), path)


def tokenize_experts(policy: Any, solutions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert solutions as responses: no chat template, no special tokens, EOS appended, truncated to
    `max_tokens` (EOS kept), right-padded. Returns (ids [P,Te], mask [P,Te] bool)."""
    rows = []
    for i, s in enumerate(solutions):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"solution[{i}]: expected a non-empty expert solution string, got {s!r}")
        ids = policy.tokenizer(s, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        rows.append(ids + [policy.eos_token_id])
    te = max(len(r) for r in rows)
    ids = torch.full((len(rows), te), policy.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), te), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


# --------------------------------------------------------------------------------------------------------- batch
@dataclass
class RolloutBatch:
    """One RL step's data. N = P*G on-policy rows (row r belongs to prompt r // G), T response tokens; expert rows
    (one per prompt) are separate tensors of width Te. `rollout` fills the sampling fields; `score_rollout` the
    reward fields; `with_advantages` adv and expert_adv."""

    prompt_inputs: Inputs                 # processor output, P rows
    row_prompt: torch.Tensor              # [N] prompt index of each on-policy row (= group id)
    prompt_ids: list[int]                 # dataset index of each prompt
    completion_ids: torch.Tensor          # [N,T]
    mask: torch.Tensor                    # [N,T] bool, up to and including the first EOS
    old_logp: torch.Tensor                # [N,T] log-probs under the sampling policy, 0 at pads
    sampler_logp: torch.Tensor            # [N,T] recorded by the sampler while decoding (the drift reference)
    entropy: torch.Tensor                 # [N,T] entropy of the sampling (tempered) distribution, 0 at pads
    expert_ids: torch.Tensor              # [P,Te]
    expert_mask: torch.Tensor             # [P,Te] bool
    expert_old_logp: torch.Tensor         # [P,Te] under the sampling policy, 0 at pads
    expert_entropy: torch.Tensor          # [P,Te]
    entropy_t1: torch.Tensor | None = None         # [N,T] entropy at T = 1 (the same tensor when temperature = 1)
    expert_entropy_t1: torch.Tensor | None = None  # [P,Te]
    ref_logp: torch.Tensor | None = None  # [N,T] start policy (adapter disabled), when computed
    sampler: str = "shared-prefix"        # the path that sampled
    temperature: float = 1.0
    texts: list[str] = field(default_factory=list)  # decoded responses (score_rollout)
    rewards: torch.Tensor | None = None   # [N]
    acc: torch.Tensor | None = None       # [N]
    fmt: torch.Tensor | None = None       # [N]
    passed: torch.Tensor | None = None    # [N] bool (reward > 0.1)
    expert_rewards: torch.Tensor | None = None  # [P]
    adv: torch.Tensor | None = None       # [N] group advantages over on-policy rows
    expert_adv: torch.Tensor | None = None  # [P] expert reward - on-policy group mean
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        """N, the number of on-policy rows."""
        return int(self.completion_ids.shape[0])

    @property
    def expert_logp(self) -> torch.Tensor:
        """[N,T] expert old log-prob of each row's prompt aligned by token index, 0 past the expert's end."""
        t = self.completion_ids.shape[1]
        return _pad_to(self.expert_old_logp, t, 0.0)[:, :t][self.row_prompt]

    def expert_train_mask(self, horizon: int | None) -> torch.Tensor:
        """[P,Te] expert mask cut to the first `horizon` tokens (None = whole rows): the part of an expert row a
        sampler limited to `horizon` new tokens could produce."""
        if horizon is None:
            return self.expert_mask
        keep = torch.arange(self.expert_mask.shape[1], device=self.expert_mask.device)[None, :] < horizon
        return self.expert_mask & keep


def _pad_to(x: torch.Tensor, t: int, value: float | int | bool) -> torch.Tensor:
    if x.shape[1] >= t:
        return x
    return torch.cat([x, torch.full((x.shape[0], t - x.shape[1]), value, dtype=x.dtype, device=x.device)], 1)


def needs_recompute(policy: Any, cfg: TrainConfig) -> bool:
    """Whether the old log-probs are recomputed by a teacher-forced pass: cfg.recompute_old_logp, or when None
    (auto) whenever the policy does not run in float32 (bf16/fp16/4-bit): the sampler's and the training forward's
    reduced-precision kernels differ, so the first mini-batch's ratio would not be 1."""
    if cfg.recompute_old_logp is not None:
        return bool(cfg.recompute_old_logp)
    dt = next(policy.model.parameters()).dtype
    return policy.quantization is not None or dt != torch.float32 or any(
        p.dtype != torch.float32 for p in policy.model.parameters() if p.is_floating_point())


def rollout(policy: Any, examples: Sequence[dict], cfg: TrainConfig, *, prompt_ids: Sequence[int],
            ref_logp: bool = False) -> RolloutBatch:
    """Sample G responses for each example (dict with image, question and, for the expert modes, solution) and
    compute the old log-probs of the on-policy rows and of the expert rows under the same (pre-update) policy, and
    optionally the start policy's (adapter disabled). No scoring: see `score_rollout`."""
    if not examples or len(prompt_ids) != len(examples):
        raise ValueError(f"examples/prompt_ids: expected equal non-zero lengths, got {len(examples)} and "
                         f"{len(prompt_ids)}")
    t0 = time.perf_counter()
    p, g, temp = len(examples), cfg.group_size, cfg.temperature
    inputs = encode_prompts(policy, [e["image"] for e in examples], [e["question"] for e in examples])
    path = resolve_sampler(policy, inputs, cfg.sampler)
    row_prompt = torch.arange(p).repeat_interleave(g)
    model = policy.model
    was_training = model.training
    if policy.eval_mode_ok:  # not 4-bit on CPU (see Policy.eval_mode_ok)
        model.train(False)
    s = sample_groups(policy, inputs, g, max_new_tokens=cfg.max_new_tokens, temperature=temp, top_p=cfg.top_p,
                      sampler=path, entropy_t1=temp != 1.0)
    comp, mask = s.completion_ids, s.mask
    t1 = time.perf_counter()
    has_expert = all(e.get("solution") is not None for e in examples)
    if has_expert:
        exp_ids, exp_mask = tokenize_experts(policy, [e["solution"] for e in examples], cfg.max_expert_tokens)
        exp_ids, exp_mask = exp_ids.to(comp.device), exp_mask.to(comp.device)
    else:  # no expert column (allowed for modes that do not use it): empty expert tensors, null probes
        exp_ids = torch.zeros((p, 0), dtype=torch.long, device=comp.device)
        exp_mask = torch.zeros((p, 0), dtype=torch.bool, device=comp.device)
    lp_kw = dict(temperature=temp, return_entropy=True, chunk=64, sampler=path)
    e_ent1 = None
    with torch.no_grad():
        if needs_recompute(policy, cfg):  # one pass over on-policy and expert rows together
            t = max(comp.shape[1], exp_ids.shape[1])
            all_rows = torch.cat([row_prompt, torch.arange(p)])
            all_comp = torch.cat([_pad_to(comp, t, policy.pad_token_id), _pad_to(exp_ids, t, policy.pad_token_id)])
            all_mask = torch.cat([_pad_to(mask, t, False), _pad_to(exp_mask, t, False)])
            lp, ent = rows_logprobs(policy, inputs, all_rows, all_comp, all_mask, **lp_kw)
            n = p * g
            old_logp, entropy = lp[:n, : comp.shape[1]], ent[:n, : comp.shape[1]]
            e_lp, e_ent = lp[n:, : exp_ids.shape[1]], ent[n:, : exp_ids.shape[1]]
        else:  # on-policy old log-probs are the sampler's own; one forward for the expert rows
            old_logp, entropy = s.logp, s.entropy
            if has_expert:
                e_lp, e_ent = rows_logprobs(policy, inputs, torch.arange(p), exp_ids, exp_mask, **lp_kw)
            else:
                e_lp = e_ent = torch.zeros((p, 0), device=comp.device)
        if has_expert and temp != 1.0:
            _, e_ent1 = rows_logprobs(policy, inputs, torch.arange(p), exp_ids, exp_mask,
                                      **{**lp_kw, "temperature": 1.0})
    t2 = time.perf_counter()
    ref = None
    if ref_logp:
        if not policy.is_lora:
            raise ValueError("ref_logp: the start policy needs a LoRA policy (adapter disabled = start policy)")
        with model.disable_adapter(), torch.no_grad():
            ref, _ = rows_logprobs(policy, inputs, row_prompt, comp, mask, temperature=temp, chunk=64, sampler=path)
    model.train(was_training)
    t3 = time.perf_counter()
    return RolloutBatch(
        prompt_inputs=inputs, row_prompt=row_prompt, prompt_ids=list(prompt_ids), completion_ids=comp, mask=mask,
        old_logp=old_logp, sampler_logp=s.logp, entropy=entropy,
        entropy_t1=entropy if temp == 1.0 else s.entropy_t1,
        expert_ids=exp_ids, expert_mask=exp_mask, expert_old_logp=e_lp, expert_entropy=e_ent,
        expert_entropy_t1=e_ent if temp == 1.0 or not has_expert else e_ent1, ref_logp=ref, sampler=path,
        temperature=float(temp), timings={"generate_s": t1 - t0, "old_logp_s": t2 - t1, "ref_logp_s": t3 - t2})


def score_rollout(b: RolloutBatch, policy: Any, examples: Sequence[dict],
                  reward_fn: RewardFn | None = None) -> RolloutBatch:
    """Decode the responses and score them with `reward_fn(completion, answer) -> dict` with keys reward, acc, fmt
    (default calibrl.rewards.score); the expert solutions are scored too. Returns a new batch."""
    from calibrl.advantage import pass_mask
    from calibrl.rewards import score

    fn = reward_fn or score
    t0 = time.perf_counter()
    texts = policy.tokenizer.batch_decode(torch.where(b.mask, b.completion_ids, policy.pad_token_id).cpu(),
                                          skip_special_tokens=True)
    scores = [_checked(fn(txt, examples[int(i)]["answer"]), "reward_fn") for txt, i in zip(texts, b.row_prompt)]
    rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    has_expert = all(e.get("solution") is not None for e in examples)
    exp_r = torch.tensor([_checked(fn(e["solution"], e["answer"]), "reward_fn")["reward"] if has_expert else 0.0
                          for e in examples], dtype=torch.float32)
    return dataclasses.replace(
        b, texts=texts, rewards=rewards, passed=pass_mask(rewards), expert_rewards=exp_r,
        acc=torch.tensor([float(s["acc"]) for s in scores], dtype=torch.float32),
        fmt=torch.tensor([float(s["fmt"]) for s in scores], dtype=torch.float32),
        timings={**b.timings, "reward_s": time.perf_counter() - t0})


def _checked(s: Any, name: str) -> dict:
    import math

    if not isinstance(s, dict) or not {"reward", "acc", "fmt"} <= set(s):
        raise ValueError(f"{name}: expected a dict with keys reward, acc, fmt, got {s!r}")
    if not all(isinstance(s[k], (int, float)) and math.isfinite(float(s[k])) for k in ("reward", "acc", "fmt")):
        raise ValueError(f"{name}: expected finite numbers for reward, acc, fmt, got {s!r}")
    return s


def with_advantages(b: RolloutBatch, scale: str = "none") -> RolloutBatch:
    """Group advantages over the on-policy rows and the expert's advantage (its reward - the group mean)."""
    from calibrl.advantage import group_advantages

    if b.rewards is None:
        raise ValueError("b: expected a scored batch (score_rollout first), got rewards None")
    p = b.expert_ids.shape[0]
    group_mean = torch.stack([b.rewards[b.row_prompt == i].mean() for i in range(p)])
    return dataclasses.replace(b, adv=group_advantages(b.rewards, b.row_prompt, scale=scale),
                               expert_adv=b.expert_rewards - group_mean)


def collect_rollout(policy: Any, examples: Sequence[dict], cfg: TrainConfig, *, prompt_ids: Sequence[int],
                    ref_logp: bool = False, reward_fn: RewardFn | None = None) -> RolloutBatch:
    """`rollout`, then `score_rollout`, then `with_advantages`: one RL step's complete batch."""
    b = rollout(policy, examples, cfg, prompt_ids=prompt_ids, ref_logp=ref_logp)
    return with_advantages(score_rollout(b, policy, examples, reward_fn), cfg.loss.scale)
