"""Small shared input validators. Each raises ValueError naming the argument and what was expected."""
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
    vals = x if where is None else x[where]
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


def mask(x: Any, name: str, shape: Sequence[int], like: str = "logp", *, allow_empty: bool = False) -> torch.Tensor:
    """A [B,T] binary mask of `shape` with at least one true entry; returns it as bool."""
    tensor(x, name, shape=shape, like=like)
    m = binary(x, name)
    if not allow_empty and not bool(m.any()):
        raise ValueError(f"{name}: expected at least one unmasked (true) entry, got an all-masked tensor")
    return m


def float_tensor(x: Any, name: str, *, shape: Sequence[int] | None = None, ndim: int | Sequence[int] | None = None,
                 like: str | None = None, where: torch.Tensor | None = None, check_finite: bool = True
                 ) -> torch.Tensor:
    """A floating tensor of the given shape/ndim, finite (where `where` is true, if given; not checked with
    check_finite=False, for callers that check later under a mask)."""
    tensor(x, name, ndim=ndim, shape=shape, like=like)
    floating(x, name)
    return finite(x, name, where) if check_finite else x


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


def finite_sum(x: torch.Tensor, name: str, masked: bool = False) -> torch.Tensor:
    """Cheap finiteness check for a tensor already 0 outside its mask: one sum; the exact elementwise check runs
    only when the sum is not finite (an overflowing sum of finite values passes)."""
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        at = " at masked-in positions" if masked else ""
        raise ValueError(f"{name}: expected finite values{at}, found NaN or inf")
    return x
