"""Per-token entropy probes: from logits (chunked) and straight from hidden states + the LM head (never a full
[B,T,V] logits tensor: `entropy_from_hidden` validates and runs the training forward's chunked LM head,
calibrl.lmhead). Both compute the softmax in float32, treat -inf logits (suppressed ids) as probability 0, and raise
a ValueError on NaN/+inf instead of reading a diverged model as entropy 0.
Re-exported by calibrl.probes."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from calibrl import _validate as V
from calibrl import lmhead


# ------------------------------------------------------------------------------------------------ entropy
def _entropy_rows(logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """H = -sum_v p log p over the last dim, for an [n, V] chunk, in float32 (float64 for float64 logits).
    -inf logits (suppressed ids) contribute exactly 0; NaN or +inf logits give a non-finite H (never hidden).
    inplace=True reuses `logits` (a fresh chunk of the compute dtype) to keep two [n, V] buffers at most."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if not inplace and z.data_ptr() == logits.data_ptr():
        z = z.clone()                                                    # never modify the caller's logits
    suppressed = z == float("-inf")                                      # [n,V] p = 0 exactly: p log p := 0
    z.sub_(torch.logsumexp(z, -1, keepdim=True))                          # [n,V] log p
    p = torch.exp(z)                                                     # [n,V] p
    p.mul_(z).masked_fill_(suppressed, 0.0)                              # [n,V] p log p
    h = -p.sum(-1)                                                       # [n]
    return h.masked_fill_(suppressed.all(-1), float("nan"))              # no valid id: undefined, never 0


def _non_finite(what: str) -> ValueError:
    return ValueError(f"{what}: expected finite values (-inf allowed for suppressed ids, not a whole row), "
                      f"found NaN or +inf, or a row of -inf; the entropy would be NaN")


@torch.no_grad()
def token_entropy(logits: torch.Tensor, *, chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim, computed `chunk_size` positions at a time in
    float32 (float64 for float64 logits). logits [..., V] (any float dtype; -inf entries, e.g. suppressed ids, are
    fine). NaN or +inf logits raise a ValueError (a diverged model never reads as entropy 0). Returns float32 [...]."""
    V.tensor(logits, "logits")
    V.floating(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a [..., V] tensor with V > 0, got shape {tuple(logits.shape)}")
    V.int_arg(chunk_size, "chunk_size")
    V.number(temperature, "temperature", lo=0.0, lo_open=True)
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for i in range(0, flat.shape[0], chunk_size):
        chunk = flat[i:i + chunk_size]
        z = chunk.to(ct)                                                  # upcast before the temperature
        if temperature != 1.0:
            z = z / temperature
        out[i:i + chunk_size] = _entropy_rows(z, inplace=z.data_ptr() != chunk.data_ptr())   # never the caller's
    if not bool(torch.isfinite(out).all()):
        raise _non_finite("logits")
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def entropy_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None, chunk_size: int = 256, temperature: float = 1.0,
                        suppress_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Token entropy straight from final hidden states and the LM-head weight, `chunk_size` positions at a time,
    so a large-vocabulary model (e.g. V = 151,936) never holds a full [B,T,V] logits tensor: it runs
    calibrl.lmhead's chunked head, whose extra memory is one chunk_size x V float32 chunk plus a few
    [SOFTMAX_ROWS, V] temporaries.

    hidden [B,T,H] or [N,H]; lm_head_weight [V,H] (same device; its dtype may differ from hidden's); bias [V]
    (any float dtype; added in float32) or None; mask like hidden[..., 0] (only those positions are computed,
    others get 0);
    suppress_ids: vocabulary ids masked to -inf before the softmax (the vision special tokens). The logits are
    computed in the wider of the two dtypes (an fp32 head is never cast down; bf16 x bf16 stays bf16, as the
    model's own head; fp16 is computed in float32, where its logits cannot overflow), the softmax in float32.
    Non-finite hidden states (at computed positions), weights, bias or logits raise a ValueError.
    Returns float32 entropy of shape hidden.shape[:-1].
    """
    V.tensor(hidden, "hidden", ndim=(2, 3))
    V.floating(hidden, "hidden")
    V.tensor(lm_head_weight, "lm_head_weight", ndim=2)
    V.floating(lm_head_weight, "lm_head_weight")
    V.same_device("lm_head_weight", lm_head_weight, hidden, "hidden")
    if lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight: expected shape (V, {hidden.shape[-1]}) matching hidden's last dim, "
                         f"got {tuple(lm_head_weight.shape)}")
    if bias is not None:
        V.tensor(bias, "bias", shape=(lm_head_weight.shape[0],), like="lm_head_weight rows")
        V.floating(bias, "bias")
        V.same_device("bias", bias, hidden, "hidden")
    lead = hidden.shape[:-1]
    if mask is not None:
        V.mask_like(mask, "mask", hidden, "hidden[..., 0]", shape=lead)
    V.int_arg(chunk_size, "chunk_size")
    V.number(temperature, "temperature", lo=0.0, lo_open=True)
    n_vocab = lm_head_weight.shape[0]
    if suppress_ids is not None and not isinstance(suppress_ids, torch.Tensor):
        suppress_ids = list(suppress_ids)
    sup = None
    if suppress_ids is not None and len(suppress_ids):
        sup = torch.as_tensor(suppress_ids, device=hidden.device)
        if sup.is_floating_point() or sup.dtype == torch.bool or sup.dim() != 1 or \
                bool(((sup < 0) | (sup >= n_vocab)).any()):
            raise ValueError(f"suppress_ids: expected integer vocabulary ids in [0, {n_vocab}), got {suppress_ids!r}")
        sup = sup.long()
    if sup is not None and int(sup.unique().numel()) >= n_vocab:
        raise ValueError(f"suppress_ids: expected fewer than V = {n_vocab} distinct ids, got all of them")
    m = None if mask is None else V.mask_values(mask, "mask", allow_empty=True)
    h = hidden.detach().reshape(1, -1, hidden.shape[-1])                   # [1,N,H]
    m = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if m is None else m.reshape(1, -1)
    V.finite(h[m], "hidden")                                              # +-inf would pass as -inf logits
    V.finite(lm_head_weight, "lm_head_weight")
    if bias is not None:
        V.finite(bias, "bias")
    mt = torch.promote_types(h.dtype, lm_head_weight.dtype)              # matmul dtype: never below either input
    mt = torch.float32 if mt == torch.float16 else mt                     # fp16 logits overflow at 65504
    # the chunked LM head of the training forward: logits (h W^T in mt) + bias in float32 (or float64), then the
    # sampler's float32 log-softmax; its entropy (no log-probs needed: the targets are a placeholder)
    b = None if bias is None else bias.detach().to(torch.float64 if mt == torch.float64 else torch.float32)
    placeholder = torch.zeros(m.shape, dtype=torch.long, device=h.device)
    _, out = lmhead.head_token_logprobs(h.to(mt), lm_head_weight.detach().to(mt), placeholder, m, bias=b,
                                        suppress_token_ids=[] if sup is None else sup.tolist(),
                                        temperature=temperature, return_entropy=True, chunk_tokens=chunk_size)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"hidden: the logits hidden @ lm_head_weight.T overflow in {mt}; expected finite logits")
    return out.reshape(lead)
