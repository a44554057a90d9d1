"""Run history: runs/<name>/config.json, history.jsonl (one flat row per RL step, appended and fsynced as training
goes, so a crash leaves every finished step), samples.jsonl (sampled responses for the entropy heatmap),
checkpoint/state.pt (see calibrl.checkpoint) and done.json (written when the run finished).

Crash safety: `History.create` writes the ownership marker (calibrl.runfiles) first and config.json atomically;
`--overwrite` clears only a directory with the run marker; `--resume` needs a checkpoint, drops a torn last line with
a warning and moves rows finished after the checkpoint to history.replayed.jsonl (they are replayed
bit-identically), so no row is ever deleted. A finished run: `finished_step(run_dir) == cfg.steps`, or
`run_status(run_dir) == "finished"`."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from calibrl.checkpoint import CHECKPOINT_DIR, STATE_FILE, has_checkpoint, load_checkpoint, save_checkpoint
from calibrl.runfiles import (MARKER_FILE, append_lines, atomic_write_bytes, atomic_write_json, atomic_write_text,
                              check_out, clear_run_dir, make_marked_dir, marker_kind, read_json, repair_jsonl,
                              split_jsonl)

__all__ = ["History", "clean", "read_jsonl", "history_path", "read_history", "save_checkpoint", "load_checkpoint",
           "finished_step", "run_status"]

CONFIG_FILE, HISTORY_FILE, SAMPLES_FILE, DONE_FILE = "config.json", "history.jsonl", "samples.jsonl", "done.json"
COMPACT_HISTORY_FILE = HISTORY_FILE + ".gz"  # a shipped, read-only run (calibrl.sweep_summary.export_runs)


def clean(value: Any) -> Any:
    """JSON-ready value: tensors/numpy scalars to python numbers, NaN/inf to None (never NaN in a history)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "tolist"):
        return clean(value.tolist())
    raise ValueError(f"value: expected a JSON-able number, string, list or dict, got {type(value).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file ([] when it does not exist). A torn last line (a writer still appending, or a
    crash mid-write) is dropped; a bad line anywhere else raises ValueError naming the file and line."""
    return split_jsonl(path)[0]


def history_path(run_dir: str | os.PathLike) -> Path:
    """The run's history file: history.jsonl (a run written by the trainer), else history.jsonl.gz (a compact shipped
    run, gzip of the same lines), else the history.jsonl path that does not exist yet."""
    run_dir = Path(run_dir)
    plain, compact = run_dir / HISTORY_FILE, run_dir / COMPACT_HISTORY_FILE
    return compact if not plain.exists() and compact.exists() else plain


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's history (plain or compact, see `history_path`); [] when it has none."""
    return read_jsonl(history_path(run_dir))


