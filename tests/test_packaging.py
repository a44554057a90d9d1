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
