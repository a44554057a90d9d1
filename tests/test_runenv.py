"""calibrl.runenv: where a run ran (env.json), and a resume in another environment says it is not bit-identical."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_faults import fault_cfg  # noqa: E402
from test_rollout import tiny_policy  # noqa: E402

from calibrl import runenv  # noqa: E402
from calibrl.trainer import Trainer  # noqa: E402

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold
flags\t\t: fpu avx512f

processor\t: 1
vendor_id\t: OtherVendor
cpu family\t: 99
"""


def test_cpu_model_reads_the_first_processor(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    assert runenv.cpu_model(tmp_path / "cpuinfo") == "GenuineIntel family 6 model 85 (Intel(R) Xeon(R) Gold)"
    assert isinstance(runenv.cpu_model(tmp_path / "absent"), str) and runenv.cpu_model(tmp_path / "absent")


def test_environment_and_differences():
    env = runenv.environment()
    assert set(env) == {"calibrl", "python", "packages", "cpu", "cpu_capability", "cuda"}
    assert env["packages"]["torch"] and set(env["packages"]) == set(runenv.PACKAGES)
    assert runenv.differences(env, json.loads(json.dumps(env))) == []
    other = json.loads(json.dumps(env))
    other["packages"]["transformers"], other["cpu"], other["calibrl"] = "0.0.1", "elsewhere", "9.9"
    got = runenv.differences(env, other)  # calibrl's own version is not part of bit-identity
    assert got == [f"transformers {env['packages']['transformers']} -> 0.0.1", f"cpu {env['cpu']} -> elsewhere"]
    with pytest.raises(ValueError, match="before: expected an environment"):
        runenv.differences(None, env)


@pytest.fixture(scope="module")
def data():
    from calibrl.tasks import DEFAULT_TASK, make_dataset

    return make_dataset(DEFAULT_TASK, 16, 0)


def test_trainer_records_env_and_warns_on_resume_elsewhere(tmp_path, data, monkeypatch):
    cfg = fault_cfg(tmp_path, "r", steps=2, save_every=1)
    Trainer(cfg, policy=tiny_policy(lora=True), train_data=data)  # writes env.json and the step-0 checkpoint
    saved = json.loads((tmp_path / "r" / runenv.ENV_FILE).read_text())
    assert saved == {"created": runenv.environment(), "resumed": []}

    with warnings.catch_warnings(record=True) as seen:  # the same environment: a silent resume
        warnings.simplefilter("always")
        Trainer(cfg, policy=tiny_policy(lora=True), train_data=data, resume=True)
    assert not [w for w in seen if "another environment" in str(w.message)]
    moved = dict(runenv.environment(), cpu="another CPU kind")
    monkeypatch.setattr(runenv, "environment", lambda: moved)
    with pytest.warns(RuntimeWarning, match=r"resuming in another environment \(cpu .* -> another CPU kind\)"):
        Trainer(cfg, policy=tiny_policy(lora=True), train_data=data, resume=True)
    saved2 = json.loads((tmp_path / "r" / runenv.ENV_FILE).read_text())
    assert saved2["created"] == saved["created"] and [e["cpu"] for e in saved2["resumed"]][-1] == "another CPU kind"
    assert len(saved2["resumed"]) == 2
    (tmp_path / "r" / runenv.ENV_FILE).write_text("[]")  # not an env record: where the run started is unknown
    Trainer(cfg, policy=tiny_policy(lora=True), train_data=data, resume=True)
    saved3 = json.loads((tmp_path / "r" / runenv.ENV_FILE).read_text())
    assert saved3["created"] is None and [e["cpu"] for e in saved3["resumed"]] == ["another CPU kind"]
