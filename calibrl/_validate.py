"""Small shared input validators. Each raises ValueError naming the argument and what was expected.

Conventions checked here for every public tensor function: tensors of one call live on one device; the floating
tensors of one call share one dtype (masks and integer ids may be of any bool/int/float 0/1 dtype); log-probs are
<= 0 up to a small rounding tolerance (logp_tol); entropies are >= 0 up to the same tolerance."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(x: Any, name: str, *, ndim: int | Sequence[int] | None = None,
           shape: Sequence[int] | None = None, like: str | None = None) -> torch.Tensor:
    """x must be a torch.Tensor, optionally with ndim in `ndim` and exactly `shape` (`like` names the reference)."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        ref = f" like {like}" if like else ""
        raise ValueError(f"{name}: expected shape {tuple(shape)}{ref}, got {tuple(x.shape)}")
    return x


def floating(x: torch.Tensor, name: str) -> torch.Tensor:
    """x must have a floating dtype."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    return x


def finite(x: torch.Tensor, name: str, where: torch.Tensor | None = None) -> torch.Tensor:
    """x (optionally only at positions where `where` is true) must be finite (no NaN or inf)."""
    x = x.detach()
    vals = x if where is None else torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if vals.is_floating_point() and vals.numel() and not bool(torch.isfinite(vals).all()):
        at = "" if where is None else " at masked-in positions"
        raise ValueError(f"{name}: expected finite values{at}, found NaN or inf")
    return x


def binary(x: torch.Tensor, name: str) -> torch.Tensor:
    """x must be bool or hold only 0/1; returns a bool tensor."""
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise ValueError(f"{name}: expected a bool or 0/1 tensor, got dtype {x.dtype}")
    if x.numel() and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name}: expected a binary mask (bool or values in {{0, 1}}), found other values")
    return x != 0


def number(x: Any, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """A finite real number within [lo, hi] (open ends if asked)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")
    v = float(x)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name}: expected a value {'>' if lo_open else '>='} {lo}, got {x!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name}: expected a value {'<' if hi_open else '<='} {hi}, got {x!r}")
    return v


def choice(x: Any, name: str, options: Iterable[str]) -> str:
    """x must be one of `options`."""
    opts = tuple(options)
    if x not in opts:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, opts))}, got {x!r}")
    return x


def same_device(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """x must live on the same device as ref."""
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} like {ref_name}, got {x.device}")


