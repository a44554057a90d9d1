"""Known third-party noise that calibrl's own calls trigger, silenced only there (by message, inside a `with`
block), never globally: a new or different warning still shows.

- transformers 5.x: "`past_key_values` is deprecated ... Use `cache` instead" (FutureWarning and a logger line) when
  calibrl's shared-prefix forward passes its KV cache; "`is_gradient_checkpointing` is deprecated" when peft wraps
  the model for LoRA.
- bitsandbytes >= 0.50 on CPU: "Failed to load CPU gemm_4bit_forward ... pip install kernels" at import (4-bit on
  CPU still works through the slower path).
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

FUTURE_MESSAGES = (r"`past_key_values` is deprecated", r"`is_gradient_checkpointing` is deprecated")
LOG_PATTERNS = re.compile(r"`past_key_values`/`cache_params` are deprecated|gemm_4bit_forward|pip install kernels")
LOGGERS = ("transformers", "bitsandbytes")


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LOG_PATTERNS.search(record.getMessage())


@contextlib.contextmanager
def known_noise() -> Iterator[None]:
    """Silence exactly the messages listed in this module's docstring for the duration of the block."""
    drop = _Drop()
    try:  # transformers adds its stderr handler lazily: create it now so that the filter below is on it
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")
    except ImportError:
        pass
    loggers = [logging.getLogger(name) for name in LOGGERS]
    handlers = [h for lg in loggers for h in lg.handlers] + logging.getLogger().handlers
    with warnings.catch_warnings():
        for msg in FUTURE_MESSAGES:
            warnings.filterwarnings("ignore", message=msg, category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(gemm_4bit|pip install kernels).*")
        for obj in [*loggers, *handlers]:
            obj.addFilter(drop)
        try:
            yield
        finally:
            for obj in [*loggers, *handlers]:
                obj.removeFilter(drop)
