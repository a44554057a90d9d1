"""Command line: `calibrl <command> ...` (or `python -m calibrl <command> ...`).

Each command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int` and keeps its
heavy imports (torch, transformers) inside `run`, so `--help` stays fast. Add a command by adding one line to
`COMMANDS`. Every command reports bad input the same way: one line `calibrl <command>: error: ...` on stderr and exit
code 2 (CALIBRL_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import textwrap

COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("calibrl.compare", "train GRPO and CalibRL (or other modes) from the same start and write a report"),
    "report": ("calibrl.report", "rebuild the HTML report from saved runs"),
    "eval": ("calibrl.evaluate", "sample answers from a model and print format rate and accuracy"),
    "build-tiny": ("calibrl.warmstart", "build and warm-start the embedded tiny Qwen2.5-VL"),
    "sweep": ("calibrl.sweep", "many (arm, seed) runs in parallel processes, resumable, with CIs over seeds"),
    "notebooks-html": ("calibrl.notebooks_html", "execute notebooks and write static HTML pages with their figures"),
    "diagnose": ("calibrl.diagnosis", "one rollout of your model on your data: will CalibRL's gate do anything?"),
}
"""name -> (module with add_arguments/run, one-line help). Order = order in --help."""

BUDGET_TIMES = {
    "smoke": "a pipeline check: `compare` of 2 modes ~25 s wall on 2 CPU cores (CI)",
    "small": "the README study: ~2-3 min per run on 2 quiet CPU cores",
    "full": "for a GPU or a long CPU run (not timed on CPU)",
}
"""Measured wall times per budget (README Quickstart and "A real result"; 2-core CPU machine, tiny model)."""
SET_BY_FLAGS = ("loss", "mode", "seed", "out", "name", "model", "task", "quantization", "threads")
"""Config fields that have their own flag (--modes, --seeds, --out, ...) rather than --set."""


def _prog() -> str:
    """`calibrl` when run as the console script, `python -m calibrl` otherwise."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m calibrl" if base in ("__main__.py", "-c", "") or base.startswith("python") else "calibrl"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("calibrl")
    except Exception:  # not installed (a bare checkout on sys.path)
        from calibrl import __version__

        return __version__


def _set_keys() -> list[str]:
    """`--set` keys with their types, generated from the config dataclasses."""
    from calibrl.config import LossConfig, TrainConfig

    lines = []
    for cls in (TrainConfig, LossConfig):
        fields = [f for f in dataclasses.fields(cls) if f.name not in SET_BY_FLAGS]
        items = [f"{f.name} ({f.type if isinstance(f.type, str) else f.type.__name__})" for f in fields]
        lines.append(textwrap.fill(f"{cls.__name__}: " + ", ".join(items), 110, initial_indent="  ",
                                   subsequent_indent="    "))
    return lines


def overview() -> str:
    """Tasks, modes, budgets (sizes and measured times) and --set keys, for the help epilog."""
    from calibrl.config import BUDGETS, MODES, TrainConfig
    from calibrl.tasks import DEFAULT_TASK, TASKS

    out = ["tasks (--task): " + ", ".join(f"{t}{' (default)' if t == DEFAULT_TASK else ''}" for t in TASKS),
           "modes (--modes): " + ", ".join(MODES), "budgets (--budget):"]
    for b in BUDGETS:
        c = TrainConfig.from_budget(b)
        out.append(textwrap.fill(f"{b:<5} {c.steps} RL steps, P={c.prompts_per_step} prompts x G={c.group_size}, "
                                 f"{c.max_new_tokens} new tokens, {c.minibatches} mini-batches; "
                                 f"{BUDGET_TIMES.get(b, 'not timed')}", 110, initial_indent="  ",
                                 subsequent_indent="        "))
    out.append("--set KEY=VALUE keys (type):")
    out += _set_keys()
    return "\n".join(out)


def build_parser(*, with_overview: bool = True) -> argparse.ArgumentParser:
    prog = _prog()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=overview() if with_overview else None)
    parser.add_argument("--version", action="version", version=f"calibrl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, prog=f"{prog} {name}",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=overview() if with_overview and name == "compare" else None)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a command whose module is not installed yet
            p.set_defaults(_missing=str(err))
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_help = not argv or any(a in ("-h", "--help") for a in argv)
    parser = build_parser(with_overview=wants_help)  # the overview imports the task registry: only for help
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"calibrl {args.command}: error: unavailable ({args._missing})", file=sys.stderr)
        return 2
    from calibrl.quiet import known_noise

    try:
        with known_noise():  # the third-party warnings calibrl's own calls trigger, nothing else
            return int(args._run(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback (CALIBRL_DEBUG=1 shows it)
        if os.environ.get("CALIBRL_DEBUG"):
            raise
        print(f"calibrl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
