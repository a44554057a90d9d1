"""calibrl: a notebook-first teaching and diagnostics package for CalibRL.

CalibRL (ICLR 2026) adds expert trajectories to GRPO-style RLVR as a *calibration baseline*: a LeakyReLU gate on the
gap between the policy's token log-prob and the expert's, weighted by |advantage|. This package holds the losses
(GRPO family, CalibRL, LUFFY, RL-PLUS), probes (entropy, group rarity, gate activation), a small trainer, and the
figures and widgets the notebooks use.

`import calibrl` is light: submodules load on first use, e.g. `calibrl.losses.calibrl_loss` or
`from calibrl import calibrl_loss`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "advantage", "losses", "probes", "rewards", "tasks", "data", "models", "rollout", "trainer", "history",
    "config", "figures", "widgets", "cli", "course", "notebook",
)
_EXPORTS = {
    "group_advantages": "advantage", "pass_mask": "advantage", "group_stats": "advantage",
    "aggregate": "losses", "policy_loss": "losses", "calibrl_loss": "losses",
    "luffy_loss": "losses", "rlplus_loss": "losses",
    "load_policy": "models", "make_dataset": "tasks", "score": "rewards",
    "TrainConfig": "config", "LossConfig": "config", "History": "history", "train": "trainer",
    "diagnose": "diagnosis",
}

__all__ = ["__version__", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"calibrl.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"calibrl.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'calibrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
