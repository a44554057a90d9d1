"""The plain path for any VLM: `generate` that samples exactly calibrl's distribution, and the one-forward-per-row
teacher-forced pass.

Sampling: `generate` would complete our settings from the checkpoint's own generation_config (repetition_penalty,
no_repeat_ngram_size, top_k, min_p, typical_p, ...), so the distribution drawn from would not be the one the trainer
scores. Here `generate` runs with a clean GenerationConfig built from an explicit whitelist (the checkpoint's is
swapped out for the call and restored; the settings it had that are ignored are reported by
`ignored_generation_settings`), and the whole sampling distribution is one logits processor that calls
calibrl.logprobs.sampler_log_softmax (suppressed ids, temperature) and top-p. The same processor records the chosen
token's log-prob and the entropy at every step (only [N] values per step, never [N,T,V] logits), so the drift check
(`logp_gap_max`) always compares the sampler against the trainer.

Teacher forcing: attention_mask and mm_token_type_ids (zeros) are extended over the completion, like `generate`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Sequence

import torch
from transformers import LogitsProcessor

from calibrl.logprobs import decoder_and_head, entropy_from_logp, filter_top_p, sampler_log_softmax

Inputs = dict[str, torch.Tensor]

SAMPLING_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
                     "eta_cutoff", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                     "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens",
                     "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "min_length",
                     "min_new_tokens", "length_penalty", "exponential_decay_length_penalty", "renormalize_logits",
                     "num_beams", "diversity_penalty", "guidance_scale", "watermarking_config", "top_h")
"""Checkpoint generation settings that would change what is drawn; none of them is inherited."""
_WARNED: set[int] = set()


def ignored_generation_settings(model: Any) -> dict[str, Any]:
    """The checkpoint generation_config's sampling settings that differ from transformers' defaults: what plain
    `generate` would have inherited and calibrl ignores (suppress_tokens is applied by calibrl itself)."""
    from transformers import GenerationConfig

    gc, ref = getattr(model, "generation_config", None), GenerationConfig()
    if gc is None:
        return {}
    out = {}
    for k in SAMPLING_SETTINGS:
        v, d = getattr(gc, k, None), getattr(ref, k, None)
        if v is not None and v != d and k != "suppress_tokens":
            out[k] = v
    return out


@contextlib.contextmanager
def clean_generation_config(model: Any) -> Iterator[None]:
    """Swap the checkpoint's generation_config for transformers' defaults during a call, then restore it."""
    from transformers import GenerationConfig

    targets = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    saved = [(m, m.generation_config) for m in targets if getattr(m, "generation_config", None) is not None]
    try:
        for m, _ in saved:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, gc in saved:
            m.generation_config = gc


class SamplerProcessor(LogitsProcessor):
    """A transformers logits processor that IS the sampling distribution (sampler_log_softmax, then top-p) and records,
    per step, the chosen token's log-prob and the entropy (and the T = 1 entropy when asked)."""

    def __init__(self, suppress_token_ids: Sequence[int], temperature: float, top_p: float, greedy: bool,
                 entropy_t1: bool = False):
        self.suppress, self.temperature, self.top_p, self.greedy = list(suppress_token_ids), temperature, top_p, greedy
        self.entropy_t1 = entropy_t1
        self.prev: torch.Tensor | None = None
        self.logps: list[torch.Tensor] = []
        self.ents: list[torch.Tensor] = []
        self.ents1: list[torch.Tensor] = []

    def _record(self, chosen: torch.Tensor) -> None:
        self.logps.append(self.prev.gather(-1, chosen[:, None].to(self.prev.device)).squeeze(1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:  # the token drawn at the previous step is the last input id now
            self._record(input_ids[:, -1])
        lp = sampler_log_softmax(scores, self.suppress, 1.0 if self.greedy else self.temperature)
        self.prev = lp
        self.ents.append(entropy_from_logp(lp))
        if self.entropy_t1:
            self.ents1.append(entropy_from_logp(sampler_log_softmax(scores, self.suppress, 1.0)))
        return lp if self.greedy else filter_top_p(lp, self.top_p)

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(chosen-token log-probs [N,T], entropy [N,T], T = 1 entropy or None) after `generate` returned."""
        self._record(last_tokens)
        e1 = torch.stack(self.ents1, 1) if self.entropy_t1 else None
        return torch.stack(self.logps, 1), torch.stack(self.ents, 1), e1


def sample_generate(model: Any, inputs: Inputs, *, max_new_tokens: int, eos_token_ids: Sequence[int],
                    pad_token_id: int, suppress_token_ids: Sequence[int], temperature: float = 1.0,
                    top_p: float = 1.0, greedy: bool = False,
                    entropy_t1: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`generate` on the rows of `inputs`: (completion_ids [N,T], sampler log-probs [N,T], entropy [N,T], T = 1
    entropy or None), raw (the caller masks after the first EOS). Never inherits the checkpoint's settings (a warning
    names the ignored ones once per model)."""
    from transformers import GenerationConfig, LogitsProcessorList

    ignored = ignored_generation_settings(model)
    if ignored and id(model) not in _WARNED:
        _WARNED.add(id(model))
        warnings.warn(f"calibrl samples its own distribution; ignoring the checkpoint's generation settings {ignored}",
                      stacklevel=3)
    proc = SamplerProcessor(suppress_token_ids, temperature, top_p, greedy, entropy_t1)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0,
                          eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, num_beams=1,
                          return_dict_in_generate=True)
    with torch.no_grad(), clean_generation_config(model):
        out = model.generate(**inputs, generation_config=gc, logits_processor=LogitsProcessorList([proc]))
    comp = out.sequences[:, inputs["input_ids"].shape[1]:]
    lp, ent, e1 = proc.finish(comp[:, -1])
    return comp, lp, ent, e1


def sequence_hidden(model: Any, inputs: Inputs, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    fill_token_id: int) -> torch.Tensor:
    """Last hidden states [N,T,H] of the positions predicting each completion token after the left-padded prompts
    `inputs` (N rows): one forward over prompt + completion per row, positions computed by the model itself."""
    inner, _ = decoder_and_head(model)
    ids = inputs["input_ids"]
    t = completion_ids.shape[1]
    m = completion_mask.bool()
    comp = torch.where(m, completion_ids, torch.full_like(completion_ids, fill_token_id))  # never an image token
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["input_ids"] = torch.cat([ids, comp], 1)
    kw["attention_mask"] = torch.cat([inputs["attention_mask"], m.to(inputs["attention_mask"].dtype)], 1)
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        kw["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(completion_ids, dtype=mm.dtype)], 1)
    out = inner(**kw, use_cache=False)
    return out.last_hidden_state[:, -(t + 1):-1]
