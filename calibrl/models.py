"""Loading a policy: the embedded tiny Qwen2.5-VL ("tiny"), a local checkpoint, or a hub VLM, optionally 4-bit + LoRA.

`load_policy` returns a `Policy` that the rollout, trainer and eval code use without caring which model it is.
Supported families: Qwen2.5-VL (documented default `Qwen/Qwen2.5-VL-3B-Instruct`), Qwen2-VL, and anything
`AutoModelForImageTextToText` loads (LLaVA, Idefics3/SmolVLM, ...). LoRA is restricted to the language model by a
regex over its q/k/v/o/gate/up/down projections, so the vision tower is never adapted (CLIP/SigLIP towers use the
same projection names, hence the regex instead of a plain name list).

CPU + 4-bit (bitsandbytes 0.50 on an AVX512-BF16 CPU): an eval-mode forward permanently repacks the 4-bit weights
and a later LoRA backward fails. On CPU the 4-bit policy is therefore returned in train mode; generate in train mode
under `torch.no_grad()` (LoRA dropout is 0, so train mode changes nothing else). CUDA has no such issue.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # typing only: importing transformers here would slow `import calibrl`
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

TINY_NAME = "tiny"
DEFAULT_HUB_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
LORA_TARGET_REGEX = (r".*(?:language_model|text_model)\..*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
VISION_MODULE_KEYS = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "connector", "merger")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXTRA_SUPPRESS = ("<|im_start|>",)  # never valid inside an answer; the prototype suppressed it too


from calibrl.tiny import tiny_path  # noqa: E402,F401  (re-exported: $CALIBRL_TINY_PATH or the package data)


@dataclass
class Policy:
    """A loaded policy: what the rollout, trainer and evaluator need, read as attributes (never getattr).

    `suppress_token_ids` are suppressed in sampling and set to -inf in log-prob forwards. `eos_token_ids` lists
    every id that ends a response (Instruct checkpoints have several; one may equal the pad id); `eos_token_id` is
    the first (the chat turn terminator), the one appended to expert rows. `model` may be a PEFT wrapper."""
    model: "PreTrainedModel"
    processor: "ProcessorMixin"
    tokenizer: "PreTrainedTokenizerBase"
    name: str
    suppress_token_ids: list[int] = field(default_factory=list)
    eos_token_id: int = 0
    pad_token_id: int = 0
    is_lora: bool = False
    quantization: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.eos_token_ids:
            self.eos_token_ids = [self.eos_token_id]
        ids = self.eos_token_ids
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"eos_token_ids: expected non-negative ints, got {ids!r}")
        if self.eos_token_id != ids[0]:
            raise ValueError(f"eos_token_id: expected the first of eos_token_ids {ids}, got {self.eos_token_id}")
        clash = sorted(set(ids) & set(self.suppress_token_ids))
        if clash:
            raise ValueError(f"suppress_token_ids: must not contain EOS ids (a response could never end), got {clash}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eval_mode_ok(self) -> bool:
        """False only for 4-bit on CPU, which must stay in train mode (bitsandbytes repacks weights in eval mode and a
        later LoRA backward fails). On CUDA, eval mode also re-enables the KV cache that gradient checkpointing
        turns off in train mode, which makes generation several times faster."""
        return not (self.quantization is not None and self.device.type == "cpu")


def _resolve(name_or_path: str) -> tuple[str, bool]:
    """-> (path or hub id, is_local). Raises ValueError for anything unrecognised."""
    accepted = (f'accepted: "{TINY_NAME}" (the shipped tiny Qwen2.5-VL), a local directory with config.json, or a hub '
                f'id "owner/name" such as "{DEFAULT_HUB_MODEL}", "Qwen/Qwen2-VL-2B-Instruct", '
                '"HuggingFaceTB/SmolVLM-256M-Instruct", "llava-hf/llava-1.5-7b-hf"')
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"name_or_path: expected a non-empty string; {accepted}")
    s = str(name_or_path)
    if s == TINY_NAME:
        p = tiny_path()
        if not (p / "config.json").is_file():
            raise ValueError(f"name_or_path: the tiny model is missing at {p}; build it with "
                             "`python -m calibrl build-tiny` or set CALIBRL_TINY_PATH")
        return str(p), True
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"name_or_path: directory {p} has no config.json; {accepted}")
        return str(p), True
    if s.startswith((".", "/", "~")) or not _HUB_ID.match(s):
        raise ValueError(f"name_or_path: unknown model {s!r} (not {TINY_NAME!r}, not an existing path, not a hub id); "
                         f"{accepted}")
    _check_hub_reachable(s)
    return s, False


def _check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail in well under a second, instead of after from_pretrained's retries (~37 s), when a hub id is neither in
    the local cache nor downloadable: HF_HUB_OFFLINE set, or the hub endpoint not reachable within `timeout`."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: from_pretrained loads it offline
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"name_or_path: hub model {repo_id!r} is not in the local cache and HF_HUB_OFFLINE is set. "
                         f'Download it where there is network, pass a local path, or use "{TINY_NAME}".')
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        raise ValueError(f"name_or_path: hub model {repo_id!r} is not in the local cache and {url.hostname} is "
                         f"unreachable ({err}). Download it where there is network, pass a local path, or use "
                         f'"{TINY_NAME}".') from None


def _hub_error(name: str, err: Exception) -> ValueError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "the hub is unreachable or the id is wrong"
    return ValueError(f"name_or_path: could not load hub model {name!r} ({why}: {type(err).__name__}: {err}). "
                      f'Download it where there is network, pass a local path, or use "{TINY_NAME}".')


def _model_class(model_type: str) -> Any:
    import transformers

    if model_type == "qwen2_5_vl":
        return transformers.Qwen2_5_VLForConditionalGeneration
    if model_type == "qwen2_vl":
        return transformers.Qwen2VLForConditionalGeneration
    return transformers.AutoModelForImageTextToText


def _load_processor(src: str, model_type: str) -> Any:
    """AutoProcessor, falling back to the image-only Qwen processor when torchvision is missing (Qwen-VL only)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from calibrl.tiny import MAX_PIXELS, MIN_PIXELS, image_only_processor_class, register_processor

    register_processor()
    err: Exception | None = None
    try:
        proc = AutoProcessor.from_pretrained(src)
        if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
            return proc
        err = TypeError(f"AutoProcessor returned {type(proc).__name__} without an image_processor")
    except (ImportError, AttributeError, TypeError, ValueError) as e:  # no torchvision -> video processor fails
        err = e
    if model_type not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"processor: could not build a multimodal processor for {src!r}: {err}")
    tok = AutoTokenizer.from_pretrained(src)
    try:
        ip = AutoImageProcessor.from_pretrained(src)
    except (ImportError, OSError, ValueError):
        from transformers import Qwen2VLImageProcessorPil
        ip = Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    return image_only_processor_class()(image_processor=ip, tokenizer=tok,
                                        chat_template=getattr(tok, "chat_template", None))


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _as_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    raise ValueError(f"dtype: expected None, a torch.dtype or one of {sorted(table)}, got {dtype!r}")


