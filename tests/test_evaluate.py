"""calibrl.evaluate: scoring numbers on scripted completions, the eval command's JSONL schema, and bad inputs
(unknown model, unknown task, odd image modes and sizes)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from calibrl import tasks
from calibrl import evaluate as ev

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from calibrl.tiny import build_tiny_random

    d = tmp_path_factory.mktemp("tiny")
    model, proc = build_tiny_random(0)
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


def _args(*argv):
    p = argparse.ArgumentParser()
    ev.add_arguments(p)
    return p.parse_args(list(argv))


# ------------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_check_image_converts_any_mode_to_rgb(mode):
    im = Image.new(mode, (30, 20))
    out = ev.check_image(im)
    assert out.mode == "RGB" and out.size == (30, 20)


def test_check_image_values():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    assert ev.check_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (2, 1))
    deep.putpixel((0, 0), 0)
    deep.putpixel((1, 0), 4000)
    rgb = ev.check_image(deep)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_check_image_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"image\[3\].*aspect"):
        ev.check_image(Image.new("RGB", (1000, 4)), 3)
    with pytest.raises(ValueError, match="PIL image"):
        ev.check_image("not an image")
    with pytest.raises(ValueError, match="non-empty"):
        ev.check_image(Image.new("RGB", (0, 5)))


# ------------------------------------------------------------------------------------------------------ scoring
def test_evaluate_scores_scripted_completions(monkeypatch):
    data = tasks.make_dataset(tasks.DEFAULT_TASK, 3, 5)
    gold = [str(a) for a in data["answer"]]
    script = {  # prompt -> its 2 samples
        0: [f"<think> x </think><answer> {gold[0]} </answer>", "<think> x </think><answer> qqq </answer>"],
        1: [f"<answer> {gold[1]} </answer>", f"<answer> {gold[1]} </answer>"],   # right answer, bad format
        2: ["no tags at all", "<think> x </think><answer> qqq </answer>"],
    }
    order = [s for pid in range(3) for s in script[pid]]  # evaluate walks prompts in order, samples inside

    def fake(policy, images, questions, *, temperature, max_new_tokens, n_samples, top_p, sampler):
        assert temperature == 1.0 and len(images) == len(questions) and len(questions) * n_samples <= 4
        return [order.pop(0) for _ in range(len(questions) * n_samples)]

    monkeypatch.setattr(ev, "generate_completions", fake)
    res = ev.evaluate(object(), data, temperature=1.0, n_samples=2, batch_size=4, return_rows=True)
    assert res["accuracy"] == pytest.approx(3 / 6)
    assert res["format_rate"] == pytest.approx(3 / 6)
    assert res["pass_at_k"] == pytest.approx(2 / 3)
    assert res["reward_mean"] == pytest.approx((3 + 0.1 * 3) / 6)
    assert [r["prompt_id"] for r in res["rows"]] == [0, 0, 1, 1, 2, 2]
    assert [r["correct"] for r in res["rows"]] == [True, False, True, True, False, False]
    assert res["rows"][4]["pred"] is None


def test_evaluate_validates_arguments():
    data = tasks.make_dataset(tasks.DEFAULT_TASK, 2, 5)
    with pytest.raises(ValueError, match="n_samples"):
        ev.evaluate(object(), data, temperature=0.0, n_samples=2)
    with pytest.raises(ValueError, match="temperature"):
        ev.evaluate(object(), data, temperature=float("nan"))
    with pytest.raises(ValueError, match="answer"):
        ev.evaluate(object(), data.remove_columns(["answer"]), temperature=1.0)


# ---------------------------------------------------------------------------------------------- the real model
def test_generate_completions_with_odd_images(tiny_dir):
    from calibrl.models import load_policy

    pol = load_policy(str(tiny_dir))
    imgs = [Image.new("RGBA", (1000, 30)), Image.new("P", (9, 9)), Image.new("I;16", (64, 48))]
    torch.manual_seed(0)
    outs = ev.generate_completions(pol, imgs, ["What is the colour?"] * 3, temperature=0.0, max_new_tokens=6)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    again = ev.generate_completions(pol, imgs, ["What is the colour?"] * 3, temperature=0.0, max_new_tokens=6)
    assert again == outs  # greedy is deterministic
    with pytest.raises(ValueError, match=r"image\[1\]"):
        ev.generate_completions(pol, [imgs[0], Image.new("RGB", (2, 900))], ["q", "q"], temperature=1.0,
                                max_new_tokens=2)


def test_eval_command_writes_jsonl(tiny_dir, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    rc = ev.run(_args("--model", str(tiny_dir), "--n", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8",
                      "--out", str(out), "--seed", "7"))
    assert rc == 0
    assert "accuracy=" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    data = tasks.make_dataset(tasks.DEFAULT_TASK, 2, 7)
    assert len(rows) == 4
    for r in rows:
        assert set(r) == {"question", "answer", "completion", "pred", "correct", "prompt_id"}
        assert isinstance(r["completion"], str) and isinstance(r["correct"], bool)
        assert r["pred"] is None or isinstance(r["pred"], str)
        assert r["question"] == data[r["prompt_id"]]["question"] and r["answer"] == str(data[r["prompt_id"]]["answer"])
    assert [r["prompt_id"] for r in rows] == [0, 0, 1, 1]


def test_eval_command_bad_inputs(tiny_dir, capsys):
    from calibrl.cli import main

    assert main(["eval", "--model", "no-such-model", "--n", "1"]) == 2
    assert '"tiny"' in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--task", "no-such-task", "--n", "1"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--n", "0"]) == 2
    assert "--n" in capsys.readouterr().err