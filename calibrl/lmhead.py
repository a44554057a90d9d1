"""Token log-probs and entropy straight from the last hidden states through the LM head, a chunk of positions at a
time, so neither the forward nor the backward ever holds a [B,T,V] tensor (V = 151,936 for Qwen2.5-VL).

`head_token_logprobs(hidden, weight, targets, mask)` equals
`calibrl.rollout.token_logprobs(hidden @ weight.T + bias, targets, mask, ...)` (the sampler's distribution: float32
logits, suppressed ids at -inf, divided by temperature, log_softmax) in value and in gradient. It runs a custom
autograd function over the real (mask = 1) positions only: the forward keeps only its inputs and the [M] entropy,
and the backward recomputes each chunk's logits and log-softmax (one extra LM-head matmul per chunk), writing the
gradient of the logits over the chunk's own logits buffer. The log-softmax and what is built from it run on blocks of
SOFTMAX_ROWS rows of the chunk, so the extra memory is one chunk_tokens x V float32 tensor plus at most three
SOFTMAX_ROWS x V scratch buffers (allocated once per call) whatever B x T is (about 0.21 GB at 256 positions, 32
rows and V = 151,936; the matmul of a bf16 head adds a transient bf16 copy of the chunk). The values are those of a whole-chunk log-softmax: it is
computed row by row either way.

Precision: the logits matmul runs in the dtype of `hidden`/`weight` (as the model's own lm_head does, so bf16
models reproduce the sampler's logits), everything after it in float32. Gradients: w.r.t. hidden always when it
requires grad; w.r.t. weight/bias only when they require grad (a frozen head costs nothing extra; when they do, the
[V,H] accumulator is float32).
"""
from __future__ import annotations

from typing import Sequence

import torch

from calibrl import _validate as V

DEFAULT_CHUNK_TOKENS = 256
"""Positions per LM-head chunk (one logits matmul): a [256, 151936] float32 tensor is 156 MB."""
SOFTMAX_ROWS = 32
"""Rows per log-softmax block inside a chunk: its temporaries are [32, V] (19 MB each at V = 151,936)."""


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sup: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """Sampler logits [n,V] in float32 of n hidden rows: (h W^T + b).float(), suppressed ids -inf, / temperature.
    A fresh tensor (the caller may overwrite it)."""
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    z = z.float()
    if sup is not None:
        z.index_fill_(-1, sup, float("-inf"))
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _row_blocks(z: torch.Tensor, start: int, buf: torch.Tensor):
    """(global row index, log_softmax of SOFTMAX_ROWS rows of the chunk z [n,V]) block by block, written into `buf`
    [SOFTMAX_ROWS,V] (allocated once per call: fresh [32,V] temporaries per block fragment the CPU heap, which then
    keeps ~19 MB per block resident). The caller may overwrite the block's rows of z once it has its log-softmax."""
    for b in range(0, z.shape[0], SOFTMAX_ROWS):
        zb = z[b:b + SOFTMAX_ROWS]
        yield start + b, torch.log_softmax(zb, -1, out=buf[:zb.shape[0]])


def _block_buffers(h: torch.Tensor, vocab: int, k: int) -> list[torch.Tensor]:
    """k float32 [min(SOFTMAX_ROWS, M), V] scratch buffers for the per-block log-softmax and what is built from it."""
    return [torch.empty(min(SOFTMAX_ROWS, h.shape[0]), vocab, dtype=torch.float32, device=h.device) for _ in range(k)]


