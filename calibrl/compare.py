"""`python -m calibrl compare`: train several modes from the same start with the same seeds and data order, then
write an HTML report.

    python -m calibrl compare --budget smoke                       # GRPO vs CalibRL, seed 0, CI-sized
    python -m calibrl compare --budget small --seeds 0,1,2         # the README result (~2.5 min per seed, 2 cores)

Output: OUT/NAME/<mode>-s<seed>/ (config.json, history.jsonl, samples.jsonl, eval.jsonl, checkpoint/, adapter/)
and OUT/NAME/report.html.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of `compare`."""
    parser.add_argument("--budget", default="smoke", choices=("smoke", "small", "full"), help="size dial (default smoke)")
    parser.add_argument("--model", default="tiny", help="tiny (embedded default), a local path or a hub id")
    parser.add_argument("--task", default=None, help="task family (default: calibrl.tasks.DEFAULT_TASK)")
    parser.add_argument("--data", default=None,
                        help="train on this saved or hub-format dataset (folder or .parquet, with expert solutions); "
                             "its last eval_n rows are held out for evaluation")
    parser.add_argument("--modes", default="grpo,calibrl", help="comma-separated modes (default grpo,calibrl)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's number of RL steps")
    parser.add_argument("--out", default="runs", help="parent output directory (default runs/)")
    parser.add_argument("--name", default=None, help="comparison directory name (default compare-<budget>)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig/LossConfig field for every run, e.g. --set lr=5e-4 "
                             "--set recompute_old_logp=true (repeatable; parsed by the field's type)")
    parser.add_argument("--quantization", default=None, choices=("4bit",), help="4-bit NF4 base model (GPU, hub VLMs)")
    parser.add_argument("--report-to", default="none", choices=("none", "tensorboard", "wandb", "trackio"),
                        help="also mirror every History row to this tracker (see calibrl.tracking; default none)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true",
                       help="replace the runs of an existing comparison (only directories calibrl created)")
    group.add_argument("--resume", action="store_true",
                       help="continue the runs of an existing comparison from their checkpoints")


