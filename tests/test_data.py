import os

import datasets
import pytest
from PIL import Image

from calibrl.data import build_messages, check_image, from_hub_format, load_dataset, save_dataset
from calibrl.rewards import accuracy_reward
from calibrl.tasks import INSTRUCTION, make_dataset


def _img(w=64, h=48, mode="RGB", color=(10, 200, 30)):
    return Image.new(mode, (w, h), color if mode in ("RGB", "RGBA") else 128)


def test_build_messages_shape():
    msgs = build_messages("What is it?")
    assert msgs == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    for bad in ("", "   ", None, 3):
        with pytest.raises(ValueError, match="question: expected a non-empty str"):
            build_messages(bad)


@pytest.mark.parametrize("fmt,name", [("disk", "ds"), ("parquet", "ds.parquet")])
def test_save_load_roundtrip_keeps_pixels_and_features(tmp_path, fmt, name):
    ds = make_dataset("biggest_color", 5, 1)
    out = save_dataset(ds, tmp_path / "sub" / name, format=fmt)
    back = load_dataset(out)
    assert isinstance(back.features["image"], datasets.Image)
    assert back["solution"] == ds["solution"] and back["answer"] == ds["answer"] and back["meta"] == ds["meta"]
    assert [list(e["image"].getdata()) for e in back] == [list(e["image"].getdata()) for e in ds]


def test_save_load_bad_inputs(tmp_path):
    ds = make_dataset("color", 2, 0)
    with pytest.raises(ValueError, match="format: expected 'disk' or 'parquet'"):
        save_dataset(ds, tmp_path / "x", format="csv")
    with pytest.raises(ValueError, match="ds: expected a datasets.Dataset"):
        save_dataset(ds.to_list(), tmp_path / "x")
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a save_to_disk folder or a .parquet file"):
        load_dataset(tmp_path / "x.csv")


def _hub_like(tmp_path):
    """A dataset in the usual hub shape (images list, problem, int answer, list/dict solution), saved and reloaded."""
    feats = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                               "answer": datasets.Value("int64"),
                               "solution": datasets.List(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({
        "images": [[_img(64, 48)], [_img(40, 40, "L"), _img()], [_img(30, 90, "RGBA")]],
        "problem": ["<image>How many?", "What is x?", "Pick one. Answer in <answer> </answer>."],
        "answer": [3, 12, 7],
        "solution": [["<think>a</think><answer>3</answer>", "other"], ["<think>b</think><answer>12</answer>"],
                     ["<think>c</think><answer>7</answer>"]],
    }, features=feats)
    ds.save_to_disk(str(tmp_path / "hub"))
    return datasets.load_from_disk(str(tmp_path / "hub"))


def test_from_hub_format_maps_columns(tmp_path):
    out = from_hub_format(_hub_like(tmp_path))
    assert out.column_names == ["image", "question", "answer", "solution"]
    assert out["answer"] == ["3", "12", "7"]
    assert out["question"][0] == f"How many? {INSTRUCTION}"          # <image> placeholder removed, instruction added
    assert out["question"][2] == "Pick one. Answer in <answer> </answer>."  # already has an instruction
    assert out["solution"][0] == "<think>a</think><answer>3</answer>"      # list -> first element
    assert [e["image"].mode for e in out] == ["RGB"] * 3
    assert [e["image"].size for e in out] == [(64, 48), (40, 40), (30, 90)]  # first image of a list
    assert out[0]["image"].getpixel((0, 0)) == (10, 200, 30)
    assert out[1]["image"].getpixel((0, 0)) == (128, 128, 128)
    assert all(accuracy_reward(s, a) == 1.0 for s, a in zip(out["solution"], out["answer"]))


def test_from_hub_format_dict_solution_and_single_image():
    ds = datasets.Dataset.from_list([
        {"image": _img(), "question": "Q1", "answer": "red", "solution": {"role": "assistant", "content": "S1"}},
    ])
    out = from_hub_format(ds, require_solution=True, add_instruction=False)
    assert out[0]["solution"] == "S1" and out[0]["question"] == "Q1" and out[0]["answer"] == "red"
    no_sol = from_hub_format(ds.remove_columns(["solution"]))
    assert no_sol.column_names == ["image", "question", "answer"]


@pytest.mark.parametrize("drop,needle", [("image", "image (or images)"), ("question", "question (or problem)"),
                                         ("answer", "answer"), ("solution", "solution")])
def test_from_hub_format_missing_column_is_named(drop, needle):
    ds = datasets.Dataset.from_list([{"image": _img(), "question": "Q", "answer": "1", "solution": "S"}])
    with pytest.raises(ValueError, match=rf"missing column\(s\) {needle.replace('(', '.').replace(')', '.')}"):
        from_hub_format(ds.remove_columns([drop]), require_solution=True)


@pytest.mark.parametrize("size,needle", [((20, 64), "sides in \\[28, 4096\\] px, got 20x64"),
                                         ((4100, 64), "got 4100x64")])
def test_from_hub_format_rejects_bad_images_naming_the_row(size, needle):
    ds = datasets.Dataset.from_list([{"image": _img(), "question": "Q", "answer": "1"},
                                     {"image": _img(*size), "question": "Q", "answer": "1"}])
    with pytest.raises(ValueError, match=f"image \\(row 1\\): expected {needle}" if "sides" in needle else needle):
        from_hub_format(ds)


def test_check_image_modes_and_errors():
    assert check_image(_img(mode="L")).mode == "RGB"
    assert check_image(_img(mode="RGBA")).mode == "RGB"
    p = _img().convert("P")
    assert check_image(p).mode == "RGB"
    with pytest.raises(ValueError, match="image \\(row 5\\): expected a PIL image, got str"):
        check_image("x.png", 5)
    with pytest.raises(ValueError, match="image \\(row 3\\): expected aspect ratio <= 200, got 10x2100"):
        check_image(_img(10, 2100), 3)
    assert check_image(_img(28, 4096)).size == (28, 4096)  # both limits inclusive


def test_from_hub_format_bad_rows():
    ds = datasets.Dataset.from_list([{"image": _img(), "question": " ", "answer": "1"}])
    with pytest.raises(ValueError, match="question \\(row 0\\): expected a non-empty str"):
        from_hub_format(ds)
    ds = datasets.Dataset.from_list([{"image": _img(), "question": "Q", "answer": ""}])
    with pytest.raises(ValueError, match="answer \\(row 0\\)"):
        from_hub_format(ds)
    with pytest.raises(ValueError, match="ds: expected a datasets.Dataset"):
        from_hub_format([{"image": _img()}])


def test_nothing_written_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    make_dataset("count", 3, 0)
    save_dataset(make_dataset("count", 3, 0), tmp_path / "c.parquet", format="parquet")
    load_dataset(tmp_path / "c.parquet")
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")
