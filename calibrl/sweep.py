"""`python -m calibrl sweep SPEC`: many (arm, seed) runs, each its own process with one torch thread, resumable, then
a summary with confidence intervals over seeds and paired differences against the baseline arm.

    python -m calibrl sweep assets/study/spec.json --out runs/study --workers 2     # run (or continue) the study
    python -m calibrl sweep assets/study/spec.json --out assets/study --summarize-only  # rebuild the summary

A spec is a JSON file:

    {"name": "...", "budget": "small", "baseline": "grpo", "seeds": 16, "steps": 250,
     "base": {"eval_every": 50, ...},                          # TrainConfig/LossConfig overrides for every arm
     "arms": [{"name": "grpo", "set": {"mode": "grpo"}},
              {"name": "calibrl-a0.3", "set": {"mode": "calibrl", "slope": 0.3}, "seeds": 8, "role": "secondary",
               "reference": "calibrl"}],                          # optional: also paired against this arm
     "metrics": ["final_greedy_acc", "entropy_last", ...]}   # optional: the tables' columns (sweep_summary.METRICS)

"steps" is short for base.steps. "metrics" declares, before any run, the metrics the summary's tables show (default
sweep_summary.PRIMARY_METRICS); the verdict sentences cover the declared ones among VERDICT_METRICS (all declared
ones when none is).

Runs go to OUT/<arm>/s<seed>/ (the same trainer and files as `compare`). Resuming: a finished run (last history
step == steps and the final evaluation written) is skipped; an interrupted run continues from its checkpoint; an
interrupted run without a checkpoint is moved aside to OUT/<arm>/s<seed>.partial-<time>/ (never deleted) and
restarted. An arm's optional "reference" names another arm it is also paired against (an ablation against the
setting it varies, e.g. alpha 0.3 against alpha 0.5), besides the baseline. Runs are scheduled seed-major (seed 0 of
every primary arm, then its pilot arms, then seed 1, ...; secondary arms after the primary ones) so a partial sweep
stays balanced across arms. At the end OUT/summary.json, summary.md and report.html (offline) are written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_KEYS = {"name", "budget", "baseline", "seeds", "steps", "base", "arms", "metrics", "description", "last_frac"}
ARM_KEYS = {"name", "set", "seeds", "role", "description", "reference"}
SHARED_EVAL = ("eval_n", "pass_k")  # one held-out protocol for every arm, or paired differences mix metrics
ROLES = ("pilot", "primary", "secondary")
"""Pilot arms (e.g. to choose a coefficient) are scheduled with the primary arms of their seeds; secondary arms
after all primary seeds."""


@dataclass
class Arm:
    """One arm: a name (a single path component), overrides on top of the spec's base, its seeds and role."""

    name: str
    overrides: dict[str, Any]
    seeds: list[int]
    role: str = "primary"  # one of ROLES
    description: str = ""
    reference: str | None = None  # another arm it is also paired against (an ablation's own setting)


@dataclass
class Spec:
    name: str
    budget: str
    baseline: str
    base: dict[str, Any]
    arms: list[Arm]
    last_frac: float = 0.2
    description: str = ""
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()  # the declared metrics (load_spec fills in the default)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ValueError(f"{where}: expected a count (int) or a list of ints, got {value!r}")
    seeds = list(range(value)) if isinstance(value, int) else value
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: expected distinct non-negative int seeds, got {value!r}")
    return list(seeds)


