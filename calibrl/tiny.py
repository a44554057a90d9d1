"""The embedded tiny Qwen2.5-VL: config, byte-level BPE tokenizer, image-only processor, all built offline in code.

`build_tiny_random(seed)` returns a randomly initialised `Qwen2_5_VLForConditionalGeneration` (about 3M parameters)
and an `ImageOnlyQwen2_5_VLProcessor`. Same seed -> identical weights and vocabulary. The shipped, warm-started
model ships inside the package (`calibrl/assets/tiny-qwen2.5-vl/`, package data, so a wheel install has it; found
by `tiny_path()`) and has exactly this architecture (see `calibrl.warmstart`).

Pitfalls handled here (reference/environment.md): no torchvision, so the stock Qwen processor cannot be built and an
image-only subclass is registered with `AutoProcessor`; `mrope_section` must sum to head_dim / 2; the image
processor's `longest_edge` is capped at 112*112 pixels (16 image tokens) so a large image cannot blow up the prompt.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

TINY_ENV = "CALIBRL_TINY_PATH"
TINY_DIRNAME = "tiny-qwen2.5-vl"


def tiny_path() -> Path:
    """Directory of the shipped tiny model: $CALIBRL_TINY_PATH when set, else the package data directory
    `calibrl/assets/tiny-qwen2.5-vl` found with importlib.resources (works from a clone, an editable install and a
    wheel alike)."""
    env = os.environ.get(TINY_ENV)
    if env:
        return Path(env).expanduser()
    from importlib.resources import files

    return Path(str(files("calibrl").joinpath("assets", TINY_DIRNAME)))


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PAD, EOS = "<|endoftext|>", "<|im_end|>"
MAX_PIXELS = 112 * 112
MIN_PIXELS = 56 * 56
VOCAB_SIZE = 1024

# Qwen-style template without the default system turn (shorter prompts); an image part becomes the vision block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[8, 12, 12], rope_theta=1e6, max_position_embeddings=2048)
VISION_ARCH = dict(depth=2, hidden_size=96, intermediate_size=192, num_heads=2, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "grey", "pink", "brown",
            "cyan", "magenta"]
_SHAPES = ["circle", "square", "triangle", "star", "rectangle", "shape", "shapes", "circles", "squares", "triangles"]
_WORDS = ("what is the colour color of biggest largest smallest big small large medium tiny shape left right above "
          "below top bottom middle center how many are there in image picture count number sum total plus minus times "
          "digit digits which one answer think first second third next to nearest farthest most least same different "
          "yes no true false option choice A B C D I see a an and so it from to side as than more fewer object objects "
          "row column each with has have then after before between only all none both closest area size").split()
_TEMPLATES = [
    "What is the colour of the {adj} shape? Think in <think> </think>, then answer in <answer> </answer>.",
    "What color is the {shape} to the {side} of the {colour} {shape2}?",
    "How many {colour} {shapes} are there in the image? Answer with a number.",
    "What is {a} plus {b}? What is {a} minus {b}? What is {a} times {b}?",
    "Which shape is {side} of the {colour} one? Answer with A, B, C or D.",
    "<think> {colour} > {colour2} > {colour3} </think><answer> {colour} </answer>",
    "<think> {a} + {b} = {c} </think><answer> {c} </answer>",
    "<think> count {a} </think><answer> {a} </answer>",
    "<think> I see {a} shapes. From left to right: a {adj2} {colour} {shape}, a {adj2} {colour2} {shape2}. "
    "The largest one is the {colour} {shape}, so the answer is {colour}. </think><answer> {colour} </answer>",
    "<answer>{colour}</answer> <answer>{a}</answer> <answer>{side}</answer> <answer>{choice}</answer>",
    "The {colour} {shape} is {side} of the {colour2} {shape2}, so the answer is {side}.",
]


def tiny_corpus(n: int = 4000, seed: int = 0, extra: Iterable[str] | None = None) -> list[str]:
    """Deterministic synthetic sentences covering the task vocabulary (questions, both solution styles, colour
    words, shapes, digits and small numbers); `extra` texts (e.g. real task questions/solutions) are appended."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(_TEMPLATES)
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append(t.format(
            adj=rng.choice(["biggest", "smallest", "largest"]), adj2=rng.choice(["small", "medium", "large", "big"]),
            shape=rng.choice(_SHAPES[:5]), shape2=rng.choice(_SHAPES[:5]), shapes=rng.choice(_SHAPES[6:]),
            colour=rng.choice(_COLOURS), colour2=rng.choice(_COLOURS), colour3=rng.choice(_COLOURS),
            side=rng.choice(["left", "right", "above", "below", "top", "bottom"]), choice=rng.choice("ABCD"),
            a=a, b=b, c=a + b))
    out.append(" ".join(_WORDS))
    out.extend(str(i) for i in range(101))
    out.extend(extra or [])
    return out