class History:
    """The rows of one run. `History.load(run_dir)` reads a saved run; `.to_pandas()` gives a DataFrame."""

    def __init__(self, run_dir: str | os.PathLike, config: dict | None = None, rows: list[dict] | None = None):
        self.run_dir = Path(run_dir)
        self.config = config or {}
        self.rows: list[dict] = rows or []

    # ---------------------------------------------------------------------------------------------- creation
    @staticmethod
    def check_target(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> str:
        """Every check `create` makes, writing nothing (call it before loading a model). Returns what `create` will
        do: "new", "overwrite" or "resume"; ValueError naming the problem otherwise."""
        run_dir = Path(run_dir)
        if resume and overwrite:
            raise ValueError("resume/overwrite: expected at most one of them, got both")
        check_out(run_dir, "run_dir")
        if run_dir.is_symlink():
            raise ValueError(f"run_dir: {run_dir} is a symbolic link; expected a plain directory")
        exists = run_dir.is_dir() and any(run_dir.iterdir())
        if resume:
            if not (run_dir / CONFIG_FILE).is_file():
                raise ValueError(f"resume: {run_dir} has no run to resume (no {CONFIG_FILE}); "
                                 f"start it without --resume (resume=False)")
            if not has_checkpoint(run_dir):
                n = len(read_jsonl(run_dir / HISTORY_FILE))
                raise ValueError(f"resume: {run_dir} has no checkpoint ({CHECKPOINT_DIR}/{STATE_FILE}; {n} history rows), "
                                 f"so it cannot continue bit-identically. Checkpoints are written every save_every "
                                 f"steps (default 1; 0 = only at the end). Start it again with --overwrite "
                                 f"(overwrite=True), or keep it and train under another --name")
            return "resume"
        if exists and not overwrite:
            raise ValueError(f"run_dir: {run_dir} already exists; pass resume (--resume) to continue it or "
                             f"overwrite (--overwrite) to replace it")
        if exists:
            if marker_kind(run_dir) != "run":
                raise ValueError(f"overwrite: {run_dir} was not created by calibrl (no {MARKER_FILE} run marker); "
                                 f"refusing to delete it: choose another name or remove it yourself")
            return "overwrite"
        return "new"

    @classmethod
    def create(cls, run_dir: str | os.PathLike, config: dict, *, resume: bool = False,
               overwrite: bool = False) -> "History":
        """Open `run_dir` for writing. An existing non-empty directory is refused unless `resume` (keep its rows;
        needs a checkpoint) or `overwrite` (only a run directory calibrl created, recognised by its marker file, is
        cleared). New directories get the marker first, then config.json (atomic) and an empty history.jsonl."""
        run_dir = Path(run_dir)
        action = cls.check_target(run_dir, resume=resume, overwrite=overwrite)
        if action == "resume":
            return cls.load(run_dir)
        if action == "overwrite":
            clear_run_dir(run_dir)
        make_marked_dir(run_dir, "run")
        atomic_write_json(run_dir / CONFIG_FILE, clean(config))
        atomic_write_bytes(run_dir / HISTORY_FILE, b"")
        return cls(run_dir, config, [])

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "History":
        """Read config.json and history.jsonl (or a shipped run's history.jsonl.gz) of a run directory (ValueError
        naming file and line on bad JSON)."""
        run_dir = Path(run_dir)
        path = history_path(run_dir)
        if not path.exists():
            raise ValueError(f"run_dir: expected {run_dir / HISTORY_FILE} (or {COMPACT_HISTORY_FILE}) to exist "
                             f"(not a run directory?)")
        cfg_path = run_dir / CONFIG_FILE
        config = read_json(cfg_path, "config") if cfg_path.exists() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}:1: expected a JSON object, got {type(config).__name__}")
        rows = read_jsonl(path)
        for i, r in enumerate(rows, 1):
            if isinstance(r.get("step"), bool) or not isinstance(r.get("step"), int):
                raise ValueError(f"{path}: row {i} has no integer 'step' (got {r.get('step')!r})")
        return cls(run_dir, config, rows)

    # ------------------------------------------------------------------------------------------------- writing
    def append(self, row: dict) -> dict:
        """Clean `row`, append it to history.jsonl and fsync; returns the cleaned row."""
        row = clean(row)
        if "step" not in row:
            raise ValueError("row: expected a 'step' key")
        append_lines(self.run_dir / HISTORY_FILE, [json.dumps(row)])
        self.rows.append(row)
        return row

    def append_samples(self, rows: Iterable[dict]) -> None:
        """Append sampled responses (step, prompt_id, tokens, entropy, logp, passed, reward) to samples.jsonl."""
        append_lines(self.run_dir / SAMPLES_FILE, [json.dumps(clean(r)) for r in rows])

    def resume_at(self, step: int) -> None:
        """Make the files continue after checkpoint `step`: torn last lines are dropped (with a warning); rows after
        `step` (finished after the checkpoint, replayed bit-identically next) are MOVED to *.replayed.jsonl, never
        deleted. ValueError if the history lacks a step the checkpoint covers (rows 1..step must all be there)."""
        path = self.run_dir / HISTORY_FILE
        rows = repair_jsonl(path)
        have = [r.get("step") for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
        if have != list(range(1, step + 1)):
            raise ValueError(f"resume: {path} should hold steps 1..{step} (the checkpoint's step), it holds "
                             f"{_span(have)}; refusing to resume a history with gaps (the files are untouched)")
        for name in (HISTORY_FILE, SAMPLES_FILE):
            self._move_after(self.run_dir / name, step)
        self.rows = [r for r in rows if r["step"] <= step]

    truncate = resume_at  # the former name (it now keeps a copy of what it removes)

    def _move_after(self, path: Path, step: int) -> None:
        rows = repair_jsonl(path)
        later = [r for r in rows if not (isinstance(r.get("step"), int) and r["step"] <= step)]
        if not later:
            return
        warnings.warn(f"{path}: {len(later)} rows after the checkpoint (step {step}) moved to "
                      f"{path.stem}.replayed.jsonl; those steps are replayed bit-identically", RuntimeWarning,
                      stacklevel=3)
        append_lines(path.with_name(f"{path.stem}.replayed.jsonl"), [json.dumps(r) for r in later])
        kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def mark_done(self, step: int) -> None:
        """Write done.json (atomic) at the end of a run: `finished_step(run_dir) == cfg.steps` then tells a finished
        run from an interrupted one."""
        atomic_write_json(self.run_dir / DONE_FILE, {"step": int(step), "rows": len(self.rows)})

    # ------------------------------------------------------------------------------------------------- reading
    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.run_dir.name

    @property
    def mode(self) -> str | None:
        """The run's loss mode (from config.json, else the first row)."""
        return (self.config.get("loss") or {}).get("mode") or (self.rows[0].get("mode") if self.rows else None)

    @property
    def seed(self) -> int | None:
        """The run's seed (from config.json, else the first row)."""
        return self.config.get("seed", self.rows[0].get("seed") if self.rows else None)

    def samples(self) -> list[dict]:
        """Rows of samples.jsonl."""
        return read_jsonl(self.run_dir / SAMPLES_FILE)

    def column(self, key: str) -> list:
        """Values of `key` over steps (None where absent)."""
        return [r.get(key) for r in self.rows]

    def to_pandas(self):
        """History rows as a pandas DataFrame (one row per step; null -> NaN)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"History({str(self.run_dir)!r}, mode={self.mode!r}, seed={self.seed!r}, steps={len(self.rows)})"


# ------------------------------------------------------------------------------------------------- run status
def finished_step(run_dir: str | os.PathLike) -> int | None:
    """The step recorded in done.json (written as the last act of `Trainer.run`), or None when the run did not
    finish. A run asked for `steps` steps is finished when `finished_step(run_dir) == steps`."""
    path = Path(run_dir) / DONE_FILE
    if not path.is_file():
        return None
    try:
        step = read_json(path, "done").get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def run_status(run_dir: str | os.PathLike, steps: int | None = None) -> str:
    """What a run directory holds, for resumable sweeps:
    - "absent": no directory, or an empty one (start it fresh);
    - "finished": done.json records `steps` (or the config's steps when `steps` is None);
    - "resumable": config and checkpoint present (resume=True continues it bit-identically);
    - "stale": files but no checkpoint (cannot be resumed; overwrite=True restarts it, a marked run only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "absent"
    if not (run_dir / CONFIG_FILE).is_file():
        return "stale"
    if steps is None:
        cfg = read_json(run_dir / CONFIG_FILE, "config")
        steps = cfg.get("steps") if isinstance(cfg, dict) else None
    done = finished_step(run_dir)
    if done is not None and done == steps:
        return "finished"
    return "resumable" if has_checkpoint(run_dir) else "stale"


def _span(steps: list) -> str:
    if not steps:
        return "no rows"
    return f"steps {steps[:3]}...{steps[-2:]} ({len(steps)} rows)" if len(steps) > 5 else f"steps {steps}"
