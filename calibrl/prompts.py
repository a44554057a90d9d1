"""Prompt encoding: the one place that turns (image, question) pairs into processor inputs, and row selection.

Used by the rollout, the held-out evaluator and the samplers, so every path sees the same chat template, the same
left padding and the same image checks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

Inputs = dict[str, torch.Tensor]


def chat_texts(processor: Any, questions: Sequence[str]) -> list[str]:
    """The chat-templated prompt text of each question, ending with the assistant's generation prompt."""
    from calibrl.data import build_messages

    return [processor.apply_chat_template(build_messages(q), add_generation_prompt=True, tokenize=False)
            for q in questions]


def encode_prompts(policy: Any, images: Sequence[Any], questions: Sequence[str]) -> Inputs:
    """Processor output for one image + question per prompt, left-padded (rows = prompts), on the policy's device.
    Images are checked first (ValueError naming `image[i]`)."""
    from calibrl.data import check_image

    if len(images) != len(questions) or not questions:
        raise ValueError(f"images/questions: expected equal non-zero lengths, got {len(images)} and {len(questions)}")
    proc = policy.processor
    if proc is None or not hasattr(proc, "image_processor"):
        raise ValueError(f"policy.processor: expected a multimodal processor with an image_processor, got "
                         f"{type(proc).__name__}")
    images = [check_image(im, label=f"image[{i}]", min_side=None, max_side=None) for i, im in enumerate(images)]
    tok = policy.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = proc(text=chat_texts(proc, questions), images=[[im] for im in images], padding=True,
                   return_tensors="pt")
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
    out = {k: v[rows.to(v.device)] for k, v in inputs.items()
           if k != "pixel_values" and torch.is_tensor(v) and v.shape[0] == n}
    chunks = _image_chunks(inputs)
    if chunks is not None:
        if "image_grid_thw" in inputs:
            out["pixel_values"] = torch.cat([chunks[i] for i in rows.tolist()], 0)
        else:
            out["pixel_values"] = torch.stack([chunks[i] for i in rows.tolist()], 0)
    return out
