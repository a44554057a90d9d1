"""Checkpoints of a run: runs/<name>/checkpoint/state.pt, loaded with `torch.load(weights_only=True)`.

The state holds only tensors, numbers, strings, lists, tuples and dicts (no pickled classes, no numpy arrays), so
loading a crafted run directory cannot execute code: `weights_only=True` refuses anything else. It is written
atomically (temporary file, fsync, rename): a crash or a full disk leaves the previous checkpoint.

Contents: step (the data-order position too), the trainable weights by name, the optimizer state_dict, and the RNG
states of torch (CPU, and CUDA where present), python `random` and numpy's legacy global generator.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from calibrl.runfiles import atomic_write_bytes

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
_KEYS = ("step", "trainable", "optimizer", "rng_torch", "rng_python", "rng_numpy")


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """runs/<name>/checkpoint/state.pt."""
    return Path(run_dir) / CHECKPOINT_DIR / STATE_FILE


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """True when the run directory has a checkpoint file (readable or not)."""
    return checkpoint_path(run_dir).is_file()


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: Any, optimizer: Any) -> Path:
    """Write the checkpoint of `step` atomically; returns the checkpoint directory."""
    import random

    import numpy as np
    import torch

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "step": int(step),
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
        "rng_numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    buf = io.BytesIO()
    torch.save(state, buf)
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path.parent


def read_checkpoint(run_dir: str | os.PathLike) -> dict:
    """The checkpoint's state dict, loaded with weights_only=True and checked; ValueError naming the file when it is
    missing, unreadable, crafted or incomplete. Changes nothing on disk."""
    import torch

    file = checkpoint_path(run_dir)
    advice = ("the run's history and config are untouched; restore the file, or start the run again with "
              "--overwrite (overwrite=True)")
    if not file.is_file():
        raise ValueError(f"resume: no checkpoint at {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or a pickle that is not plain data: never executed
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint: {file} cannot be read safely ({type(err).__name__}: {first}); {advice}") from None
    if not isinstance(state, dict) or any(k not in state for k in _KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint: {file} is incomplete (expected keys {list(_KEYS)}, got {got}); {advice}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint: {file} has step {step!r}, expected an integer >= 0; {advice}")
    trainable = state["trainable"]
    if not isinstance(trainable, dict) or not all(isinstance(t, torch.Tensor) for t in trainable.values()):
        raise ValueError(f"checkpoint: {file}: 'trainable' must map names to tensors; {advice}")
    return state


def load_checkpoint(run_dir: str | os.PathLike, model: Any, optimizer: Any) -> int:
    """Restore a checkpoint into `model`, `optimizer` and the global RNGs; returns its step. Every check (names,
    shapes, dtypes of the trainable weights) runs before anything is changed."""
    import random

    import numpy as np
    import torch

    file = checkpoint_path(run_dir)
    state = read_checkpoint(run_dir)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if set(saved) != set(params):
        extra, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise ValueError(f"checkpoint: {file} does not match the model's trainable weights (in the checkpoint only: "
                         f"{extra[:3]}, in the model only: {missing[:3]}); same model and LoRA settings?")
    for n, t in saved.items():
        if t.shape != params[n].shape or t.dtype != params[n].dtype:
            raise ValueError(f"checkpoint: {file}: {n} is {tuple(t.shape)} {t.dtype}, the model's is "
                             f"{tuple(params[n].shape)} {params[n].dtype}")
    try:
        name, keys, pos, has_gauss, gauss = state["rng_numpy"]
        numpy_state = (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss))
        python_state = state["rng_python"]
        python_state = (python_state[0], tuple(python_state[1]), python_state[2])
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"checkpoint: {file}: malformed RNG state ({err})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"checkpoint: {file}: optimizer state does not fit ({err})") from None
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)
    torch.set_rng_state(state["rng_torch"])
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])
