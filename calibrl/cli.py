"""Command line: `python -m calibrl <command> ...`.

Each command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int` and keeps its
heavy imports (torch, transformers) inside `run`, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("calibrl.compare", "train GRPO and CalibRL (or other modes) from the same start and write a report"),
    "report": ("calibrl.report", "rebuild the HTML report from saved runs"),
    "eval": ("calibrl.evaluate", "sample answers from a model and print format rate and accuracy"),
    "build-tiny": ("calibrl.warmstart", "build and warm-start the embedded tiny Qwen2.5-VL"),
    "sweep": ("calibrl.sweep", "many (arm, seed) runs in parallel processes, resumable, with CIs over seeds"),
    "notebooks-html": ("calibrl.notebooks_html", "execute notebooks and write static HTML pages with their figures"),
    "diagnose": ("calibrl.diagnosis", "one rollout of your model on your data: will CalibRL's gate do anything?"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m calibrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a command whose module is not installed yet
            p.set_defaults(_missing=str(err))
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"calibrl {args.command}: unavailable ({args._missing})", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback (CALIBRL_DEBUG=1 shows it)
        if os.environ.get("CALIBRL_DEBUG"):
            raise
        print(f"calibrl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