def default_lora_config(r: int = 16, alpha: int = 32) -> Any:
    """LoRA on the language model's attention and MLP projections only (regex target), dropout 0."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=LORA_TARGET_REGEX,
                      task_type="CAUSAL_LM")


def lora_module_names(model: Any) -> list[str]:
    """Names of modules that carry LoRA weights."""
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0]


def suppress_ids_for(tokenizer: Any, eos_ids: list[int]) -> list[int]:
    """Vision special tokens, `<|im_start|>`, and the pad token when it is not an EOS: never valid in an answer."""
    from calibrl.tiny import VISION_TOKENS

    names = list(VISION_TOKENS) + list(_EXTRA_SUPPRESS)
    for attr in ("image_token", "boi_token", "eoi_token", "fake_image_token", "global_image_token"):
        if isinstance(getattr(tokenizer, attr, None), str):
            names.append(getattr(tokenizer, attr))
    if "<image>" in tokenizer.get_vocab():
        names.append("<image>")
    vocab = tokenizer.get_vocab()
    ids = {vocab[n] for n in names if n in vocab}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        ids.add(tokenizer.pad_token_id)
    return sorted(i for i in ids if i not in eos_ids)


@contextlib.contextmanager
def _no_load_bar(quiet: bool):
    """Hide transformers' "Loading weights" bar (quiet=True: the embedded model, loaded in milliseconds); the
    user's progress-bar setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if quiet and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            hf_logging.enable_progress_bar()


