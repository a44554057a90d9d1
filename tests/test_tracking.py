"""calibrl.tracking: every History column mirrored to TensorBoard (read back from the event file), W&B and trackio
(fakes that record the calls), the optional packages imported only when asked, and `compare --report-to`."""
from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest

from calibrl.tracking import BACKENDS, chain, make_tracker, split_row

ROWS = [
    {"step": 1, "mode": "calibrl", "seed": 0, "reward_mean": 0.25, "skipped": False, "gate_passed_below": None,
     "opt_steps": 2, "pass_rate_hist": [1, 0, 2]},
    {"step": 2, "mode": "calibrl", "seed": 0, "reward_mean": 0.5, "skipped": True, "gate_passed_below": 0.75,
     "opt_steps": 2, "pass_rate_hist": [0, 1, 2]},
]


def read_tb(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_split_row_numbers_vs_other_values():
    scalars, others = split_row(ROWS[0])
    assert scalars["reward_mean"] == 0.25 and scalars["skipped"] == 0.0 and scalars["seed"] == 0.0
    assert math.isnan(scalars["gate_passed_below"]) and "step" not in scalars
    assert others == {"mode": "calibrl", "pass_rate_hist": [1, 0, 2]}
    for bad in ({"reward": 1.0}, {"step": "1"}, {"step": True}, [1]):
        with pytest.raises(ValueError, match="row"):
            split_row(bad)


def test_tensorboard_event_file_holds_every_history_column_every_step(tmp_path):
    pytest.importorskip("tensorboard")
    with make_tracker("tensorboard", run_dir=tmp_path, config={"slope": 0.5}) as tk:
        for row in ROWS:
            tk(row)
    scalars, texts = read_tb(tmp_path / "tb")
    assert set(scalars) == {"seed", "reward_mean", "skipped", "gate_passed_below", "opt_steps"}
    assert scalars["reward_mean"] == [(1, 0.25), (2, 0.5)]
    assert scalars["skipped"] == [(1, 0.0), (2, 1.0)]
    assert math.isnan(scalars["gate_passed_below"][0][1]) and scalars["gate_passed_below"][1] == (2, 0.75)
    assert texts["text/mode/text_summary"] == [(1, "calibrl"), (2, "calibrl")]
    assert texts["text/pass_rate_hist/text_summary"][1] == (2, "[0, 1, 2]")
    assert "slope" in texts["config/text_summary"][0][1]
    with pytest.raises(ValueError, match="closed"):
        tk(ROWS[0])


def _fake(name, calls):
    mod = types.ModuleType(name)
    run = types.SimpleNamespace(log=lambda d, step=None: calls.append(("log", step, d)),
                                finish=lambda: calls.append(("finish",)))
    mod.init = lambda **kw: (calls.append(("init", kw)), run)[1]
    mod.log = run.log
    mod.finish = run.finish
    return mod


@pytest.mark.parametrize("backend", ["wandb", "trackio"])
def test_wandb_and_trackio_get_every_column_offline_by_default(backend, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, backend, _fake(backend, calls))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    tk = make_tracker(backend, run_dir=tmp_path / "run", name="cmp/calibrl-s0", config={"slope": 0.5})
    tk.log_rows(ROWS)
    tk.close()
    init = calls[0][1]
    assert init["name"] == "cmp/calibrl-s0" and init["project"] == "calibrl" and init["config"] == {"slope": 0.5}
    if backend == "wandb":
        assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "run")
    else:
        import os
        assert os.environ["TRACKIO_DIR"] == str(tmp_path / "run" / "trackio")
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2]
    assert set(logs[1][2]) == set(ROWS[1]) - {"step"}                       # every column, each step
    assert logs[1][2]["reward_mean"] == 0.5 and logs[1][2]["skipped"] == 1.0
    assert calls[-1] == ("finish",)


def test_wandb_mode_follows_the_environment(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake("wandb", calls))
    monkeypatch.setenv("WANDB_MODE", "online")
    make_tracker("wandb", run_dir=tmp_path).close()
    assert calls[0][1]["mode"] == "online"


def test_optional_backends_are_imported_only_when_asked(tmp_path):
    code = ("import sys, calibrl.tracking as t; tk = t.make_tracker('none', run_dir=r'%s'); tk({'step': 1, 'x': 1.0});"
            "print(sorted(m for m in ('wandb', 'trackio', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))"
            % tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not (tmp_path / "tb").exists()


def test_bad_arguments_are_refused(tmp_path):
    assert "tensorboard" in BACKENDS
    with pytest.raises(ValueError, match="report_to"):
        make_tracker("mlflow", run_dir=tmp_path)
    with pytest.raises(ValueError, match="project"):
        make_tracker("none", run_dir=tmp_path, project="")
    with pytest.raises(ValueError, match="callbacks"):
        chain(print, 3)
    seen = []
    chain(seen.append, None, lambda r: seen.append(r["step"]))({"step": 4})
    assert seen == [{"step": 4}, 4]


@pytest.mark.slow
def test_compare_report_to_tensorboard_mirrors_the_history(tmp_path):
    pytest.importorskip("tensorboard")
    from calibrl.cli import main
    from calibrl.history import History

    rc = main(["compare", "--budget", "smoke", "--modes", "calibrl", "--steps", "2", "--out", str(tmp_path),
               "--name", "cmp", "--threads", "1", "--report-to", "tensorboard", "--set", "eval_every=0"])
    assert rc == 0
    run = tmp_path / "cmp" / "calibrl-s0"
    rows = History.load(run).rows
    scalars, texts = read_tb(run / "tb")
    assert len(rows) == 2
    for row in rows:
        for k, v in row.items():
            if k == "step":
                continue
            if isinstance(v, (int, float)) or v is None:
                got = dict(scalars[k])[row["step"]]
                assert (v is None and math.isnan(got)) or got == pytest.approx(float(v), rel=1e-6, abs=1e-7), k
            else:
                assert dict(texts[f"text/{k}/text_summary"])[row["step"]] == str(v), k
