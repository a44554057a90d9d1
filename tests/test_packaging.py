"""The packaging files agree with each other and the CLI answers."""
from __future__ import annotations

import re
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_reqs = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-")}
    project = _pyproject()["project"]
    wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["gpu"])
    for req in wanted:
        assert _name(req) in env_reqs, f"environment.yml lacks {req}"
        assert env_reqs[_name(req)] == req.replace(" ", ""), f"pin differs: {env_reqs[_name(req)]} vs {req}"
    extra = set(env_reqs) - {_name(r) for r in wanted}
    assert not extra, f"environment.yml has packages pyproject does not: {extra}"
    assert any(r.startswith("-e .") for r in pip_section), "environment.yml must install the package itself"


def test_python_floor_and_constraints():
    assert _pyproject()["project"]["requires-python"] == ">=3.10"
    constraints = (ROOT / ".ci" / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in constraints


def test_no_tests_package():
    assert not (ROOT / "tests" / "__init__.py").exists()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match, "README must mark its test command with <!-- test-command -->"
    command = match.group(1).strip()
    assert command in ci, f".ci/run must run the README's test command: {command!r}"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "calibrl", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for command in ("compare", "report", "eval", "build-tiny"):
        assert command in out.stdout


def test_cli_without_command_prints_help_and_fails():
    out = subprocess.run([sys.executable, "-m", "calibrl"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "COMMAND" in out.stdout


def test_import_is_light():
    code = "import sys, calibrl; print(any(m.startswith(('transformers', 'plotly', 'datasets', 'peft')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------------------------ the CLI explains itself
def _cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "calibrl", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"calibrl {_pyproject()['project']['version']}"


def test_help_lists_tasks_modes_budgets_and_set_keys():
    import dataclasses

    from calibrl.cli import SET_BY_FLAGS
    from calibrl.config import BUDGETS, MODES, LossConfig, TrainConfig
    from calibrl.tasks import TASKS

    text = " ".join(_cli("--help").stdout.split())  # unwrap
    for name in [*TASKS, *MODES]:
        assert name in text
    for b in BUDGETS:
        c = TrainConfig.from_budget(b)
        assert f"{b} {c.steps} RL steps, P={c.prompts_per_step} prompts x G={c.group_size}" in text
    for cls in (TrainConfig, LossConfig):
        for f in dataclasses.fields(cls):
            if f.name not in SET_BY_FLAGS:
                assert f"{f.name} ({f.type})" in text, f.name
    assert "min" in text and " s " in text  # measured times


def test_every_option_of_every_command_has_help():
    from calibrl.cli import build_parser

    parser = build_parser(with_overview=False)
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_console_script_usage_names_calibrl(monkeypatch):
    from calibrl import cli

    monkeypatch.setattr(sys, "argv", ["/venv/bin/calibrl"])
    assert cli.build_parser(with_overview=False).prog == "calibrl"
    monkeypatch.setattr(sys, "argv", ["/repo/calibrl/__main__.py"])
    assert cli.build_parser(with_overview=False).prog == "python -m calibrl"


def test_one_error_style():
    for args in (("eval", "--task", "nope"), ("report", "/nonexistent-run"), ("build-tiny",)):
        out = _cli(*args)
        assert out.returncode == 2, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"python -m calibrl {args[0]}: error:") or last.startswith(f"calibrl {args[0]}: error:"), last
        assert "Traceback" not in out.stderr


def test_offline_hub_id_fails_fast(monkeypatch):
    import time

    import huggingface_hub  # noqa: F401  (imports out of the timing)
    import transformers  # noqa: F401

    from calibrl.models import load_policy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        load_policy("calibrl-test/not-a-cached-model")
    assert time.perf_counter() - t0 < 5


def test_eval_takes_a_hub_format_dataset(tmp_path, capsys):
    import datasets
    from PIL import Image

    from calibrl.cli import main
    from calibrl.data import save_dataset

    img = Image.new("RGB", (56, 56), (200, 30, 30))
    ds = datasets.Dataset.from_list([{"images": [img], "problem": "<image>What is the colour of the biggest shape?",
                                      "answer": "red"}] * 2)
    path = save_dataset(ds, tmp_path / "hub.parquet", format="parquet")
    rc = main(["eval", "--data", str(path), "--n", "2", "--samples-per-prompt", "1", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and f"task=--data {path} n=2" in out and "accuracy=" in out


def test_known_noise_silenced_only_inside_and_only_by_message():
    import io
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from calibrl.quiet import known_noise

    # our own handler on transformers' logger: deterministic whatever stream earlier tests left transformers with
    buf, level = io.StringIO(), hf_logging.get_verbosity()
    handler = logging.StreamHandler(buf)
    logging.getLogger("transformers").addHandler(handler)
    hf_logging.set_verbosity_warning()
    log = hf_logging.get_logger("transformers.utils.generic")
    noise = "`past_key_values`/`cache_params` are deprecated. Use `cache` instead."
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with known_noise():
                log.warning(noise)
                log.warning("an unrelated transformers warning")
                warnings.warn("`past_key_values` is deprecated and will be removed", FutureWarning)
                warnings.warn("another FutureWarning", FutureWarning)
            warnings.warn("`past_key_values` is deprecated and will be removed", FutureWarning)  # outside: shown
            log.warning(noise)  # outside the block the same log line is shown again
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        hf_logging.set_verbosity(level)
    err = buf.getvalue()
    assert err.count(noise) == 1 and "an unrelated transformers warning" in err
    assert [str(w.message) for w in seen] == ["another FutureWarning",
                                              "`past_key_values` is deprecated and will be removed"]
