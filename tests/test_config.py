"""Config and CLI inputs: typed fields (a bool is never a number, nor the reverse), `--set` parsed by the field's
type, one-line errors naming the field and the expected type, and the output directory checked before any model
loads."""
from __future__ import annotations

import dataclasses

import pytest

from calibrl._fields import field_types
from calibrl.cli import main
from calibrl.config import LossConfig, TrainConfig, config_keys, parse_value

NUMERIC = sorted(n for cls in (TrainConfig, LossConfig) for n, (t, _) in field_types(cls).items() if t in (int, float))
BOOLS = sorted(n for cls in (TrainConfig, LossConfig) for n, (t, _) in field_types(cls).items() if t is bool)
STRINGS = sorted(n for cls in (TrainConfig, LossConfig) for n, (t, _) in field_types(cls).items() if t is str)


def test_the_typed_fields_are_found():
    assert {"lr", "top_p", "slope", "guide_coef", "steps", "seed", "clip_c", "threads"} <= set(NUMERIC)
    assert "recompute_old_logp" in BOOLS and {"mode", "agg", "model", "out"} <= set(STRINGS)


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("bad", [True, False])
def test_bools_are_not_numbers(name, bad):
    with pytest.raises(ValueError, match=rf"^{name}: expected (an integer|a number)"):
        TrainConfig.from_budget("smoke", **{name: bad})


@pytest.mark.parametrize("name", NUMERIC)
def test_strings_are_not_numbers(name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        TrainConfig.from_budget("smoke", **{name: "3"})


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("bad", [1, 0, "no", "true", None])
def test_numbers_and_strings_are_not_bools(name, bad):
    types = {**field_types(TrainConfig), **field_types(LossConfig)}
    if bad is None and types[name][1]:
        pytest.skip(f"{name} is an optional bool: None means auto")
    with pytest.raises(ValueError, match=rf"^{name}: expected true or false"):
        TrainConfig.from_budget("smoke", **{name: bad})


@pytest.mark.parametrize("name", STRINGS)
def test_numbers_are_not_strings(name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        TrainConfig.from_budget("smoke", **{name: 3})


def test_ints_still_count_as_floats():
    cfg = TrainConfig.from_budget("smoke", lr=1, top_p=1, slope=0)
    assert cfg.lr == 1 and cfg.loss.slope == 0


@pytest.mark.parametrize("key,text,value", [
    ("recompute_old_logp", "no", False), ("recompute_old_logp", "false", False), ("recompute_old_logp", "0", False),
    ("recompute_old_logp", "off", False), ("recompute_old_logp", "yes", True), ("recompute_old_logp", "True", True),
    ("recompute_old_logp", "1", True), ("lr", "5e-4", 5e-4), ("lr", "1", 1.0), ("steps", "7", 7),
    ("clip_c", "null", None), ("clip_c", "None", None), ("clip_c", "10", 10.0), ("agg", "token-mean", "token-mean"),
    ("agg", '"token-mean"', "token-mean"), ("threads", "none", None), ("task", "count", "count"),
])
def test_set_values_are_parsed_by_the_field_type(key, text, value):
    got = parse_value(key, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("key,text,want", [
    ("recompute_old_logp", "maybe", "true or false"), ("recompute_old_logp", "2", "true or false"),
    ("lr", "abc", "a number"), ("lr", "true", "a number"), ("lr", "", "a number"), ("lr", "٣", "a number"),
    ("steps", "3.5", "an integer"), ("steps", "true", "an integer"), ("steps", "٣", "an integer"),
    ("steps", "1e3", "an integer"), ("seed", "null", "an integer"), ("agg", "", "a string"),
    ("clip_c", "x", "a number or None"),
])
def test_wrong_set_types_name_the_field_and_the_type(key, text, want):
    with pytest.raises(ValueError) as err:
        parse_value(key, text)
    msg = str(err.value)
    assert msg.startswith(f"--set {key}: expected {want}") and "\n" not in msg


def test_unknown_keys_are_answered_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"--set lrr: unknown key \(did you mean 'lr'\?\); valid keys: .*guide_coef"):
        parse_value("lrr", "1")
    with pytest.raises(ValueError, match=r"lrr: unknown TrainConfig field.*valid: .*lr"):
        TrainConfig.from_budget("smoke", lrr=1)
    d = TrainConfig.from_budget("smoke").to_dict()
    with pytest.raises(ValueError, match=r"^stepz: unknown TrainConfig field \(did you mean 'steps'\?\)"):
        TrainConfig.from_dict({**d, "stepz": 3})
    d["loss"]["slopee"] = 0.1
    with pytest.raises(ValueError, match=r"^loss\.slopee: unknown LossConfig field"):
        TrainConfig.from_dict(d)
    assert set(config_keys()) == ({f.name for f in dataclasses.fields(TrainConfig)} - {"loss"}
                                  | {f.name for f in dataclasses.fields(LossConfig)})


def test_from_dict_round_trip():
    cfg = TrainConfig.from_budget("small", mode="grpo", lr=1e-3, recompute_old_logp=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything tries to load a model (every check below must come first)."""
    import calibrl.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(calibrl.models, "load_policy", boom)


CLI_BAD = [
    (["--set", "lr=abc"], "--set lr: expected a number"),
    (["--set", "recompute_old_logp=maybe"], "--set recompute_old_logp: expected true or false"),
    (["--set", "steps=2.5"], "--set steps: expected an integer"),
    (["--set", "lrr=1"], "--set lrr: unknown key (did you mean 'lr'?)"),
    (["--set", "task=count"], "--set task: set it with --task"),
    (["--set", "model=x"], "--set model: set it with --model"),
    (["--set", "budget=full"], "--set budget: set it with --budget"),
    (["--set", "mode=grpo"], "--set mode: set it with --modes"),
    (["--set", "loss=x"], "--set loss: set it with --modes"),
    (["--set", "lr"], "--set: expected KEY=VALUE"),
    (["--set", "slope=2"], "slope: expected a value in [0, 1]"),
    (["--set", "top_p=true"], "--set top_p: expected a number"),
    (["--task", "nope"], "task: unknown task 'nope'"),
    (["--name", ".."], "name: expected a plain directory name"),
    (["--name", "a/b"], "name: expected a plain directory name"),
    (["--name", "/etc"], "name: expected a plain directory name"),
    (["--name", "a\\b"], "name: expected a plain directory name"),
    (["--seeds", "0,x"], "seeds: expected comma-separated int values"),
    (["--modes", "grpo,ppo"], "modes: unknown mode 'ppo'"),
    (["--resume"], "resume:"),
]


@pytest.mark.parametrize("args,msg", CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_bad_inputs_are_one_line_errors_before_any_model_loads(tmp_path, capsys, no_model, args, msg):
    (tmp_path / "keep.txt").write_text("user data")
    rc = main(["compare", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("calibrl compare: error: ") and err.count("\n") == 1, err
    assert msg in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # nothing written, nothing deleted


def test_out_pointing_at_a_file_fails_before_the_model_loads(tmp_path, capsys, no_model):
    f = tmp_path / "a-file"
    f.write_text("not a directory")
    for out in (f, f / "below"):
        assert main(["compare", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{f} is a file, expected a directory" in err and err.count("\n") == 1
    assert f.read_text() == "not a directory"
