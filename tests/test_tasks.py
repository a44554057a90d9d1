import json
import sys
from collections import Counter

import datasets
import pytest

from calibrl.rewards import accuracy_reward, extract_answer, format_reward
from calibrl.tasks import DEFAULT_TASK, EXTERNAL_TASKS, INSTRUCTION, TASKS, make_dataset, render, sample
from calibrl.tasks.scene import COLORS, shape_area


def _png_bytes(ds):
    return [r["bytes"] for r in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def test_registry_and_default():
    assert list(TASKS) == ["color", "biggest_color", "count", "digit_sum"]
    assert [f.level for f in TASKS.values()] == [1, 2, 3, 4]
    assert DEFAULT_TASK == "biggest_color" and DEFAULT_TASK in TASKS
    assert "rg_geometry" in EXTERNAL_TASKS and "rg_geometry" not in TASKS


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_and_prefix_stable(task):
    a, b = make_dataset(task, 6, 3), make_dataset(task, 6, 3)
    assert _png_bytes(a) == _png_bytes(b)
    for col in ("question", "answer", "solution", "meta", "id"):
        assert a[col] == b[col]
    short = make_dataset(task, 2, 3)  # example i does not depend on n
    assert _png_bytes(short) == _png_bytes(a)[:2] and short["solution"] == a["solution"][:2]
    other = make_dataset(task, 6, 4)
    assert _png_bytes(other) != _png_bytes(a) and other["meta"] != a["meta"]
    assert set(a["id"]) == {f"{task}-3-{i}" for i in range(6)}


@pytest.mark.parametrize("task", list(TASKS))
def test_columns_images_and_render_roundtrip(task):
    ds = make_dataset(task, 4, 0)
    assert set(ds.column_names) == {"image", "question", "answer", "solution", "task", "id", "meta"}
    assert isinstance(ds.features["image"], datasets.Image)
    for ex in ds:
        assert ex["image"].size == (112, 112) and ex["image"].mode == "RGB"
        assert ex["question"].endswith(INSTRUCTION) and ex["task"] == task
        assert list(ex["image"].getdata()) == list(render(json.loads(ex["meta"])).getdata())
    one = sample(task, 2, 0)
    assert one["answer"] == ds[2]["answer"] and one["solution"] == ds[2]["solution"]
    assert list(one["image"].getdata()) == list(ds[2]["image"].getdata())


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("style", ["expert", "policy"])
def test_every_solution_verifies(task, style):
    ds = make_dataset(task, 60, 11, style=style).remove_columns(["image"])
    for sol, ans in zip(ds["solution"], ds["answer"]):
        assert accuracy_reward(sol, ans) == 1.0, sol
        assert format_reward(sol) == 1.0, sol
        assert extract_answer(sol) == ans
        if TASKS[task].answers is not None:
            assert ans in TASKS[task].answers


@pytest.mark.parametrize("task", list(TASKS))
def test_expert_style_differs_from_policy_style(task):
    exp = make_dataset(task, 30, 5, style="expert").remove_columns(["image"])
    pol = make_dataset(task, 30, 5, style="policy").remove_columns(["image"])
    assert exp["answer"] == pol["answer"] and exp["question"] == pol["question"]
    for e, p in zip(exp["solution"], pol["solution"]):
        ew, pw = len(e.split()), len(p.split())
        assert 25 <= ew <= 80 and pw <= 12, (e, p)
        assert e.split("</think>")[0].count(".") >= 2  # full sentences


@pytest.mark.parametrize("task,n,tol", [("color", 400, 0.3), ("biggest_color", 400, 0.3), ("count", 400, 0.3),
                                        ("digit_sum", 950, 0.5)])
def test_answers_roughly_balanced(task, n, tol):
    counts = Counter(make_dataset(task, n, 0).remove_columns(["image"])["answer"])
    k = len(TASKS[task].answers)
    assert set(counts) == set(TASKS[task].answers)
    for a, c in counts.items():
        assert abs(c - n / k) <= tol * n / k, (a, c, n / k)


def test_biggest_color_scene_is_unambiguous_and_pixels_agree():
    for ex in make_dataset("biggest_color", 40, 2):
        shapes = json.loads(ex["meta"])["shapes"]
        assert len(shapes) == 3 and len({s["color"] for s in shapes}) == 3 and len({s["size"] for s in shapes}) == 3
        big = max(shapes, key=lambda s: s["size"])
        assert ex["answer"] == big["color"]
        assert all(shape_area(big) > shape_area(s) for s in shapes if s is not big)
        for i, s in enumerate(shapes):  # boxes inside the canvas and not overlapping
            h = s["size"] / 2
            assert 0 <= s["x"] - h and s["x"] + h <= 112 and 0 <= s["y"] - h and s["y"] + h <= 112
            for t in shapes[i + 1:]:
                assert abs(s["x"] - t["x"]) >= (s["size"] + t["size"]) / 2 or \
                    abs(s["y"] - t["y"]) >= (s["size"] + t["size"]) / 2
        pix = Counter(ex["image"].getdata())
        assert max(COLORS, key=lambda c: pix[COLORS[c]]) == ex["answer"]


def test_count_color_digit_scenes_match_answers():
    for ex in make_dataset("count", 20, 1):
        assert len(json.loads(ex["meta"])["shapes"]) == int(ex["answer"])
    for ex in make_dataset("color", 20, 1):
        (sh,) = json.loads(ex["meta"])["shapes"]
        assert sh["color"] == ex["answer"] and Counter(ex["image"].getdata())[COLORS[ex["answer"]]] > 100
    for ex in make_dataset("digit_sum", 20, 1):
        texts = json.loads(ex["meta"])["texts"]
        assert sum(int(t["text"]) for t in texts) == int(ex["answer"]) and len(texts) == 2


def test_known_solution_strings():
    ex = sample("biggest_color", 0, 0, style="policy")
    colors = ex["solution"].split("<think>")[1].split("</think>")[0].split(">")
    assert len(colors) == 3 and colors[0].strip() == ex["answer"]
    assert ex["solution"] == f"<think> {' > '.join(c.strip() for c in colors)} </think><answer> {ex['answer']} </answer>"
    assert sample("biggest_color", 0, 0)["solution"].startswith("<think> I see three shapes. From left to right: ")


@pytest.mark.parametrize("kwargs,match", [
    (dict(task="nope", n=2, seed=0), "unknown task 'nope'; known: color, biggest_color, count, digit_sum"),
    (dict(task="color", n=0, seed=0), "n: expected an int >= 1"),
    (dict(task="color", n=-3, seed=0), "n: expected an int >= 1"),
    (dict(task="color", n=2.0, seed=0), "n: expected an int >= 1"),
    (dict(task="color", n=2, seed="0"), "seed: expected an int"),
    (dict(task="color", n=2, seed=1.5), "seed: expected an int"),
    (dict(task="color", n=2, seed=True), "seed: expected an int"),
    (dict(task="color", n=2, seed=0, style="gpt4o"), "style: expected one of"),
])
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        make_dataset(**kwargs)


def test_sample_bad_index_and_render_bad_scene():
    with pytest.raises(ValueError, match="index: expected an int >= 0"):
        sample("color", -1, 0)
    with pytest.raises(ValueError, match="unknown task"):
        sample("Color", 0, 0)
    with pytest.raises(ValueError, match="scene.shapes: unknown color 'purple'"):
        render({"size": 112, "shapes": [{"kind": "circle", "color": "purple", "size": 20, "x": 50, "y": 50}]})
    with pytest.raises(ValueError, match="scene: expected a dict"):
        render("scene")


def test_rg_geometry_without_reasoning_gym_names_the_dependency(monkeypatch):
    from calibrl.tasks import rg_geometry

    rg_geometry._dataset.cache_clear()
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    monkeypatch.setitem(sys.modules, "reasoning_gym.geometry", None)
    monkeypatch.setitem(sys.modules, "reasoning_gym.geometry.advanced_geometry", None)
    with pytest.raises(ImportError, match="optional dependency reasoning-gym"):
        make_dataset("rg_geometry", 2, 0)
    rg_geometry._dataset.cache_clear()
