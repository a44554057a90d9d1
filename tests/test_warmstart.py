"""calibrl.warmstart: SFT batch labelling, warm-up schedule, and a smoke build into tmp_path (files, size, loss
went down, the result loads through load_policy)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from calibrl import tasks
from calibrl import warmstart as ws

torch.set_num_threads(1)


def _args(*argv):
    p = argparse.ArgumentParser()
    ws.add_arguments(p)
    return p.parse_args(list(argv))


def test_lr_warmup_factor():
    assert [ws._lr_factor(s, 4) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert ws._lr_factor(1, 0) == 1.0


def test_sft_batch_labels_only_the_completion():
    from calibrl.tiny import build_processor

    proc = build_processor()
    data = tasks.make_dataset(tasks.DEFAULT_TASK, 3, 11, style="policy")
    exs = [data[i] for i in range(3)]
    enc = ws.sft_batch(proc, exs)
    tok = proc.tokenizer
    for r, e in enumerate(exs):
        lab = enc["labels"][r]
        kept = lab[lab != -100].tolist()
        assert tok.decode(kept) == e["solution"] + "<|im_end|>"
        n = len(kept)
        assert (lab[:-n] == -100).all() and torch.equal(lab[-n:], enc["input_ids"][r, -n:])
    assert enc["labels"].shape == enc["input_ids"].shape == enc["mm_token_type_ids"].shape


def test_out_is_required_for_smoke_and_existing_out_is_protected(tmp_path, capsys):
    with pytest.raises(SystemExit):  # --out is required: build-tiny never writes into the installed package
        _args("--budget", "smoke")
    assert "--out" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        ws.run(_args("--budget", "smoke", "--out", str(tmp_path)))
    with pytest.raises(ValueError, match="no config.json"):
        ws.run(_args("--budget", "smoke", "--out", str(tmp_path), "--overwrite", "--steps", "1"))
    assert (tmp_path / "x.txt").exists()


def test_smoke_build(tmp_path, capsys):
    from calibrl.models import load_policy

    out = tmp_path / "tiny"
    assert ws.run(_args("--budget", "smoke", "--out", str(out), "--threads", "1")) == 0
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja",
            "MODEL_CARD.md", "build.json"} <= names
    assert sum(p.stat().st_size for p in out.iterdir()) < 20 * 2**20
    rec = json.loads((out / "build.json").read_text())
    assert rec["steps_done"] == ws.BUDGETS["smoke"]["steps"] and rec["seed"] == 0
    assert rec["loss_last"] < rec["loss_first"] - 0.5, (rec["loss_first"], rec["loss_last"])
    assert all(0 <= rec["final"][k] <= 1 for k in ("accuracy", "format_rate"))
    card = (out / "MODEL_CARD.md").read_text()
    assert "How it was made" in card and "python -m calibrl eval --model tiny" in card
    pol = load_policy(str(out))
    assert hasattr(pol.processor, "image_processor") and len(pol.tokenizer) == rec["vocab"]
    with pytest.raises(ValueError, match="not empty"):  # refuses to overwrite silently
        ws.run(_args("--budget", "smoke", "--out", str(out)))


def test_mixture_counts():
    assert ws.mixture_counts(["a", "b", "c"], "b", 100) == {"a": 25, "b": 50, "c": 25}
    assert ws.mixture_counts(["b"], "b", 7) == {"b": 7}
    with pytest.raises(ValueError, match="total"):
        ws.mixture_counts(["a"], "b", 10)