class _HeadLogprobs(torch.autograd.Function):
    """(hidden rows [M,H], weight [V,H], bias [V]|None, targets [M]) -> (logp [M], entropy [M]) in float32."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, sup, temperature, chunk, want_entropy):
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        ent = torch.zeros_like(logp)
        bufs = _block_buffers(h, weight.shape[0], 2 if want_entropy else 1)
        for s in range(0, h.shape[0], chunk):
            z = _chunk_logits(h[s:s + chunk], weight, bias, sup, temperature)             # [n,V], the one chunk
            for r, lp_all in _row_blocks(z, s, bufs[0]):                                  # [<=32,V] log-softmax
                e = r + lp_all.shape[0]
                logp[r:e] = lp_all.gather(-1, targets[r:e, None]).squeeze(-1)
                if want_entropy:  # -sum p log p; suppressed ids (p = 0, log p = -inf) contribute 0
                    p = torch.exp(lp_all, out=bufs[1][:e - r])
                    ent[r:e] = -p.mul_(lp_all.nan_to_num_(neginf=0.0)).sum(-1)
            del z
        ctx.save_for_backward(h, weight, bias, targets, sup, ent)
        ctx.cfg = (temperature, chunk, want_entropy)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, targets, sup, ent = ctx.saved_tensors
        temperature, chunk, want_entropy = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_h = torch.empty_like(h) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        use_ent = want_entropy and g_ent is not None
        bufs = _block_buffers(h, weight.shape[0], 2)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            gz = _chunk_logits(hc, weight, bias, sup, temperature)  # [n,V] logits recomputed; overwritten by dL/dz
            for r, logp_all in _row_blocks(gz, s, bufs[0]):
                e = r + logp_all.shape[0]
                p = torch.exp(logp_all, out=bufs[1][:e - r])
                # d logp_y / dz_j = 1[j = y] - p_j ;  d H / dz_j = -p_j (log p_j + H)
                torch.mul(p, -g_logp[r:e, None], out=gz[r - s:e - s])
                if use_ent:
                    lp_f = logp_all.nan_to_num_(neginf=0.0).add_(ent[r:e, None]).mul_(p)
                    gz[r - s:e - s].sub_(lp_f.mul_(g_ent[r:e, None]))
                del p, logp_all
            gz.scatter_add_(-1, targets[s:s + chunk, None], g_logp[s:s + chunk, None].float())
            if sup is not None:  # index_fill(-inf) passes no gradient to the suppressed logits
                gz.index_fill_(-1, sup, 0.0)
            if temperature != 1.0:
                gz.div_(temperature)
            if need_h:
                g_h[s:s + chunk] = (gz.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                g_w.addmm_(gz.T, hc.float())
            if need_b:
                g_b += gz.sum(0)
            del gz
        return (g_h, None if g_w is None else g_w.to(weight.dtype), None if g_b is None else g_b.to(bias.dtype),
                None, None, None, None, None)


def head_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                        bias: torch.Tensor | None = None, suppress_token_ids: Sequence[int] = (),
                        temperature: float = 1.0, return_entropy: bool = False,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N,T] of `targets` (and the entropy [N,T] if asked) under the sampler's distribution of the logits
    `hidden @ weight.T + bias`, without materialising [N,T,V]. 0 where `mask` is 0 (never NaN or -inf).

    hidden [N,T,H] (the final-norm hidden state at the position that predicts each target); weight [V,H] (the
    lm_head weight, possibly frozen or tied to the embeddings); targets [N,T] ids (ignored where mask is 0);
    mask [N,T] bool or 0/1; bias [V] or None; suppress_token_ids: ids set to -inf before the softmax;
    temperature > 0; chunk_tokens: positions per chunk. Differentiable w.r.t. hidden, weight and bias (the entropy
    too, e.g. for an entropy bonus). A real position whose target is a suppressed id gets -inf, as in the sampler.
    """
    V.floating(V.tensor(hidden, "hidden", ndim=3), "hidden")
    V.floating(V.tensor(weight, "weight", ndim=2), "weight")
    n, t, hsize = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hsize:
        raise ValueError(f"weight: expected shape (V, {hsize}) matching hidden's last dim, got {tuple(weight.shape)}")
    V.same_device("weight", weight, hidden, "hidden")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} like hidden, got {weight.dtype}")
    if bias is not None:
        V.floating(V.tensor(bias, "bias", shape=(vocab,), like="weight rows"), "bias")
        V.same_device("bias", bias, hidden, "hidden")
    V.tensor(targets, "targets", shape=(n, t), like="hidden[..., 0]")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets: expected an int64/int32 tensor of token ids, got {targets.dtype}")
    V.tensor(mask, "mask", shape=(n, t), like="hidden[..., 0]")
    m = V.mask_values(mask.to(hidden.device), "mask", allow_empty=True)
    temperature = V.number(temperature, "temperature", lo=0.0, lo_open=True)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected an int >= 1, got {chunk_tokens!r}")
    sup_ids = sorted({int(i) for i in suppress_token_ids})
    if sup_ids and (sup_ids[0] < 0 or sup_ids[-1] >= vocab):
        raise ValueError(f"suppress_token_ids: expected ids in [0, {vocab}), got {sup_ids[0]}..{sup_ids[-1]}")
    if len(sup_ids) >= vocab:
        raise ValueError(f"suppress_token_ids: expected fewer than V = {vocab} ids, got {len(sup_ids)}")
    idx = m.reshape(-1).nonzero().squeeze(-1)                                   # [M] real positions
    tg = targets.reshape(-1).to(hidden.device)[idx].long()
    if tg.numel() and (int(tg.min()) < 0 or int(tg.max()) >= vocab):
        raise ValueError(f"targets: expected ids in [0, {vocab}) at masked-in positions, got "
                         f"{int(tg.min())}..{int(tg.max())}")
    logp = hidden.new_zeros(n * t, dtype=torch.float32)
    ent = hidden.new_zeros(n * t, dtype=torch.float32) if return_entropy else None
    if idx.numel():
        sup = torch.tensor(sup_ids, dtype=torch.long, device=hidden.device) if sup_ids else None
        rows = hidden.reshape(n * t, hsize)[idx]                                 # [M,H]
        lp_m, ent_m = _HeadLogprobs.apply(rows, weight, bias, tg, sup, temperature, chunk_tokens, return_entropy)
        logp = logp.index_put((idx,), lp_m)
        if return_entropy:
            ent = ent.index_put((idx,), ent_m)
    return logp.view(n, t), (ent.view(n, t) if return_entropy else None)


def plain_head(head) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [V,H], bias or None) of an LM head given as a [V,H] tensor or a plain `nn.Linear`; None for anything
    else (a LoRA-adapted or custom head), which must take the full-logits path."""
    if torch.is_tensor(head):
        return (head, None) if head.dim() == 2 else None
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    return None


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V,H], bias [V] or None) of a model's LM head (`get_output_embeddings()`; peft wrappers included)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = plain_head(head) if head is not None else None
    if found is None:
        raise ValueError(f"model: expected a plain nn.Linear LM head from get_output_embeddings(), got "
                         f"{type(head).__name__} (an adapted head needs the full logits)")
    return found
