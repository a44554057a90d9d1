"""Fault tests on real training runs (tiny model, CPU): kill -9 at a random moment and at chosen points (mid history
line, between the history row and the checkpoint, mid checkpoint), a corrupt checkpoint, and a full disk. After each,
`resume=True` must continue bit-identically to an uninterrupted run, and no existing file may be lost or corrupted.

The random kill point is drawn from CALIBRL_FAULT_SEED when set, else from os.urandom (the seed is in the failure
message, so a failure can be replayed)."""
from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_rollout import tiny_policy  # noqa: E402

from calibrl import runfiles  # noqa: E402
from calibrl.config import TrainConfig  # noqa: E402
from calibrl.history import History, finished_step, read_jsonl  # noqa: E402
from calibrl.trainer import Trainer, train  # noqa: E402

STEPS = 4


def fault_cfg(out, name, **kw):
    base = dict(mode="calibrl", steps=STEPS, prompts_per_step=2, group_size=3, max_new_tokens=8, minibatches=2,
                eval_every=0, samples_per_step=1, out=str(out), name=name, threads=1,
                entropy_coef=0.0, lr=1e-2, kl_every=0, grad_split_every=0)
    base.update(kw)
    return TrainConfig.from_budget("smoke", **base)


@pytest.fixture(scope="module")
def data():
    from calibrl.tasks import DEFAULT_TASK, make_dataset

    return make_dataset(DEFAULT_TASK, 16, 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """An uninterrupted run: its rows (without the phase timings *_s), samples and final trainable weights."""
    out = tmp_path_factory.mktemp("ref")
    policy = tiny_policy(lora=True)
    hist = train(fault_cfg(out, "straight"), policy=policy, train_data=data)
    assert finished_step(out / "straight") == STEPS
    return _rows(hist.rows), History.load(out / "straight").samples(), _trainable(policy)


def _rows(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # timings vary


def _trainable(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def _resume_and_check(out, name, data, reference):
    policy = tiny_policy(lora=True)
    hist = Trainer(fault_cfg(out, name), policy=policy, train_data=data, resume=True).run()
    rows, samples, weights = reference
    assert _rows(hist.rows) == rows
    assert _rows(History.load(out / name).rows) == rows
    assert History.load(out / name).samples() == samples
    final = _trainable(policy)
    assert all(torch.equal(final[n], weights[n]) for n in weights)
    assert finished_step(out / name) == STEPS


def _fork_train(out, name, data, patch=None) -> int:
    """Train in a forked child (patched by `patch()` first); returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            if patch is not None:
                patch()
            train(fault_cfg(out, name), policy=tiny_policy(lora=True), train_data=data)
            code = 0
        finally:
            os._exit(code)
    return pid


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_kill9_at_a_random_moment_then_resume_is_bit_identical(tmp_path, data, reference):
    seed = int(os.environ.get("CALIBRL_FAULT_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(seed)
    after_rows, delay = rng.randrange(STEPS), rng.uniform(0.0, 1.5)
    pid = _fork_train(tmp_path, "killed", data)
    hist, ckpt = tmp_path / "killed" / "history.jsonl", tmp_path / "killed" / "checkpoint" / "state.pt"
    t0 = time.time()
    while not (ckpt.exists() and len(read_jsonl(hist)) >= after_rows):
        assert time.time() - t0 < 300, f"child made no progress (CALIBRL_FAULT_SEED={seed})"
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            pytest.fail(f"child ended early (CALIBRL_FAULT_SEED={seed})")
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    try:
        with _any_warnings():
            _resume_and_check(tmp_path, "killed", data, reference)
    except AssertionError as err:
        raise AssertionError(f"CALIBRL_FAULT_SEED={seed} (killed after {after_rows} rows + {delay:.2f} s): {err}")


class _any_warnings:
    """A context that records warnings (a torn line or replayed rows are expected) without requiring any."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.list = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self.list

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _kill_mid_history_line(step):
    real = runfiles._write_all

    def write(f, data):
        if f.name.endswith("history.jsonl") and data.startswith(b'{"step": %d,' % step):
            real(f, data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()
        real(f, data)

    runfiles._write_all = write


def _kill_before_checkpoint(step):
    import calibrl.trainer as tr

    real = tr.save_checkpoint

    def save(run_dir, s, model, opt):
        if s == step:
            _die()
        return real(run_dir, s, model, opt)

    tr.save_checkpoint = save


def _kill_mid_checkpoint(step):
    import calibrl.trainer as tr

    real_save, real_write = tr.save_checkpoint, runfiles._write_all
    current = {}

    def save(run_dir, s, model, opt):
        current["step"] = s
        return real_save(run_dir, s, model, opt)

    def write(f, data):
        if "checkpoint" in f.name and current.get("step") == step:
            real_write(f, data[: len(data) // 3])
            f.flush()
            _die()
        real_write(f, data)

    tr.save_checkpoint, runfiles._write_all = save, write


@pytest.mark.parametrize("where,expect", [
    ("mid-history-line", "torn last line"),
    ("before-checkpoint", "moved to history.replayed.jsonl"),
    ("mid-checkpoint", "moved to history.replayed.jsonl"),
    ("step-0-checkpoint", None),
])
def test_kill9_at_chosen_points_then_resume_is_bit_identical(tmp_path, data, reference, where, expect):
    step = {"step-0-checkpoint": 0}.get(where, 2)
    patch = {"mid-history-line": _kill_mid_history_line, "before-checkpoint": _kill_before_checkpoint,
             "mid-checkpoint": _kill_mid_checkpoint, "step-0-checkpoint": _kill_mid_checkpoint}[where]
    pid = _fork_train(tmp_path, "killed", data, patch=lambda: patch(step))
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child was not killed"
    run = tmp_path / "killed"
    assert not list((run / "checkpoint").glob("state.pt")) or where != "step-0-checkpoint"
    if where == "step-0-checkpoint":  # killed while writing the very first checkpoint: nothing to resume from
        with pytest.raises(ValueError, match="no checkpoint .*0 history rows.*--overwrite"):
            Trainer(fault_cfg(tmp_path, "killed"), policy=tiny_policy(lora=True), train_data=data, resume=True)
        assert (run / "config.json").exists()
        return
    replayed_before = len(read_jsonl(run / "history.jsonl"))
    with pytest.warns(RuntimeWarning, match=expect):
        _resume_and_check(tmp_path, "killed", data, reference)
    if expect.startswith("moved"):  # the row finished after the checkpoint was kept, and replayed identically
        kept = read_jsonl(run / "history.replayed.jsonl")
        assert _rows(kept) == reference[0][replayed_before - 1: replayed_before]


def test_corrupt_checkpoint_is_a_clear_error_and_loses_nothing(tmp_path, data, reference):
    train(fault_cfg(tmp_path, "r", steps=2), policy=tiny_policy(lora=True), train_data=data)
    ckpt = tmp_path / "r" / "checkpoint" / "state.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=rf"checkpoint: {ckpt} cannot be read safely.*untouched"):
        Trainer(fault_cfg(tmp_path, "r"), policy=tiny_policy(lora=True), train_data=data, resume=True)
    assert {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()} == before


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def _fill(path: Path) -> None:
    """Fill the file system of `path` until ENOSPC."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
        try:
            os.fsync(f.fileno())
        except OSError:
            pass


def test_disk_full_never_corrupts_existing_files_and_resume_finishes(tmp_path, data, reference, monkeypatch):
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "64m")
    try:
        filler = disk / "filler"
        real = runfiles._write_all
        full = {"on": False}

        def after_step(row):
            if row["step"] == 2:
                if mounted:
                    _fill(filler)  # a real full disk
                full["on"] = True

        def simulated(f, data_):  # a simulated one: half a write, then ENOSPC
            if full["on"]:
                real(f, data_[: len(data_) // 2])
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            real(f, data_)

        if not mounted:
            monkeypatch.setattr(runfiles, "_write_all", simulated)
        snap = {}

        def on_step(row):
            after_step(row)
            if row["step"] == 2:
                snap.update({p.name: p.read_bytes() for p in (disk / "r").iterdir() if p.is_file()})

        with pytest.raises(OSError) as err:
            train(fault_cfg(disk, "r"), policy=tiny_policy(lora=True), train_data=data, on_step=on_step)
        assert err.value.errno == errno.ENOSPC
        run = disk / "r"
        assert (run / "config.json").read_bytes() == snap["config.json"]
        assert [r["step"] for r in History.load(run).rows][:2] == [1, 2]
        assert History.load(run).rows[:2] == [r for r in read_jsonl(run / "history.jsonl")][:2]
        assert not [p for p in run.rglob("*.tmp-*")]  # no temporary file left behind
        full["on"] = False
        if mounted:
            filler.unlink()
        monkeypatch.setattr(runfiles, "_write_all", real)
        with _any_warnings():
            _resume_and_check(disk, "r", data, reference)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    print(f"disk full: {'tmpfs 64m' if mounted else 'simulated ENOSPC'}")
