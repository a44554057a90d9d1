"""Shared-prompt fast path for Qwen2/2.5-VL: run the image and the prompt once per prompt, not once per sample.

The G samples of a prompt share the same image and prompt tokens. Both the sampler and the teacher-forced training
forward here run the prompt (with the vision tower) on the P unique prompts, keep its KV cache (with autograd when
called with gradients, so LoRA gradients still flow through the prompt), index the cache out to the N = P*G rows,
and run only the completion tokens per row with explicit 3D rope positions (text after the image: all three
components equal, continuing from the prompt's largest position). The result equals the plain forward
(`calibrl.rollout.sequence_logprobs`) to float rounding; tests/test_rollout.py checks it against the sampler and
against the plain path, and the trainer logs the gap every step. Models without `get_rope_index` (other families)
use the plain path (`supported()` is False).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from calibrl.logprobs import SharedHidden, decoder_and_head, entropy_from_logp, filter_top_p, sampler_log_softmax
from calibrl.prompts import select_rows

Inputs = dict[str, torch.Tensor]


def _vl_model(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "model", None)


def checkpointing(model: Any) -> bool:
    """True when gradient (activation) checkpointing is on: it drops the KV cache the shared-prefix path needs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ckpt = getattr(base, "is_activation_checkpointing", None)
    return bool(ckpt if ckpt is not None else getattr(base, "is_gradient_checkpointing", False))


def unsupported_reason(model: Any, inputs: Inputs) -> str | None:
    """Why the shared-prefix path cannot run on this model and these inputs, or None when it can (Qwen2/2.5-VL-style
    models with the processor's mm_token_type_ids and image_grid_thw, no gradient checkpointing)."""
    if checkpointing(model):
        return "gradient checkpointing is on (it drops the KV cache the shared prefix needs)"
    vl = _vl_model(model)
    if vl is None or not hasattr(vl, "get_rope_index"):
        return f"{type(model).__name__} has no get_rope_index (not a Qwen2/2.5-VL model)"
    missing = [k for k in ("mm_token_type_ids", "image_grid_thw") if k not in inputs]
    return f"the prompt inputs lack {missing}" if missing else None


def supported(model: Any, inputs: Inputs) -> bool:
    """True when `unsupported_reason` is None."""
    return unsupported_reason(model, inputs) is None


def next_positions(model: Any, inputs: Inputs) -> torch.Tensor:
    """[P] rope position of the first completion token of each prompt (largest prompt position + 1)."""
    vl = _vl_model(model)
    pos, _ = vl.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                               image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
    valid = inputs["attention_mask"].bool()[None].expand_as(pos)
    return torch.where(valid, pos, torch.zeros_like(pos)).amax(dim=(0, 2)) + 1


