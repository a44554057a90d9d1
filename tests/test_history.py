"""Run files: names, the ownership marker, overwrite/resume rules, atomic writes, torn lines, JSON errors that name
the file and line, and checkpoints that load with weights_only=True (a crafted one never executes)."""
from __future__ import annotations

import errno
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from calibrl import runfiles
from calibrl.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from calibrl.config import TrainConfig
from calibrl.history import History, finished_step, read_jsonl, run_status
from calibrl.runfiles import MARKER_FILE, atomic_write_text, check_name, check_out, marker_kind


def _snapshot(root):
    """{relative path: bytes} of every file under root (to prove nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("bad", ["", ".", "..", "/", "/etc", "a/b", "a\\b", "../x", "x/..", " x", "x ", "a\0b",
                                 "C:x", None, 3])
def test_names_are_single_path_components(bad):
    with pytest.raises(ValueError, match="name: expected a plain directory name"):
        check_name(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError, match="name: expected a plain directory name"):
            TrainConfig.from_budget("smoke", name=bad)


@pytest.mark.parametrize("good", ["run", "grpo-s0", "compare-small", "a.b", "..x", "x..", "é-run"])
def test_plain_names_pass(good):
    assert check_name(good) == good


def test_check_out(tmp_path):
    assert check_out(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # creatable
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ValueError, match="is a file, expected a directory"):
            check_out(bad)
    assert not (tmp_path / "new").exists()  # a check writes nothing


# -------------------------------------------------------------------------------------------- create / overwrite
def test_create_writes_the_marker_first_and_config_atomically(tmp_path):
    h = History.create(tmp_path / "r", {"steps": 2, "loss": {"mode": "grpo"}})
    assert marker_kind(tmp_path / "r") == "run"
    assert json.loads((tmp_path / "r" / "config.json").read_text())["steps"] == 2
    assert (tmp_path / "r" / "history.jsonl").read_bytes() == b""
    assert not [p for p in (tmp_path / "r").iterdir() if ".tmp" in p.name]
    assert h.rows == []


def test_overwrite_only_clears_directories_calibrl_created(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        History.create(user, {})
    with pytest.raises(ValueError, match="not created by calibrl"):
        History.create(user, {}, overwrite=True)
    (user / MARKER_FILE).write_text("{not json")  # a broken or foreign marker is no marker
    with pytest.raises(ValueError, match="not created by calibrl"):
        History.create(user, {}, overwrite=True)
    (user / MARKER_FILE).write_text(json.dumps({"kind": "comparison"}))  # wrong kind
    with pytest.raises(ValueError, match="not created by calibrl"):
        History.create(user, {}, overwrite=True)
    (user / MARKER_FILE).unlink()
    assert _snapshot(tmp_path) == before


def test_overwrite_clears_a_marked_run_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    h = History.create(tmp_path / "run", {"steps": 1})
    h.append({"step": 1, "x": 1.0})
    (tmp_path / "run" / "link").symlink_to(outside, target_is_directory=True)
    (tmp_path / "run" / "sub").mkdir()
    (tmp_path / "run" / "sub" / "link2").symlink_to(outside / "keep.txt")
    h2 = History.create(tmp_path / "run", {"steps": 5}, overwrite=True)
    assert h2.rows == [] and History.load(tmp_path / "run").config["steps"] == 5
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [MARKER_FILE, "config.json", "history.jsonl"]
    assert (outside / "keep.txt").read_text() == "keep"
    # a run directory that is itself a link is refused, whatever it points at
    (tmp_path / "alias").symlink_to(tmp_path / "run", target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        History.create(tmp_path / "alias", {}, overwrite=True)
    assert (tmp_path / "run" / "config.json").exists()


def test_compare_overwrite_never_deletes_foreign_directories(tmp_path, monkeypatch, capsys):
    import calibrl.models
    from calibrl.cli import main

    monkeypatch.setattr(calibrl.models, "load_policy", lambda *a, **k: pytest.fail("model loaded"))
    victim = tmp_path / "cmp"
    victim.mkdir()
    (victim / "notes.md").write_text("mine")
    (tmp_path / "sibling.txt").write_text("mine too")
    before = _snapshot(tmp_path)
    for args in (["--name", "cmp", "--overwrite"], ["--name", "..", "--overwrite"],
                 ["--name", str(tmp_path), "--overwrite"], ["--name", "/", "--overwrite"]):
        assert main(["compare", "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("not created by" in err or "plain directory name" in err), err
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------- resume
def test_resume_needs_an_existing_run_and_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no run to resume"):
        History.create(tmp_path / "never", {}, resume=True)
    assert not (tmp_path / "never").exists()
    h = History.create(tmp_path / "r", {"steps": 3})
    h.append({"step": 1, "a": 1})
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"no checkpoint .*1 history rows.*save_every.*--overwrite"):
        History.create(tmp_path / "r", {}, resume=True)
    assert _snapshot(tmp_path) == before  # never truncated


def _run_with_rows(tmp_path, steps, torn=b"", samples=True):
    h = History.create(tmp_path / "r", {"steps": 9})
    for s in steps:
        h.append({"step": s, "v": s / 10})
        if samples:
            h.append_samples([{"step": s, "tokens": ["a"]}])
    if torn:
        with open(tmp_path / "r" / "history.jsonl", "ab") as f:
            f.write(torn)
    return History.load(tmp_path / "r")


def test_torn_last_line_is_dropped_with_a_warning_and_the_file_stays_appendable(tmp_path):
    h = _run_with_rows(tmp_path, [1, 2], torn=b'{"step": 3, "v": 0.')
    assert [r["step"] for r in h.rows] == [1, 2]  # readers skip it
    with pytest.warns(RuntimeWarning, match="torn last line"):
        h.resume_at(2)
    h.append({"step": 3, "v": 0.3})
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "history.jsonl")] == [1, 2, 3]
    # a torn multi-byte character is torn too
    with open(tmp_path / "r" / "history.jsonl", "ab") as f:
        f.write('{"step": 4, "s": "é'.encode()[:-1])
    with pytest.warns(RuntimeWarning, match="torn"):
        History.load(tmp_path / "r").resume_at(3)


def test_rows_after_the_checkpoint_are_moved_not_deleted(tmp_path):
    h = _run_with_rows(tmp_path, [1, 2, 3, 4])
    with pytest.warns(RuntimeWarning, match="moved to history.replayed.jsonl"):
        h.resume_at(2)
    assert [r["step"] for r in h.rows] == [1, 2]
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "history.jsonl")] == [1, 2]
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "history.replayed.jsonl")] == [3, 4]
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "samples.replayed.jsonl")] == [3, 4]


def test_a_history_with_a_gap_is_refused_untouched(tmp_path):
    h = _run_with_rows(tmp_path, [1, 3])
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"should hold steps 1..3"):
        h.resume_at(3)
    assert _snapshot(tmp_path) == before


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    h = _run_with_rows(tmp_path, [1], torn=b'{"step": 2, "v": 0.2}', samples=False)
    assert [r["step"] for r in h.rows] == [1, 2]
    h.resume_at(2)
    h.append({"step": 3})
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "history.jsonl")] == [1, 2, 3]


# -------------------------------------------------------------------------------------------------- JSON errors
def test_corrupt_json_errors_name_the_file_and_line(tmp_path):
    h = _run_with_rows(tmp_path, [1, 2], samples=False)
    path = tmp_path / "r" / "history.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: not a valid JSON line"):
        History.load(h.run_dir)
    path.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: expected a JSON object"):
        History.load(h.run_dir)
    path.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "r" / "config.json"
    cfg.write_text('{\n  "steps": 3,\n  "lr": ,\n}\n')
    with pytest.raises(ValueError, match=rf"^{cfg}:3:\d+: invalid JSON"):
        History.load(h.run_dir)
    cfg.write_text("[1]")
    with pytest.raises(ValueError, match=rf"{cfg}:1: expected a JSON object"):
        History.load(h.run_dir)


# ----------------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")

    def full(f, data):
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfiles, "_write_all", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new content")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# -------------------------------------------------------------------------------------------------- checkpoints
def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_restores_weights_optimizer_and_every_rng(tmp_path):
    model, opt = _model_and_opt()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    save_checkpoint(tmp_path, 3, model, opt)
    expect = (torch.rand(3), random.random(), np.random.rand(2))
    state = torch.load(checkpoint_path(tmp_path), weights_only=True)  # plain data only
    assert state["step"] == 3 and "1.bias" not in state["trainable"]
    other, other_opt = _model_and_opt(seed=1)
    assert load_checkpoint(tmp_path, other, other_opt) == 3
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1]
    assert np.array_equal(np.random.rand(2), expect[2])
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.sentinel}",))


def test_a_crafted_checkpoint_never_executes(tmp_path):
    _Evil.sentinel = tmp_path / "pwned"
    path = checkpoint_path(tmp_path / "run")
    path.parent.mkdir(parents=True)
    torch.save({"step": 1, "trainable": {}, "payload": _Evil()}, path)
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match=r"cannot be read safely.*untouched"):
        load_checkpoint(tmp_path / "run", model, opt)
    with open(path, "wb") as f:  # a bare pickle, not even a torch zip
        pickle.dump(_Evil(), f)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "run", model, opt)
    assert not _Evil.sentinel.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong-keys", "wrong-shape"])
def test_a_corrupt_checkpoint_is_a_clear_error_that_changes_nothing(tmp_path, damage):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, 2, model, opt)
    path = checkpoint_path(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong-keys":
        torch.save({"step": 2}, path)
    else:
        bad = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
        save_checkpoint(tmp_path, 2, bad, torch.optim.AdamW(bad.parameters()))
    other, other_opt = _model_and_opt(seed=1)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    saved = path.read_bytes()
    with pytest.raises(ValueError, match=rf"checkpoint: {path}"):
        load_checkpoint(tmp_path, other, other_opt)
    assert path.read_bytes() == saved
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())


# ----------------------------------------------------------------------------------------------------- run status
def test_run_status_tells_finished_from_interrupted(tmp_path):
    assert run_status(tmp_path / "nope") == "absent"
    h = History.create(tmp_path / "r", {"steps": 2})
    assert run_status(tmp_path / "r") == "stale"
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path / "r", 1, model, opt)
    assert run_status(tmp_path / "r") == "resumable" and finished_step(tmp_path / "r") is None
    h.mark_done(2)
    assert finished_step(tmp_path / "r") == 2
    assert run_status(tmp_path / "r") == "finished" and run_status(tmp_path / "r", steps=4) == "resumable"
