"""Rollout: G samples per prompt with `generate`, expert rows, and the teacher-forced log-probs that match the sampler.

The one invariant everything rests on: `sequence_logprobs` reproduces the sampler's log-probs. It uses the same
masked logits (suppressed vision tokens at -inf), the same temperature, the same positions (Qwen2.5-VL needs
`mm_token_type_ids`, extended with zeros over the completion) and never lets a -inf log-prob of a pad after EOS
reach arithmetic (`torch.where`, not multiplication by the mask).

Two equivalent paths: `sequence_logprobs` (plain: one forward per row over prompt + completion, any VLM) and, for
Qwen2/2.5-VL, calibrl.prefix (the image and prompt run once per prompt and their KV cache is shared by the prompt's
G rows, in sampling and in the training forward). `rows_logprobs` and `sample_groups` pick the path; tests check
both against the sampler and against each other, and the trainer logs the sampler-vs-trainer gap every step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from calibrl.config import TrainConfig

Inputs = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- prompts and rows
def encode_prompts(policy: Any, images: Sequence[Any], questions: Sequence[str]) -> Inputs:
    """Processor output for one image + question per prompt, left-padded (rows = prompts)."""
    from calibrl.data import build_messages

    if len(images) != len(questions) or not questions:
        raise ValueError(f"images/questions: expected equal non-zero lengths, got {len(images)} and {len(questions)}")
    proc = policy.processor
    if proc is None or not hasattr(proc, "image_processor"):
        raise ValueError(f"policy.processor: expected a multimodal processor with an image_processor, got "
                         f"{type(proc).__name__}")
    texts = [proc.apply_chat_template(build_messages(q), add_generation_prompt=True, tokenize=False) for q in questions]
    tok = policy.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = proc(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    device = next(policy.model.parameters()).device
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in enc.items()}


def _image_chunks(inputs: Inputs) -> list[torch.Tensor] | None:
    if "pixel_values" not in inputs:
        return None
    grid = inputs.get("image_grid_thw")
    if grid is None:  # one fixed-size image per row (LLaVA-like processors)
        return list(inputs["pixel_values"].unbind(0))
    sizes = grid.prod(-1).tolist()
    return list(inputs["pixel_values"].split(sizes, 0))


def select_rows(inputs: Inputs, rows: torch.Tensor | Sequence[int]) -> Inputs:
    """Rows `rows` (repeats allowed) of a prompt batch, with the flattened per-image pixel patches re-gathered."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    n = inputs["input_ids"].shape[0]
    if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= n:
        raise ValueError(f"rows: expected a non-empty index into {n} prompts, got {rows.tolist()}")
    out = {k: v[rows] for k, v in inputs.items() if k not in ("pixel_values",) and torch.is_tensor(v) and v.shape[0] == n}
    chunks = _image_chunks(inputs)
    if chunks is not None:
        if "image_grid_thw" in inputs:
            out["pixel_values"] = torch.cat([chunks[i] for i in rows.tolist()], 0)
        else:
            out["pixel_values"] = torch.stack([chunks[i] for i in rows.tolist()], 0)
    return out