def prompt_pass(model: Any, inputs: Inputs) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Forward of the P prompts: (last-position logits [P,V], KV cache, next positions [P])."""
    pos = next_positions(model, inputs)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values, pos


def _positions(start: torch.Tensor, t: int) -> torch.Tensor:
    p = start[:, None] + torch.arange(t, device=start.device)[None, :]
    return p[None].expand(3, -1, -1)


def _cache(out: Any) -> Any:
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def shared_hidden(model: Any, inputs: Inputs, row_prompt: torch.Tensor, completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor, fill_token_id: int) -> SharedHidden:
    """Last hidden states (a SharedHidden, [N,T,H] when dense) of the positions predicting each completion token of
    row r (prompt `row_prompt[r]` of `inputs`): the prompt runs once per unique prompt, its KV cache is indexed out
    to the rows."""
    inner, _ = decoder_and_head(model)
    m = completion_mask.bool()
    comp = torch.where(m, completion_ids, torch.full_like(completion_ids, fill_token_id))
    uniq, idx = torch.unique(row_prompt.cpu(), return_inverse=True)
    idx = idx.to(comp.device)
    sub = _select_prompts(inputs, uniq)
    pos = next_positions(model, sub)
    out = inner(**sub, use_cache=True)
    first = out.last_hidden_state[:, -1:]  # [P,1,H], predicts completion token 0
    t = comp.shape[1]
    if t == 1:
        return SharedHidden(first, idx, None)
    cache = _cache(out)
    cache.reorder_cache(idx)
    attn = torch.cat([sub["attention_mask"][idx], m[:, :-1].to(sub["attention_mask"].dtype)], 1)
    rest = inner(input_ids=comp[:, :-1], attention_mask=attn, past_key_values=cache,
                 position_ids=_positions(pos[idx], t - 1), use_cache=True)
    return SharedHidden(first, idx, rest.last_hidden_state)


def _select_prompts(inputs: Inputs, uniq: torch.Tensor) -> Inputs:
    n = inputs["input_ids"].shape[0]
    if uniq.numel() == n and torch.equal(uniq, torch.arange(n)):
        return inputs
    return select_rows(inputs, uniq)


@torch.inference_mode()
def _sample_shared(model: Any, inputs: Inputs, group_size: int, *, max_new_tokens: int,
                   eos_token_ids: Sequence[int], pad_token_id: int, suppress_token_ids: Sequence[int],
                   temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                   entropy_t1: bool = False) -> tuple[torch.Tensor, ...]:
    last, cache, pos = prompt_pass(model, inputs)
    n = last.shape[0] * group_size
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
    logits = last.repeat_interleave(group_size, 0)
    pos = pos.repeat_interleave(group_size, 0)
    attn = inputs["attention_mask"].repeat_interleave(group_size, 0)
    dev = last.device
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=dev)
    toks, lps, ents, ents1, alive = [], [], [], [], []
    for k in range(max_new_tokens):
        lp_all = sampler_log_softmax(logits, suppress_token_ids, 1.0 if greedy else temperature)
        if greedy:
            tok = lp_all.argmax(-1)
        else:
            tok = torch.multinomial(filter_top_p(lp_all, top_p).exp(), 1).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        lp = lp_all.gather(-1, tok[:, None]).squeeze(1)
        ent = entropy_from_logp(lp_all)
        toks.append(tok)
        lps.append(torch.where(done, torch.zeros_like(lp), lp))
        ents.append(torch.where(done, torch.zeros_like(ent), ent))
        if entropy_t1:  # the untempered (T = 1) distribution's entropy, logged next to the sampling one
            e1 = entropy_from_logp(sampler_log_softmax(logits, suppress_token_ids, 1.0))
            ents1.append(torch.where(done, torch.zeros_like(e1), e1))
        alive.append(~done)
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or k == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=dev)], 1)
        out = model(input_ids=tok[:, None], attention_mask=attn, past_key_values=cache,
                    position_ids=_positions(pos + k, 1), use_cache=True)
        logits = out.logits[:, -1]
    e1 = torch.stack(ents1, 1) if entropy_t1 else None
    return torch.stack(toks, 1), torch.stack(alive, 1), torch.stack(lps, 1), torch.stack(ents, 1), e1


def sample_shared(model: Any, inputs: Inputs, group_size: int, **kw: Any) -> tuple[torch.Tensor | None, ...]:
    """Sample `group_size` responses per prompt with one prompt pass per prompt. Returns (completion_ids [N,T],
    mask [N,T] up to and including the first EOS (any of `eos_token_ids`), sampler log-probs [N,T], entropy [N,T],
    T = 1 entropy [N,T] or None) with N = P*group_size, rows grouped by prompt; log-probs/entropy are of
    softmax(masked logits / temperature), 0 at pads. Keywords: max_new_tokens, eos_token_ids, pad_token_id,
    suppress_token_ids, temperature=1.0, top_p=1.0, greedy=False, entropy_t1=False."""
    out = _sample_shared(model, inputs, group_size, **kw)
    return tuple(None if x is None else x.clone() for x in out)  # normal (non-inference) tensors