def _component(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0:") \
            or name.startswith("."):
        raise ValueError(f"{where}: expected a plain name (one path component, no '/', '..'), got {name!r}")
    return name


def _metrics(value: Any) -> tuple[str, ...]:
    from calibrl.sweep_summary import METRICS, PRIMARY_METRICS

    if value is None:
        return PRIMARY_METRICS
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise ValueError(f"spec.metrics: expected a non-empty list of metric names, got {value!r}")
    unknown = [m for m in value if m not in METRICS]
    if unknown:
        raise ValueError(f"spec.metrics: unknown {unknown} (known: {sorted(METRICS)})")
    if len(set(value)) != len(value):
        raise ValueError(f"spec.metrics: expected distinct names, got {value}")
    return tuple(value)


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and check a spec file; every arm's config is built (and validated) once here."""
    from calibrl import _validate as V

    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"spec: {path} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"spec: {path} line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"spec: {path}: expected a JSON object")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise ValueError(f"spec: {path}: unknown keys {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    for key in ("name", "arms"):
        if key not in raw:
            raise ValueError(f"spec: {path}: missing {key!r}")
    default_seeds = _seeds(raw.get("seeds", 3), "spec.seeds")
    arms = []
    for i, a in enumerate(raw["arms"]):
        where = f"spec.arms[{i}]"
        if not isinstance(a, dict) or "name" not in a:
            raise ValueError(f"{where}: expected an object with a 'name'")
        if set(a) - ARM_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(set(a) - ARM_KEYS)} (known: {sorted(ARM_KEYS)})")
        role = a.get("role", "primary")
        if role not in ROLES:
            raise ValueError(f"{where}.role: expected one of {ROLES}, got {role!r}")
        overrides = a.get("set", {})
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}.set: expected an object of TrainConfig/LossConfig overrides")
        arms.append(Arm(_component(a["name"], f"{where}.name"), dict(overrides),
                        _seeds(a["seeds"], f"{where}.seeds") if "seeds" in a else default_seeds, role,
                        a.get("description", ""), a.get("reference")))
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"spec.arms: expected distinct arm names, got {names}")
    for i, arm in enumerate(arms):
        if arm.reference is not None and (arm.reference not in names or arm.reference == arm.name):
            raise ValueError(f"spec.arms[{i}].reference: expected the name of another arm (one of "
                             f"{[n for n in names if n != arm.name]}), got {arm.reference!r}")
    baseline = raw.get("baseline", names[0])
    if baseline not in names:
        raise ValueError(f"spec.baseline: expected one of the arm names {names}, got {baseline!r}")
    base = raw.get("base", {})
    if not isinstance(base, dict):
        raise ValueError("spec.base: expected an object of TrainConfig/LossConfig overrides")
    if "steps" in raw:
        steps = V.int_arg(raw["steps"], "spec.steps")
        if "steps" in base and base["steps"] != steps:
            raise ValueError(f"spec.steps: {steps} disagrees with spec.base.steps {base['steps']!r} (give one)")
        base = {**base, "steps": steps}
    last_frac = V.number(raw.get("last_frac", 0.2), "spec.last_frac", lo=0, hi=1, lo_open=True)
    spec = Spec(_component(raw["name"], "spec.name"), raw.get("budget", "small"), baseline, base, arms,
                last_frac, raw.get("description", ""), path, raw, _metrics(raw.get("metrics")))
    configs = [config_for(spec, arm, arm.seeds[0]) for arm in arms]  # validates the overrides
    shared = configs[names.index(baseline)]
    for i, cfg in enumerate(configs):
        for key in SHARED_EVAL:
            if getattr(cfg, key) != getattr(shared, key):
                raise ValueError(f"spec.arms[{i}].set.{key}: {getattr(cfg, key)!r} differs from the baseline arm's "
                                 f"{getattr(shared, key)!r}: paired differences need one held-out evaluation for "
                                 f"every arm; set {key} in spec.base")
    return spec


def config_for(spec: Spec, arm: Arm, seed: int):
    """The TrainConfig of one (arm, seed): budget, then the spec's base, then the arm's overrides."""
    from calibrl.config import TrainConfig

    kw = {**spec.base, **arm.overrides, "seed": seed, "name": f"{arm.name}-s{seed}", "threads": 1}
    try:
        return TrainConfig.from_budget(spec.budget, **kw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"spec arm {arm.name!r}: {err}") from None


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.name / f"s{seed}"


def run_state(path: Path, steps: int) -> str:
    """"done" (done.json records `steps`, or every step's row is written: a shipped run without checkpoints),
    "resumable" (a checkpoint file to continue from), "orphan" (files but no checkpoint) or "new"."""
    from calibrl.checkpoint import has_checkpoint
    from calibrl.history import finished_step, read_history

    if not path.exists() or not any(path.iterdir()):
        return "new"
    if finished_step(path) == steps:
        return "done"
    rows = read_history(path)
    if rows and rows[-1].get("step") == steps:
        return "done"
    return "resumable" if has_checkpoint(path) else "orphan"


def plan(spec: Spec, out: Path, roles: tuple[str, ...] = ROLES) -> list[tuple[Arm, int]]:
    """(arm, seed) pairs: primary and pilot arms together, seed-major (each seed's primary arms, then its pilot
    arms), then the secondary arms, seed-major."""
    order = []
    for stage in (("primary", "pilot"), ("secondary",)):
        arms = [a for r in stage if r in roles for a in spec.arms if a.role == r]
        for seed in sorted({s for a in arms for s in a.seeds}):
            order += [(a, seed) for a in arms if seed in a.seeds]
    return order