def _parse_list(text: str, what: str, cast=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    try:
        out = [cast(x) for x in items]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated {cast.__name__} values, got {text!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: expected distinct values, got {text!r}")
    return out


_SET_BY_OPTION = {"mode": "--modes", "seed": "--seeds", "out": "--out", "name": "--name", "model": "--model",
                  "task": "--task", "budget": "--budget", "quantization": "--quantization", "loss": "--modes and "
                  "--set on its fields (e.g. --set slope=0.3)"}


def _parse_sets(items: list[str]) -> dict:
    """`--set KEY=VALUE` items -> overrides, each value parsed by its field's type (calibrl.config.parse_value)."""
    from calibrl.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        if key in _SET_BY_OPTION:
            raise ValueError(f"--set {key}: set it with {_SET_BY_OPTION[key]}, not --set")
        out[key] = parse_value(key, value)
    return out


def _plan(root: Path, cfgs: list, overwrite: bool, resume: bool) -> dict[str, str]:
    """Check OUT/NAME and every run directory before anything loads or is written; returns run name -> what the
    run will do ("new", "overwrite", "resume")."""
    from calibrl.history import History, run_status
    from calibrl.runfiles import marker_kind

    exists = root.is_dir() and any(root.iterdir())
    if resume and not exists:
        raise ValueError(f"resume: {root} does not exist or is empty; nothing to resume (run without --resume)")
    if exists and not (overwrite or resume):
        raise ValueError(f"out/name: {root} already exists; pass --overwrite to replace its runs or --resume to "
                         f"continue them")
    if exists and overwrite and marker_kind(root) != "comparison":
        raise ValueError(f"overwrite: {root} was not created by `calibrl compare` (no .calibrl marker); refusing to "
                         f"replace anything in it: choose another --name")
    plan = {}
    for c in cfgs:
        run_dir = root / c.run_name
        run_resume = resume and run_status(run_dir, c.steps) != "absent"  # runs not started yet start fresh
        plan[c.run_name] = History.check_target(run_dir, resume=run_resume, overwrite=overwrite)
    return plan


def compare(*, budget: str = "smoke", model: str = "tiny", task: str | None = None,
            modes: list[str] = ("grpo", "calibrl"), seeds: list[int] = (0,), out: str | Path = "runs",
            name: str | None = None, overwrite: bool = False, resume: bool = False, progress: bool = True,
            report_to: str = "none", data_path: str | Path | None = None, **overrides) -> Path:
    """Train every (seed, mode) from the same start and write OUT/NAME/report.html; returns the report path.

    All inputs are checked (configs, datasets, the model's processor) before any training starts."""
    import torch
    from tqdm.auto import tqdm

    from calibrl.config import TrainConfig
    from calibrl.models import load_policy
    from calibrl.report import write_report
    from calibrl.runfiles import check_name, check_out, make_marked_dir
    from calibrl.tasks import DEFAULT_TASK, make_dataset
    from calibrl.tracking import BACKENDS, make_tracker
    from calibrl.trainer import EVAL_SEED, Trainer, check_inputs, lora_config

    if report_to not in BACKENDS:
        raise ValueError(f"report_to: expected one of {', '.join(BACKENDS)}, got {report_to!r}")

    root = check_out(out) / check_name(name or f"compare-{budget}", "name")
    check_out(root, "out/name")
    cfgs = [TrainConfig.from_budget(budget, mode=m, seed=s, model=model, task=task, out=str(root),
                                    name=f"{m}-s{s}", **overrides) for s in seeds for m in modes]
    plan = _plan(root, cfgs, overwrite, resume)  # files checked before any model loads
    task_name = task or DEFAULT_TASK
    c0 = cfgs[0]
    if data_path is not None:  # the user's data: the last eval_n rows held out (at most a quarter of it)
        from calibrl.data import load_user_dataset

        user = load_user_dataset(data_path, require_solution=True)
        n_eval = min(c0.eval_n, len(user) // 4) if c0.eval_every else 0
        train = user.select(range(len(user) - n_eval))
        data = {s: train for s in seeds}
        eval_data = user.select(range(len(user) - n_eval, len(user))) if n_eval else None
    else:
        data = {s: make_dataset(task_name, c0.train_size, s, style=c0.expert_style) for s in seeds}
        eval_data = make_dataset(task_name, c0.eval_n, EVAL_SEED) if c0.eval_every else None
    torch.manual_seed(c0.seed)
    first = load_policy(model, lora=lora_config(c0), quantization=c0.quantization)
    for c in cfgs:  # every bad input before any training
        check_inputs(c, first, data[c.seed], eval_data)
    make_marked_dir(root, "comparison")
    total = sum(c.steps for c in cfgs)
    bar = tqdm(total=total, desc="compare", disable=not progress, unit="step")
    t0 = time.perf_counter()
    dirs = []
    for i, c in enumerate(cfgs):
        bar.set_postfix_str(f"{c.loss.mode} seed {c.seed}")
        policy = first if i == 0 else None  # later runs reload the same start (same seed -> same LoRA init)
        tr = Trainer(c, policy=policy, train_data=data[c.seed], eval_data=eval_data,
                     resume=plan[c.run_name] == "resume", overwrite=plan[c.run_name] == "overwrite")
        bar.update(tr.step_num)

        def on_step(row: dict) -> None:
            bar.update(1)
            bar.set_postfix_str(f"{row['mode']} s{row['seed']} reward {row['reward_mean']:.2f}")

        with make_tracker(report_to, run_dir=tr.run_dir, name=f"{root.name}/{c.run_name}", config=c.to_dict()) as tk:
            tk.log_rows(tr.history.rows)  # steps already in a resumed History

            def on_step_tracked(row: dict) -> None:
                on_step(row)
                tk(row)

            tr.run(on_step_tracked)
        dirs.append(tr.run_dir)
        del tr
    bar.close()
    report = write_report(dirs, root / "report.html", budget=budget,
                          title=f"calibrl: {' vs '.join(modes)} ({budget}, seeds {','.join(map(str, seeds))})")
    print(f"trained {len(cfgs)} runs in {time.perf_counter() - t0:.1f} s; report: {report}")
    return report


def run(args: argparse.Namespace) -> int:
    """Entry point of `python -m calibrl compare`."""
    from calibrl.config import MODES

    modes = _parse_list(args.modes, "modes")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes: unknown mode {m!r}; expected some of {', '.join(MODES)}")
    seeds = _parse_list(args.seeds, "seeds", int)
    overrides = _parse_sets(args.overrides)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.quantization:
        overrides["quantization"] = args.quantization
    compare(budget=args.budget, model=args.model, task=args.task, modes=modes, seeds=seeds, out=args.out,
            name=args.name, overwrite=args.overwrite, resume=args.resume, report_to=args.report_to,
            data_path=args.data, **overrides)
    return 0
