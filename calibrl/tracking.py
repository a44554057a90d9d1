"""Mirror a run's History to TensorBoard, Weights & Biases or trackio, one row per RL step.

History (runs/<name>/history.jsonl) stays the source of truth; a tracker only copies each row out, through the
trainer's `on_step` callback:

    from calibrl.tracking import make_tracker
    tracker = make_tracker("tensorboard", run_dir="runs/calibrl-s0", name="calibrl-s0", config=cfg.to_dict())
    train(cfg, on_step=tracker)          # then tracker.close()
    python -m calibrl compare --report-to tensorboard      # the same from the command line

Every History column is written every step: numbers as scalars (tag = column name; bools as 0/1; None, i.e. "not
applicable this step", as NaN so that no column is missing), other values (the mode string, lists) as text under
`text/<column>` in TensorBoard and as-is elsewhere. The step axis is the row's `step`.
Backends (optional dependencies, imported only when asked; offline wherever the backend has an offline mode):
- tensorboard: torch.utils.tensorboard.SummaryWriter (package `tensorboard`), event files in <run_dir>/tb/.
- wandb: `wandb.init(mode=...)` with mode $WANDB_MODE, default "offline" (files under <run_dir>/wandb; upload
  later with `wandb sync`); set WANDB_MODE=online to stream.
- trackio: local SQLite by default; $TRACKIO_DIR defaults to <run_dir>/trackio so nothing is written elsewhere.
- none: no tracker (make_tracker returns a callable that does nothing).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

BACKENDS = ("none", "tensorboard", "wandb", "trackio")


def split_row(row: dict) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalars, others) of one History row: numbers (bools as 0/1, None as NaN) vs the rest; `step` excluded."""
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        raise ValueError(f"row: expected a History row (dict with an int 'step'), got {row!r:.80}")
    scalars, others = {}, {}
    for k, v in row.items():
        if k == "step":
            continue
        if v is None:
            scalars[k] = math.nan
        elif isinstance(v, (bool, int, float)):
            scalars[k] = float(v)
        else:
            others[k] = v
    return scalars, others


class Tracker:
    """Callable `on_step(row)`; `close()` flushes. Subclasses implement `_write(step, scalars, others)`."""
    backend = "none"

    def __init__(self) -> None:
        self.closed = False

    def __call__(self, row: dict) -> None:
        if self.closed:
            raise ValueError(f"tracker: the {self.backend} tracker is closed")
        scalars, others = split_row(row)
        self._write(row["step"], scalars, others)

    def log_rows(self, rows: Iterable[dict]) -> None:
        """Write rows already in a History (e.g. `History.load(run_dir).rows`) in order."""
        for row in rows:
            self(row)

    def _write(self, step: int, scalars: dict, others: dict) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    backend = "tensorboard"

    def __init__(self, log_dir: Path, config: dict | None) -> None:
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ImportError("report_to='tensorboard' needs the tensorboard package: pip install 'calibrl[tb]'") from e
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if config:
            import json
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def _write(self, step: int, scalars: dict, others: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        for k, v in others.items():
            self.writer.add_text(f"text/{k}", str(v), step)

    def close(self) -> None:
        if not self.closed:
            self.writer.flush()
            self.writer.close()
        super().close()


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, run_dir: Path, name: str, project: str, config: dict | None) -> None:
        super().__init__()
        try:
            import wandb
        except ImportError as e:
            raise ImportError("report_to='wandb' needs the wandb package: pip install wandb") from e
        mode = os.environ.get("WANDB_MODE", "offline")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config or {}, mode=mode,
                              reinit="finish_previous")

    def _write(self, step: int, scalars: dict, others: dict) -> None:
        self.run.log({**scalars, **others}, step=step)

    def close(self) -> None:
        if not self.closed:
            self.run.finish()
        super().close()


class TrackioTracker(Tracker):
    backend = "trackio"

    def __init__(self, run_dir: Path, name: str, project: str, config: dict | None) -> None:
        super().__init__()
        os.environ.setdefault("TRACKIO_DIR", str(Path(run_dir) / "trackio"))  # read when trackio is imported
        try:
            import trackio
        except ImportError as e:
            raise ImportError("report_to='trackio' needs the trackio package: pip install trackio") from e
        self.trackio = trackio
        self.run = trackio.init(project=project, name=name, config=config or {})

    def _write(self, step: int, scalars: dict, others: dict) -> None:
        self.trackio.log({**scalars, **{k: str(v) for k, v in others.items()}}, step=step)

    def close(self) -> None:
        if not self.closed:
            self.trackio.finish()
        super().close()


def make_tracker(report_to: str, *, run_dir: str | os.PathLike, name: str | None = None,
                 project: str = "calibrl", config: dict | None = None) -> Tracker:
    """A tracker for `report_to` in BACKENDS writing the run in `run_dir` (TensorBoard: <run_dir>/tb)."""
    if report_to not in BACKENDS:
        raise ValueError(f"report_to: expected one of {', '.join(BACKENDS)}, got {report_to!r}")
    if not isinstance(project, str) or not project:
        raise ValueError(f"project: expected a non-empty string, got {project!r}")
    run_dir = Path(run_dir)
    name = name or run_dir.name
    if report_to == "tensorboard":
        return TensorBoardTracker(run_dir / "tb", config)
    if report_to == "wandb":
        return WandbTracker(run_dir, name, project, config)
    if report_to == "trackio":
        return TrackioTracker(run_dir, name, project, config)
    return Tracker()


def chain(*callbacks: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """One on_step callback calling each given callback (None entries skipped) in order."""
    cbs = [c for c in callbacks if c is not None]
    for c in cbs:
        if not callable(c):
            raise ValueError(f"callbacks: expected callables or None, got {type(c).__name__}")

    def on_step(row: dict) -> None:
        for c in cbs:
            c(row)
    return on_step