# ------------------------------------------------------------------------------------------------------ log-probs
def sampler_log_softmax(logits: torch.Tensor, suppress_token_ids: Sequence[int],
                        temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [..., V] of the distribution the sampler draws from: float32 logits, suppressed ids at -inf, divided
    by temperature. The one definition used by sampling (calibrl.prefix) and by every teacher-forced forward, so the
    trainer's log-probs are the sampler's (a mismatch silently turns RL off-policy)."""
    z = logits.float()
    if len(suppress_token_ids):
        idx = torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=z.device)
        z = z.index_fill(-1, idx, float("-inf"))
    return torch.log_softmax(z / temperature, dim=-1)


def entropy_from_logp(logp_all: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis from log-probs; -inf entries (suppressed ids) contribute 0 instead of NaN."""
    return -(logp_all.exp() * torch.where(torch.isfinite(logp_all), logp_all, torch.zeros_like(logp_all))).sum(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                   suppress_token_ids: Sequence[int], temperature: float = 1.0,
                   return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of `targets` [N,T] under logits [N,T,V] masked like the sampler; 0 where mask is 0.

    Suppressed ids get -inf, then logits / temperature, log_softmax in float32. Entropy (optional) is of the
    same distribution, 0 at masked positions.
    """
    if logits.dim() != 3 or logits.shape[:2] != targets.shape or mask.shape != targets.shape:
        raise ValueError(f"logits/targets/mask: expected [N,T,V], [N,T], [N,T], got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    logp_all = sampler_log_softmax(logits, suppress_token_ids, temperature)
    m = mask.bool()
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(m, logp, torch.zeros_like(logp))  # pads after EOS may be suppressed ids: -inf
    ent = None
    if return_entropy:
        ent = entropy_from_logp(logp_all)
        ent = torch.where(m, ent, torch.zeros_like(ent))
    return logp, ent


def sequence_logprobs(model: Any, inputs: Inputs, completion_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                      suppress_token_ids: Sequence[int], temperature: float = 1.0, return_entropy: bool = False,
                      fill_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log-probs [N,T] of `completion_ids` after the left-padded prompts `inputs` (N rows).

    Reproduces `generate`: attention_mask and mm_token_type_ids (zeros) are extended over the completion, the
    suppressed ids are masked to -inf, logits are temperature-scaled, and only the last T+1 positions are computed
    (`logits_to_keep`). Positions where `completion_mask` is 0 return 0 (never -inf or NaN). Gradient flows when
    called outside `torch.no_grad()`.
    """
    ids = inputs["input_ids"]
    n, t = completion_ids.shape
    if ids.shape[0] != n or completion_mask.shape != (n, t):
        raise ValueError(f"completion_ids/completion_mask: expected [{ids.shape[0]}, T] each, got "
                         f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}")
    m = completion_mask.bool()
    if not m.any():
        raise ValueError("completion_mask: expected at least one real completion token, got all zeros")
    fill = fill_token_id if fill_token_id is not None else int(completion_ids[m][0])
    comp = torch.where(m, completion_ids, torch.full_like(completion_ids, fill))  # a pad is never an image token
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["input_ids"] = torch.cat([ids, comp], 1)
    kw["attention_mask"] = torch.cat([inputs["attention_mask"], m.to(inputs["attention_mask"].dtype)], 1)
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        kw["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(completion_ids, dtype=mm.dtype)], 1)
    out = model(**kw, logits_to_keep=t + 1, use_cache=False)
    logits = out.logits[:, :-1]
    return token_logprobs(logits, completion_ids, m, suppress_token_ids=suppress_token_ids,
                          temperature=temperature, return_entropy=return_entropy)


def response_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Bool [N,T]: True up to and including the first EOS (all True when a row never ends)."""
    is_eos = completion_ids == eos_token_id
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # number of EOS strictly before t
    return before == 0


# ------------------------------------------------------------------------------------------------------- sampling
def sample(policy: Any, inputs: Inputs, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           greedy: bool = False, return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`generate` on left-padded prompts: (completion_ids [N,T], mask [N,T] bool, raw logits [N,T,V] or None).

    Vision/special tokens in `policy.suppress_token_ids` are suppressed; top_k is disabled so the sampling
    distribution is softmax(masked logits / temperature) (top-p truncated when top_p < 1).
    """
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
                          top_p=None if greedy else top_p, top_k=None if greedy else 0,
                          eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                          suppress_tokens=list(policy.suppress_token_ids) or None,
                          return_dict_in_generate=True, output_logits=return_logits)
    with torch.no_grad():
        out = policy.model.generate(**inputs, generation_config=gc)
    comp = out.sequences[:, inputs["input_ids"].shape[1]:]
    mask = response_mask(comp, policy.eos_token_id)
    logits = torch.stack(out.logits, 1) if return_logits else None
    return comp, mask, logits


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
    """One RL step's data. N = P*G on-policy rows (grouped: row r belongs to prompt r // G), T response tokens;
    expert rows (one per prompt) are separate tensors of width Te."""

    prompt_inputs: Inputs                 # processor output, P rows
    row_prompt: torch.Tensor              # [N] prompt index of each on-policy row (= group id)
    prompt_ids: list[int]                 # dataset index of each prompt
    completion_ids: torch.Tensor          # [N,T]
    mask: torch.Tensor                    # [N,T] bool, up to and including EOS
    old_logp: torch.Tensor                # [N,T] log-probs under the sampling policy, 0 at pads
    sampler_logp: torch.Tensor            # [N,T] from generate's own logits (== old_logp unless recomputed)
    entropy: torch.Tensor                 # [N,T] per-token entropy of the sampling distribution, 0 at pads
    rewards: torch.Tensor                 # [N]
    acc: torch.Tensor                     # [N]
    fmt: torch.Tensor                     # [N]
    passed: torch.Tensor                  # [N] bool (reward > 0.1)
    adv: torch.Tensor                     # [N] group advantages over on-policy rows
    texts: list[str]                      # decoded responses
    expert_ids: torch.Tensor              # [P,Te]
    expert_mask: torch.Tensor             # [P,Te] bool
    expert_old_logp: torch.Tensor         # [P,Te] under the sampling policy, 0 at pads
    expert_entropy: torch.Tensor          # [P,Te]
    expert_logp: torch.Tensor             # [N,T] expert old log-prob aligned by token index, 0 past the expert's end
    expert_rewards: torch.Tensor          # [P]
    expert_adv: torch.Tensor              # [P] expert reward - on-policy group mean
    ref_logp: torch.Tensor | None = None  # [N,T] start policy (adapter disabled), when computed
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        """N, the number of on-policy rows."""
        return int(self.completion_ids.shape[0])


def rows_logprobs(policy: Any, inputs: Inputs, row_prompt: torch.Tensor, comp: torch.Tensor, mask: torch.Tensor, *,
                  temperature: float = 1.0, return_entropy: bool = False,
                  chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log-probs [N,T] of completions `comp` after prompt `row_prompt[r]` of `inputs` (P prompts).

    Uses the shared-prompt path (calibrl.prefix: one prompt pass per prompt) when the model supports it, else
    `sequence_logprobs` on the rows; both equal the sampler's log-probs. Gradients flow unless under no_grad;
    `chunk` bounds rows per forward (no-grad passes)."""
    from calibrl import prefix

    if chunk and comp.shape[0] > chunk:
        parts = [rows_logprobs(policy, inputs, row_prompt[s:s + chunk], comp[s:s + chunk], mask[s:s + chunk],
                               temperature=temperature, return_entropy=return_entropy)
                 for s in range(0, comp.shape[0], chunk)]
        return torch.cat([a for a, _ in parts]), (torch.cat([b for _, b in parts]) if return_entropy else None)
    if not mask.any():
        raise ValueError("mask: expected at least one real completion token, got all zeros")
    if prefix.supported(policy.model, inputs):
        logits = prefix.shared_logits(policy.model, inputs, row_prompt, comp, mask, policy.eos_token_id)
        return token_logprobs(logits, comp, mask, suppress_token_ids=policy.suppress_token_ids,
                              temperature=temperature, return_entropy=return_entropy)
    return sequence_logprobs(policy.model, select_rows(inputs, row_prompt), comp, mask,
                             suppress_token_ids=policy.suppress_token_ids, temperature=temperature,
                             return_entropy=return_entropy, fill_token_id=policy.eos_token_id)


def sample_groups(policy: Any, inputs: Inputs, group_size: int, *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, greedy: bool = False, sampler_logprobs: bool = True):
    """`group_size` responses per prompt (rows grouped by prompt): (completion_ids, mask, sampler log-probs or None,
    sampler entropy or None). Shared-prompt sampler when supported, else `generate`."""
    from calibrl import prefix

    if prefix.supported(policy.model, inputs):
        return prefix.sample_shared(policy.model, inputs, group_size, max_new_tokens=max_new_tokens,
                                    eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                                    suppress_token_ids=policy.suppress_token_ids, temperature=temperature,
                                    top_p=top_p, greedy=greedy)
    rows = torch.arange(inputs["input_ids"].shape[0]).repeat_interleave(group_size)
    comp, mask, logits = sample(policy, select_rows(inputs, rows), max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, greedy=greedy, return_logits=sampler_logprobs)
    if logits is None:
        return comp, mask, None, None
    lp, ent = token_logprobs(logits, comp, mask, suppress_token_ids=policy.suppress_token_ids,
                             temperature=temperature, return_entropy=True)
    return comp, mask, lp, ent


def _pad_to(x: torch.Tensor, t: int, value: float | int | bool) -> torch.Tensor:
    if x.shape[1] >= t:
        return x
    return torch.cat([x, torch.full((x.shape[0], t - x.shape[1]), value, dtype=x.dtype, device=x.device)], 1)


def collect_rollout(policy: Any, examples: Sequence[dict], cfg: TrainConfig, *, prompt_ids: Sequence[int],
                    ref_logp: bool = False) -> RolloutBatch:
    """Sample G responses for each example (dict with image, question, answer, solution), score them, compute group
    advantages over on-policy rows, and the expert rows' old log-probs under the same (pre-update) policy."""
    from calibrl.advantage import group_advantages, pass_mask
    from calibrl.rewards import score

    t0 = time.perf_counter()
    p, g = len(examples), cfg.group_size
    inputs = encode_prompts(policy, [e["image"] for e in examples], [e["question"] for e in examples])
    row_prompt = torch.arange(p).repeat_interleave(g)
    model = policy.model
    was_training = model.training
    if getattr(policy, "eval_mode_ok", True):  # not 4-bit on CPU (see Policy.eval_mode_ok)
        model.train(False)
    vocab = model.get_output_embeddings().weight.shape[0]
    big = vocab * p * g * cfg.max_new_tokens > 2e8  # HF sampler logits too large to keep: recompute instead
    comp, mask, s_lp, s_ent = sample_groups(policy, inputs, g, max_new_tokens=cfg.max_new_tokens,
                                            temperature=cfg.temperature, top_p=cfg.top_p, sampler_logprobs=not big)
    t1 = time.perf_counter()
    has_expert = all(e.get("solution") is not None for e in examples)
    if has_expert:
        exp_ids, exp_mask = tokenize_experts(policy, [e["solution"] for e in examples], cfg.max_expert_tokens)
        exp_ids, exp_mask = exp_ids.to(comp.device), exp_mask.to(comp.device)
    else:  # no expert column (allowed for modes that do not use it): empty expert tensors, null probes
        exp_ids = torch.zeros((p, 0), dtype=torch.long, device=comp.device)
        exp_mask = torch.zeros((p, 0), dtype=torch.bool, device=comp.device)
    lp_kw = dict(temperature=cfg.temperature, return_entropy=True, chunk=64)
    with torch.no_grad():
        if cfg.recompute_old_logp or s_lp is None:  # one pass over on-policy and expert rows together
            t = max(comp.shape[1], exp_ids.shape[1])
            all_rows = torch.cat([row_prompt, torch.arange(p)])
            all_comp = torch.cat([_pad_to(comp, t, policy.pad_token_id), _pad_to(exp_ids, t, policy.pad_token_id)])
            all_mask = torch.cat([_pad_to(mask, t, False), _pad_to(exp_mask, t, False)])
            lp, ent = rows_logprobs(policy, inputs, all_rows, all_comp, all_mask, **lp_kw)
            n = p * g
            old_logp, entropy = lp[:n, : comp.shape[1]], ent[:n, : comp.shape[1]]
            e_lp, e_ent = lp[n:, : exp_ids.shape[1]], ent[n:, : exp_ids.shape[1]]
            sampler_logp = s_lp if s_lp is not None else old_logp
        else:  # on-policy old log-probs are the sampler's own; one forward for the expert rows
            old_logp, entropy, sampler_logp = s_lp, s_ent, s_lp
            if has_expert:
                e_lp, e_ent = rows_logprobs(policy, inputs, torch.arange(p), exp_ids, exp_mask, **lp_kw)
            else:
                e_lp = e_ent = torch.zeros((p, 0), device=comp.device)
    ref = None
    if ref_logp:
        if not getattr(policy, "is_lora", False):
            raise ValueError("ref_logp: the start policy needs a LoRA policy (adapter disabled = start policy)")
        with model.disable_adapter(), torch.no_grad():
            ref, _ = rows_logprobs(policy, inputs, row_prompt, comp, mask, temperature=cfg.temperature, chunk=64)
    model.train(was_training)
    t2 = time.perf_counter()

    texts = policy.tokenizer.batch_decode(torch.where(mask, comp, policy.pad_token_id).cpu(), skip_special_tokens=True)
    scores = [score(txt, examples[int(i)]["answer"]) for txt, i in zip(texts, row_prompt)]
    rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    passed = pass_mask(rewards)
    adv = group_advantages(rewards, row_prompt, scale=cfg.loss.scale)
    exp_r = torch.tensor([score(e["solution"], e["answer"])["reward"] if has_expert else 0.0 for e in examples],
                         dtype=torch.float32)
    group_mean = torch.stack([rewards[row_prompt == i].mean() for i in range(p)])
    t_on = comp.shape[1]
    e_aligned = _pad_to(e_lp, t_on, 0.0)[:, :t_on][row_prompt]  # by token index, 0 past the expert's end
    return RolloutBatch(
        prompt_inputs=inputs, row_prompt=row_prompt, prompt_ids=list(prompt_ids), completion_ids=comp, mask=mask,
        old_logp=old_logp, sampler_logp=sampler_logp, entropy=entropy, rewards=rewards,
        acc=torch.tensor([s["acc"] for s in scores], dtype=torch.float32),
        fmt=torch.tensor([s["fmt"] for s in scores], dtype=torch.float32), passed=passed, adv=adv, texts=texts,
        expert_ids=exp_ids, expert_mask=exp_mask, expert_old_logp=e_lp, expert_entropy=e_ent, expert_logp=e_aligned,
        expert_rewards=exp_r, expert_adv=exp_r - group_mean, ref_logp=ref,
        timings={"generate_s": t1 - t0, "logprob_s": t2 - t1, "score_s": time.perf_counter() - t2})