def load_policy(name_or_path: str = TINY_NAME, *, quantization: str | None = None, lora: Any = None,
                dtype: Any = None, device: Any = None, gradient_checkpointing: bool | None = None) -> Policy:
    """Load a vision-language policy.

    name_or_path: "tiny" (`tiny_path()`, the package data, offline), a local checkpoint directory, or a hub id.
    quantization: None or "4bit" (bitsandbytes NF4, double quantization; compute dtype bf16 on GPUs that support
        it, fp16 otherwise, fp32 on CPU; lm_head and the vision tower stay unquantized; k-bit training preparation).
    lora: None/False (no adapter), True (`default_lora_config()`), or a peft `LoraConfig` (target_modules None ->
        the language-model regex). Raises ValueError if any LoRA module lands in the vision tower.
    dtype: weights dtype (default fp32 on CPU, bf16/fp16 on CUDA). device: default "cuda" if available else "cpu".
    gradient_checkpointing: default True for 4-bit, False otherwise.
    The model is returned in eval mode, except 4-bit on CPU (train mode, see the module docstring).
    """
    from transformers import AutoConfig

    if quantization not in (None, "4bit"):
        raise ValueError(f'quantization: expected None or "4bit", got {quantization!r}')
    if not (lora is None or isinstance(lora, bool) or type(lora).__name__ == "LoraConfig"):
        raise ValueError(f"lora: expected None, True/False or a peft LoraConfig, got {type(lora).__name__}")
    if gradient_checkpointing is not None and not isinstance(gradient_checkpointing, bool):
        raise ValueError(f"gradient_checkpointing: expected None or bool, got {gradient_checkpointing!r}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    dt = _as_dtype(dtype) or _default_dtype(dev)
    src, local = _resolve(name_or_path)
    if str(name_or_path) == TINY_NAME:
        from calibrl.tiny import register_processor
        register_processor()
    try:
        cfg = AutoConfig.from_pretrained(src)
        processor = _load_processor(src, cfg.model_type)
        kwargs: dict[str, Any] = {"dtype": dt}
        if quantization == "4bit":
            kwargs.update(quantization_config=_bnb_config(dev, dt), device_map={"": str(dev)})
        with _no_load_bar(str(name_or_path) == TINY_NAME):
            model = _model_class(cfg.model_type).from_pretrained(src, **kwargs)
    except (OSError, ConnectionError) as e:
        if local:
            raise ValueError(f"name_or_path: could not load {src!r}: {e}") from e
        raise _hub_error(src, e) from e
    if quantization is None:
        model.to(dev)
    gc_on = quantization == "4bit" if gradient_checkpointing is None else gradient_checkpointing
    if quantization == "4bit":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_on,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model.enable_input_require_grads()
    if lora:
        model = _attach_lora(model, default_lora_config() if lora is True else lora)
    tok = processor.tokenizer
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    suppress = suppress_ids_for(tok, eos)
    gen = model.generation_config
    gen.pad_token_id, gen.suppress_tokens = pad, suppress or None
    if quantization == "4bit" and dev.type == "cpu":
        model.train()
    else:
        model.eval()
    return Policy(model=model, processor=processor, tokenizer=tok, name=str(name_or_path), suppress_token_ids=suppress,
                  eos_token_id=eos[0], pad_token_id=pad, is_lora=bool(lora), quantization=quantization,
                  eos_token_ids=eos)


def policy_from_model(model: Any, processor: Any, name: str = "in-memory") -> Policy:
    """Wrap an already built model + processor (e.g. `calibrl.tiny.build_tiny_random()`) as a `Policy`."""
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ValueError(f"processor: expected a multimodal processor, got {type(processor).__name__}")
    if not hasattr(model, "generate"):
        raise ValueError(f"model: expected a generative model, got {type(model).__name__}")
    tok = processor.tokenizer
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return Policy(model=model, processor=processor, tokenizer=tok, name=name, suppress_token_ids=suppress_ids_for(tok, eos),
                  eos_token_id=eos[0], pad_token_id=pad, is_lora=bool(lora_module_names(model)), eos_token_ids=eos)


def _bnb_config(dev: torch.device, dt: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    compute = torch.float32 if dev.type == "cpu" else (dt if dt in (torch.bfloat16, torch.float16) else _default_dtype(dev))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=_skip_modules())


def _skip_modules() -> list[str]:
    """Modules bnb must leave unquantized: plain names (substring match in transformers 4.x) and ".*name" (v5
    matches patterns from the start of the module path)."""
    return ["lm_head", *VISION_MODULE_KEYS, *(rf".*\b{k}" for k in VISION_MODULE_KEYS)]


def _attach_lora(model: Any, config: Any) -> Any:
    from peft import get_peft_model

    if config.target_modules is None:
        config.target_modules = LORA_TARGET_REGEX
    model = get_peft_model(model, config)
    names = lora_module_names(model)
    if not names:
        raise ValueError(f"lora: target_modules {config.target_modules!r} matched no module of the language model")
    bad = [n for n in names if any(f".{k}." in f".{n}." for k in VISION_MODULE_KEYS)]
    if bad:
        raise ValueError(f"lora: target_modules must not touch the vision tower; matched {bad[:3]} "
                         f"(use a regex such as {LORA_TARGET_REGEX!r})")
    return model


def _eos_ids(model: Any, tok: Any) -> list[int]:
    ids: list[int] = []
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    if not ids:
        raise ValueError("tokenizer: the model defines no eos_token_id")
    if tok.eos_token_id in ids:  # the chat turn terminator first (Qwen: <|im_end|>)
        ids.remove(tok.eos_token_id)
        ids.insert(0, tok.eos_token_id)
    return ids


def generation_kwargs(policy: Policy, *, temperature: float = 1.0, max_new_tokens: int = 32,
                      top_p: float = 1.0) -> dict[str, Any]:
    """Keyword arguments for `policy.model.generate`: pure sampling at `temperature` (top_k off, top_p as given) or
    greedy when temperature == 0; pad/eos ids; the policy's suppressed tokens."""
    if not isinstance(policy, Policy):
        raise ValueError(f"policy: expected a calibrl.models.Policy, got {type(policy).__name__}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and temperature == temperature):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p!r}")
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=policy.pad_token_id,
                              eos_token_id=list(policy.eos_token_ids),
                              suppress_tokens=list(policy.suppress_token_ids) or None)
    if temperature == 0:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    return kw