def build_tokenizer(texts: Sequence[str] | None = None, vocab_size: int = VOCAB_SIZE) -> Any:
    """Byte-level BPE trained in code on `tiny_corpus()` (+ `texts`), wrapped as a fast tokenizer with Qwen's
    special tokens, a Qwen-style chat template and left padding. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size: expected >= 300 (256 bytes + specials), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(tiny_corpus(extra=texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD, padding_side="left",
                                  extra_special_tokens=SPECIAL_TOKENS[1:2] + VISION_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor() -> Any:
    """`Qwen2VLImageProcessorPil` (patch 14, merge 2) with `longest_edge` capped at 112*112 pixels (<= 16 tokens)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


def _processor_class() -> type:
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without the video processor (which needs torchvision): images and text only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            if tokenizer is None or image_processor is None:
                raise ValueError("ImageOnlyQwen2_5_VLProcessor: expected an image_processor and a tokenizer")
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyQwen2_5_VLProcessor.__module__ = __name__
    ImageOnlyQwen2_5_VLProcessor.__qualname__ = "ImageOnlyQwen2_5_VLProcessor"
    return ImageOnlyQwen2_5_VLProcessor


_PROCESSOR_CLS: type | None = None


def image_only_processor_class() -> type:
    """The `ImageOnlyQwen2_5_VLProcessor` class (created on first use so that importing this module stays light)."""
    global _PROCESSOR_CLS
    if _PROCESSOR_CLS is None:
        _PROCESSOR_CLS = _processor_class()
    return _PROCESSOR_CLS


def register_processor() -> type:
    """Register the image-only processor with `AutoProcessor` for `Qwen2_5_VLConfig` (idempotent); returns it.
    Without this, `AutoProcessor.from_pretrained` on a tiny checkpoint silently returns a bare tokenizer."""
    import transformers
    from transformers import AutoProcessor, Qwen2_5_VLConfig

    cls = image_only_processor_class()
    AutoProcessor.register(Qwen2_5_VLConfig, cls, exist_ok=True)
    setattr(transformers, cls.__name__, cls)  # lets processor_config.json's "processor_class" resolve by name
    return cls


def build_processor(texts: Sequence[str] | None = None) -> Any:
    """Tokenizer + capped image processor wrapped in the registered image-only processor."""
    cls = register_processor()
    tok = build_tokenizer(texts)
    return cls(image_processor=build_image_processor(), tokenizer=tok, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: Any) -> Any:
    """`Qwen2_5_VLConfig` of the tiny model for `tokenizer` (checks mrope_section sums to head_dim / 2)."""
    from transformers import Qwen2_5_VLConfig

    t = dict(TEXT_ARCH)
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    if sum(t["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section: expected to sum to head_dim/2 = {head_dim // 2}, got {t['mrope_section']}")
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t["num_key_value_heads"], max_position_embeddings=t["max_position_embeddings"],
                rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"],
                                 "mrope_section": t["mrope_section"]},
                eos_token_id=ids[EOS], pad_token_id=ids[PAD], bos_token_id=None, tie_word_embeddings=True)
    vis = dict(VISION_ARCH, out_hidden_size=t["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vis, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
                            eos_token_id=ids[EOS], pad_token_id=ids[PAD])


def build_tiny_random(seed: int = 0, texts: Sequence[str] | None = None) -> tuple[Any, Any]:
    """Random-init tiny Qwen2.5-VL and its processor: `(model, processor)`, model in eval mode, float32, on CPU.

    `seed` fixes the weights; the tokenizer depends only on the built-in corpus plus `texts` (extra training text
    for the BPE, e.g. task questions and solutions). Two calls with the same arguments give identical weights and
    vocabulary. The model's generation config has the pad/eos ids and suppresses the vision special tokens.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    processor = build_processor(texts)
    cfg = build_config(processor.tokenizer)
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(cpu_state)
    model.eval()
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = cfg.text_config.pad_token_id, cfg.text_config.eos_token_id, None
    gc.suppress_tokens = vision_token_ids(processor.tokenizer)
    return model, processor


def vision_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the vision special tokens present in `tokenizer` (suppressed in generation and log-probs)."""
    ids = []
    for name in VISION_TOKENS:
        i = tokenizer.convert_tokens_to_ids(name)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None:
            ids.append(i)
    return ids