def same_dtype(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """x must have the dtype of ref (floating inputs of one call are never mixed silently)."""
    if x.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {x.dtype} (give all floating "
                         f"inputs one dtype, e.g. .float() on each; half precision is computed in float32 anyway)")


def like(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, *, dtype: bool = True) -> torch.Tensor:
    """x on ref's device and (dtype=True) with ref's dtype."""
    same_device(name, x, ref, ref_name)
    if dtype:
        same_dtype(name, x, ref, ref_name)
    return x


def logp_tol(dtype: torch.dtype) -> float:
    """Rounding tolerance for log-probs > 0 and entropies < 0: 1e-4, or 8 ulps at 1 for half precision."""
    return max(1e-4, 8 * torch.finfo(dtype).eps) if dtype in (torch.float16, torch.bfloat16) else 1e-4


def logprobs(x: torch.Tensor, name: str, where: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities: <= logp_tol(dtype) (where `where` is true, if given). NaN is left to the finite checks."""
    x = x.detach()
    vals = x if where is None else torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if vals.numel() and bool((vals > logp_tol(x.dtype)).any()):
        at = "" if where is None else " at masked-in positions"
        raise ValueError(f"{name}: expected log-probabilities <= 0{at}, found values up to "
                         f"{float(vals.max()):.4g}")
    return x


def nonneg(x: torch.Tensor, name: str, where: torch.Tensor | None = None, what: str = "entropies") -> torch.Tensor:
    """Values >= -logp_tol(dtype) (where `where` is true, if given)."""
    x = x.detach()
    vals = x if where is None else torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if vals.numel() and bool((vals < -logp_tol(x.dtype)).any()):
        at = "" if where is None else " at masked-in positions"
        raise ValueError(f"{name}: expected {what} >= 0{at}, found values down to {float(vals.min()):.4g}")
    return x


def integer(x: torch.Tensor, name: str) -> torch.Tensor:
    """x must have an integer (not bool) dtype."""
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    return x


def int_arg(n: Any, name: str, *, lo: int = 1) -> int:
    """A python int >= lo (bools rejected)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {n!r}")
    return n


def float_like(x: Any, name: str, ref: torch.Tensor, ref_name: str, *, shape: Sequence[int] | None = None,
               ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Structure only (no values read, so it also works for tensors on the meta device): a floating tensor of
    the given shape/ndim on ref's device with ref's dtype."""
    tensor(x, name, ndim=ndim, shape=shape, like=ref_name)
    floating(x, name)
    return like(x, name, ref, ref_name)


def mask_like(x: Any, name: str, ref: torch.Tensor, ref_name: str, shape: Sequence[int] | None = None
              ) -> torch.Tensor:
    """Structure only: a tensor of ref's shape (or `shape`) on ref's device, of a bool/int/float dtype."""
    tensor(x, name, shape=tuple(ref.shape) if shape is None else shape, like=ref_name)
    if x.is_complex():
        raise ValueError(f"{name}: expected a bool or 0/1 tensor, got dtype {x.dtype}")
    same_device(name, x, ref, ref_name)
    return x


def expert_pair(logp: Any, expert_logp: Any, expert_mask: Any = None) -> tuple[int, int]:
    """Structure only, shared by calibrl_loss and the gate probes: logp a 2-D float tensor; expert_logp [B,Te] with
    logp's rows, dtype and device; expert_mask (optional) shaped like expert_logp. Returns (B, T) of logp."""
    tensor(logp, "logp", ndim=2)
    floating(logp, "logp")
    B, T = logp.shape
    float_like(expert_logp, "expert_logp", logp, "logp", ndim=2)
    if expert_logp.shape[0] != B:
        raise ValueError(f"expert_logp: expected {B} rows like logp, got shape {tuple(expert_logp.shape)}")
    if expert_mask is not None:
        mask_like(expert_mask, "expert_mask", expert_logp, "expert_logp")
    return B, T


def policy_args(logp, old_logp, adv, mask, clip_low, clip_high, clip_c, agg, norm_len, agg_modes) -> torch.Tensor:
    """Validate the inputs every policy loss shares (structure first, then values). Returns the bool mask."""
    tensor(logp, "logp", ndim=2)
    floating(logp, "logp")
    mask_like(mask, "mask", logp, "logp")
    float_like(old_logp, "old_logp", logp, "logp", shape=logp.shape)
    float_like(adv, "adv", logp, "logp", ndim=(1, 2))
    if adv.dim() == 1 and adv.shape[0] != logp.shape[0]:
        raise ValueError(f"adv: expected shape ({logp.shape[0]},) or {tuple(logp.shape)} like logp, "
                         f"got {tuple(adv.shape)}")
    if adv.dim() == 2:
        tensor(adv, "adv", shape=logp.shape, like="logp")
    number(clip_low, "clip_low", lo=0.0, hi=1.0, hi_open=True)
    number(clip_high, "clip_high", lo=0.0)
    if clip_c is not None:
        number(clip_c, "clip_c", lo=1.0, lo_open=True)
    choice(agg, "agg", agg_modes)
    if norm_len is not None:
        int_arg(norm_len, "norm_len")
    m = mask_values(mask, "mask")
    logprob_values(logp, "logp", m)
    logprob_values(old_logp, "old_logp", m)
    finite(adv, "adv", m if adv.dim() == 2 else None)
    return m


def mask_values(x: torch.Tensor, name: str, *, allow_empty: bool = False) -> torch.Tensor:
    """Values of a mask already checked by mask_like: binary, and (unless allow_empty) not all False."""
    m = binary(x, name)
    if not allow_empty and not bool(m.any()):
        raise ValueError(f"{name}: expected at least one unmasked (true) entry, got an all-masked tensor")
    return m


def logprob_values(x: torch.Tensor, name: str, where: torch.Tensor | None = None) -> torch.Tensor:
    """Finite log-probabilities (<= logp_tol) where `where` is true (everywhere if None)."""
    finite(x, name, where)
    return logprobs(x, name, where)