# ------------------------------------------------------------------------------------------------------- running
def _launch(spec: Spec, arm: Arm, seed: int, out: Path) -> tuple[subprocess.Popen, Path]:
    path = run_dir(out, arm, seed)
    steps = config_for(spec, arm, seed).steps
    state = run_state(path, steps)
    if state == "orphan":  # nothing to resume from: keep what is there, start afresh
        aside = path.with_name(f"{path.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        state = "new"
    path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    job = {"spec": str(spec.path.resolve()), "arm": arm.name, "seed": seed, "run_dir": str(path.resolve()),
           "resume": state == "resumable"}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = open(log_dir / f"{arm.name}-s{seed}.log", "a", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "calibrl.sweep", "--_job", json.dumps(job)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc, path


def _job(job: dict) -> int:
    """Worker entry: one (arm, seed) run in this process."""
    import torch

    from calibrl.trainer import train

    torch.set_num_threads(1)
    spec = load_spec(job["spec"])
    cfg = config_for(spec, spec.arm(job["arm"]), int(job["seed"]))
    print(f"[sweep] {job['arm']} seed {job['seed']} -> {job['run_dir']} (resume={job['resume']})", flush=True)
    train(cfg, resume=bool(job["resume"]), run_dir=job["run_dir"])
    return 0


def run_sweep(spec: Spec, out: str | os.PathLike, *, workers: int | None = None,
              roles: tuple[str, ...] = ROLES, progress: bool = True) -> dict:
    """Run every pending (arm, seed) of `spec` under `out` with `workers` processes; returns {"done", "failed"}."""
    from tqdm.auto import tqdm

    out = Path(out)
    if workers is None:  # not `workers or ...`: an explicit 0 is an error, not "all cores"
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    todo = plan(spec, out, roles)
    steps = {a.name: config_for(spec, a, a.seeds[0]).steps for a in spec.arms}
    pending = [(a, s) for a, s in todo if run_state(run_dir(out, a, s), steps[a.name]) != "done"]
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc=f"sweep {spec.name}", unit="run",
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 60.0)
    running: list[tuple[subprocess.Popen, Arm, int]] = []
    failed, shown = [], ""
    while pending or running:
        while pending and len(running) < workers:
            arm, seed = pending.pop(0)
            proc, _ = _launch(spec, arm, seed, out)
            running.append((proc, arm, seed))
        time.sleep(1.0)
        for item in list(running):
            proc, arm, seed = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                failed.append(f"{arm.name}-s{seed}")
                bar.write(f"failed: {arm.name} seed {seed} (exit {proc.returncode}; see {out}/logs/)")
            bar.update(1)
        now = " ".join(f"{a.name}:s{s}" for _, a, s in running)
        if now != shown:
            bar.set_postfix_str(now)
            shown = now
    bar.close()
    return {"done": len(todo) - len(failed), "failed": failed}


# ----------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of `sweep`."""
    parser.add_argument("spec", help="spec JSON file (arms, seeds, steps; see calibrl.sweep)")
    parser.add_argument("--out", default=None, help="output directory (default runs/<spec name>)")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs, one torch thread each "
                                                                  "(default: number of CPU cores)")
    parser.add_argument("--role", choices=("all",) + ROLES, default="all",
                        help="run only the arms of one role (default all: pilot, then primary, then secondary)")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild summary.json/.md and report.html "
                                                                      "from the runs already in --out")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="after summarizing, write the compact run files (config, history rounded to 6 "
                             "significant digits, the last evaluation and samples) to DIR/<arm>/s<seed>/ for "
                             "shipping, and summarize DIR; checkpoints and adapters are not copied")


def run(args: argparse.Namespace) -> int:
    from calibrl import sweep_summary
    from calibrl.runfiles import check_out

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    check_out(out, "--out")  # a file there, or an unwritable parent, is an error
    if args.summarize_only and not out.is_dir():
        raise ValueError(f"--out: {out} does not exist; --summarize-only reads the runs of a sweep there")
    if args.export:  # checked before hours of training, not after
        check_out(args.export, "--export")
    status = {"failed": []}
    if not args.summarize_only:
        roles = ROLES if args.role == "all" else (args.role,)
        status = run_sweep(spec, out, workers=args.workers, roles=roles)
    summary = sweep_summary.write_summary(spec, out)
    print(f"summary: {out / 'summary.md'} ({summary['n_runs']} runs)")
    if args.export:
        try:
            n = sweep_summary.export_runs(spec, out, Path(args.export))
            sweep_summary.write_summary(spec, Path(args.export))
        except OSError as err:
            raise ValueError(f"--export: cannot write the compact runs to {args.export} ({err}); the runs under "
                             f"{out} are untouched") from None
        print(f"exported {n} finished runs to {args.export} (and its summary)")
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_job":
        sys.exit(_job(json.loads(sys.argv[2])))
    from calibrl.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
