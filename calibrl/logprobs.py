"""The sampler's distribution and the teacher-forced log-probs: one definition that every sampler path uses.

The sampling distribution of calibrl is softmax((logits with the suppressed ids at -inf) / temperature), computed in
float32; top-p (when < 1) only truncates what is drawn, the log-probs and entropy are of the untruncated tempered
distribution. `sampler_log_softmax` is that definition; the shared-prefix sampler (calibrl.prefix), the plain
`generate` sampler (calibrl.plain, through a logits processor) and every teacher-forced forward call it, so the
trainer's log-probs are the sampler's.

`head_token_logprobs` is the seam for the training forward: hidden states of the response positions -> LM head ->
log-softmax -> chosen-token log-probs (and entropy). It is one call, so a chunked implementation that never builds
[B,T,V] tensors (calibrl.lmhead, when present) can replace the full-vocabulary one here.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch


class SharedHidden(NamedTuple):
    """Response-position hidden states of the shared-prefix pass, unexpanded: the prompts' last hidden states
    first [P,1,H] (predicting completion token 0), `rows` [N] (prompt of each row) and the completion positions
    rest [N,T-1,H]. `dense()` is the plain [N,T,H] tensor. Kept apart so the LM head runs on the P prompts once
    (the same arithmetic as the sampler's prompt pass)."""

    first: torch.Tensor
    rows: torch.Tensor
    rest: torch.Tensor | None

    def dense(self) -> torch.Tensor:
        f = self.first[self.rows]
        return f if self.rest is None else torch.cat([f, self.rest], 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        t = 1 + (0 if self.rest is None else self.rest.shape[1])
        return (int(self.rows.shape[0]), t, int(self.first.shape[-1]))

    def dim(self) -> int:
        return 3


def sampler_log_softmax(logits: torch.Tensor, suppress_token_ids: Sequence[int],
                        temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [..., V] of the distribution the sampler draws from: float32 logits, suppressed ids at -inf, divided
    by temperature (a mismatch between sampler and trainer silently turns RL off-policy)."""
    z = logits.float()
    if len(suppress_token_ids):
        idx = torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=z.device)
        z = z.index_fill(-1, idx, float("-inf"))
    return torch.log_softmax(z / temperature, dim=-1)


def entropy_from_logp(logp_all: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis from log-probs; -inf entries (suppressed ids) contribute 0 instead of NaN."""
    return -(logp_all.exp() * torch.where(torch.isfinite(logp_all), logp_all, torch.zeros_like(logp_all))).sum(-1)


def filter_top_p(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Log-probs with everything outside the nucleus (the smallest set of top tokens whose mass reaches top_p) at
    -inf; unchanged when top_p >= 1. Only what is drawn is truncated, never the recorded log-probs."""
    if top_p >= 1.0:
        return logp
    sorted_lp, order = logp.sort(-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    drop = (cum - sorted_lp.exp()) > top_p
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_lp)


def _check(targets: torch.Tensor, mask: torch.Tensor, lead: tuple, temperature: float, name: str) -> None:
    if targets.dim() != 2 or tuple(lead) != tuple(targets.shape) or mask.shape != targets.shape:
        raise ValueError(f"{name}/targets/mask: expected [N,T,*], [N,T], [N,T], got {tuple(lead)}+, "
                         f"{tuple(targets.shape)}, {tuple(mask.shape)}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")


def _gather(logp_all: torch.Tensor, targets: torch.Tensor, m: torch.Tensor,
            return_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(m, logp, torch.zeros_like(logp))  # pads after EOS may be suppressed ids: -inf
    ent = None
    if return_entropy:
        ent = entropy_from_logp(logp_all)
        ent = torch.where(m, ent, torch.zeros_like(ent))
    return logp, ent


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                   suppress_token_ids: Sequence[int], temperature: float = 1.0,
                   return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N,T] of `targets` under logits [N,T,V] masked like the sampler; 0 where mask is 0.
    Entropy (optional) is of the same distribution, 0 at masked positions."""
    if logits.dim() != 3:
        raise ValueError(f"logits: expected [N,T,V], got {tuple(logits.shape)}")
    _check(targets, mask, logits.shape[:2], temperature, "logits")
    return _gather(sampler_log_softmax(logits, suppress_token_ids, temperature), targets, mask.bool(), return_entropy)


def _project(hidden: torch.Tensor, head: Any) -> torch.Tensor:
    return head(hidden) if callable(head) else torch.nn.functional.linear(hidden, head)


CHUNKED_MIN_LOGITS = 2**24
"""Above this many logits (N x T x V) `head_token_logprobs` takes the chunked LM head (calibrl.lmhead), which never
builds [N,T,V] tensors; below it (the embedded tiny model) the full-vocabulary path, bit-identical to before."""


def head_token_logprobs(hidden: torch.Tensor | SharedHidden, head: Any, targets: torch.Tensor, mask: torch.Tensor, *,
                        suppress_token_ids: Sequence[int], temperature: float = 1.0,
                        return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N,T] (and entropy) of `targets` from the last hidden states [N,T,H] of the positions that predict
    them, through the LM head `head` (a module or a [V,H] weight), masked like the sampler; 0 where mask is 0.
    `hidden` may be a SharedHidden (the shared-prefix pass): its prompt rows are projected once per prompt.

    Large problems (more than CHUNKED_MIN_LOGITS logits) with a plain linear head go through
    `calibrl.lmhead.head_token_logprobs` (chunks of positions, custom backward: no [N,T,V] tensor in the forward or
    the backward; equal to the full path to float rounding, tests/test_lmhead.py); otherwise the full-vocabulary
    reference builds the [N,T,V] logits once."""
    from calibrl import lmhead

    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected [N,T,H], got {tuple(hidden.shape)}")
    _check(targets, mask, hidden.shape[:2], temperature, "hidden")
    plain = lmhead.plain_head(head)
    n, t, _ = hidden.shape
    if plain is not None and n * t * plain[0].shape[0] > CHUNKED_MIN_LOGITS:
        dense = hidden.dense() if isinstance(hidden, SharedHidden) else hidden
        if plain[0].dtype == dense.dtype:
            return lmhead.head_token_logprobs(dense, plain[0], targets, mask, bias=plain[1],
                                              suppress_token_ids=suppress_token_ids, temperature=temperature,
                                              return_entropy=return_entropy)
    if isinstance(hidden, SharedHidden):
        first = _project(hidden.first, head)[hidden.rows]
        logits = first if hidden.rest is None else torch.cat([first, _project(hidden.rest, head)], 1)
    else:
        logits = _project(hidden, head)
    return _gather(sampler_log_softmax(logits, suppress_token_ids, temperature), targets, mask.bool(), return_entropy)


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder returning last hidden states, LM head module) of a ForConditionalGeneration-style model (PEFT
    wrappers unwrapped; LoRA layers stay active). ValueError when the model has no such split or post-processes its
    logits (soft-capping), since the log-probs would then differ from the sampler's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner, head = getattr(base, "model", None), base.get_output_embeddings()
    text_cfg = getattr(base.config, "text_config", base.config)
    if inner is None or head is None or getattr(text_cfg, "final_logit_softcapping", None):
        raise ValueError(f"model: expected a decoder + LM head without logit soft-capping, got {type(base).__name__}")
    return inner, head
