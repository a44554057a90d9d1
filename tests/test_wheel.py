"""A non-editable install works from any directory: build the wheel (offline), install it into a fresh venv (its
dependencies taken from this environment through a .pth line), and run the main job from another directory."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict:
    """This environment without PYTHONPATH (a checkout on the path would shadow, and to pip satisfy, the wheel)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CALIBRL_TINY_PATH")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _run(cmd, **kw):
    kw.setdefault("env", _clean_env())
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_install_runs_compare_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(wheels), str(ROOT)])
    wheel = next(wheels.glob("calibrl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "calibrl/assets/tiny-qwen2.5-vl/model.safetensors" in names and not any(n.startswith("assets/") for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}  # torch & co. from this environment
    (site / "zz_calibrl_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env()
    where = _run([str(py), "-c", "import calibrl.tiny as t; print(t.__file__); print(t.tiny_path())"], cwd=work,
                 env=env).stdout.split()
    assert all(str(site) in w for w in where), where  # the wheel's package and its model, not the checkout's
    assert _run([str(venv / "bin" / "calibrl"), "--version"], cwd=work, env=env).stdout.startswith("calibrl ")
    out = _run([str(py), "-m", "calibrl", "compare", "--budget", "smoke", "--threads", "1"], cwd=work, env=env)
    report = work / "runs" / "compare-smoke" / "report.html"
    assert report.is_file() and "Pipeline check" in report.read_text(), out.stdout[-2000:]
