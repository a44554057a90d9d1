"""calibrl.sweep / sweep_summary / stats: spec checks, scheduling, run states, metrics and CIs by hand, the summary
rebuilt from run files, and one real two-process sweep on the shipped tiny model."""
import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from calibrl import stats, sweep, sweep_summary
from calibrl.history import History

SPEC = {"name": "t", "budget": "smoke", "baseline": "grpo", "seeds": 2, "base": {"steps": 2, "eval_every": 2},
        "arms": [{"name": "grpo", "set": {"mode": "grpo"}},
                 {"name": "calibrl", "set": {"mode": "calibrl"}},
                 {"name": "pilot", "set": {"mode": "grpo", "entropy_coef": 0.01}, "seeds": [0], "role": "pilot"},
                 {"name": "late", "set": {"mode": "calibrl", "slope": 0.3}, "seeds": [1], "role": "secondary"}]}


def write_spec(tmp_path, spec=SPEC):
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(spec))
    return p


# ---------------------------------------------------------------------------------------------------- stats
def test_t975_table_and_tail():
    assert stats.t975(1) == 12.706 and stats.t975(15) == 2.131 and stats.t975(30) == 2.042
    assert abs(stats.t975(60) - 2.000) < 0.002 and abs(stats.t975(10_000) - 1.960) < 0.001
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="df"):
            stats.t975(bad)


def test_mean_ci_by_hand():
    ci = stats.mean_ci([1.0, 2.0, 3.0, None])
    sd = 1.0
    assert ci["n"] == 3 and ci["mean"] == 2.0 and math.isclose(ci["sd"], sd)
    assert math.isclose(ci["half"], 4.303 * sd / math.sqrt(3))
    assert stats.mean_ci([5.0])["half"] is None and stats.mean_ci([])["mean"] is None
    with pytest.raises(ValueError, match="finite"):
        stats.mean_ci([1.0, float("nan")])


def test_paired_diff_pairs_by_seed():
    arm = {0: 1.0, 1: 3.0, 2: None, 3: 9.0}
    base = {0: 0.5, 1: 2.0, 2: 1.0}
    d = stats.paired_diff(arm, base)
    assert d["seeds"] == [0, 1] and d["n"] == 2 and d["mean"] == 0.75 and d["wins"] == 2
    assert math.isclose(d["half"], 12.706 * math.sqrt(((0.5 - 0.75) ** 2 + (1.0 - 0.75) ** 2) / 1) / math.sqrt(2))
    assert d["losses"] == 0 and d["sign_p"] == 0.5  # 2 of 2: 2 * P(X >= 2) = 2 * 1/4
    tie = stats.paired_diff({0: 1.0, 1: 2.0, 2: 1.0}, {0: 1.0, 1: 1.0, 2: 2.0})
    assert (tie["wins"], tie["losses"]) == (1, 1) and tie["sign_p"] == 1.0  # the tied seed 0 counts for neither


@pytest.mark.parametrize("wins, losses, p", [
    (5, 0, 2 / 32),                # 2 * P(X >= 5), X ~ Bin(5, 1/2)
    (0, 5, 2 / 32),
    (4, 1, 2 * 6 / 32),            # 2 * (C(5,4) + C(5,5)) / 32
    (12, 4, 2 * sum(math.comb(16, i) for i in range(12, 17)) / 2 ** 16),
    (3, 3, 1.0), (0, 0, 1.0), (1, 0, 1.0),
])
def test_sign_test_hand_computed(wins, losses, p):
    assert math.isclose(stats.sign_test(wins, losses), p)


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_sign_test_rejects_non_counts(bad):
    with pytest.raises(ValueError, match="wins: expected an int >= 0"):
        stats.sign_test(bad, 0)


# ----------------------------------------------------------------------------------------------------- spec
@pytest.mark.parametrize("patch, match", [
    ({"name": "../x"}, "plain name"),
    ({"arms": [{"name": "/abs", "set": {}}]}, "plain name"),
    ({"arms": [{"name": "a", "set": {"mode": "grpo"}}, {"name": "a", "set": {}}]}, "distinct arm names"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"seeds": True}, "count"),
    ({"baseline": "nope"}, "baseline"),
    ({"bogus": 1}, "unknown keys"),
    ({"arms": [{"name": "a", "set": {"slope": "high"}}], "baseline": "a"}, "arm 'a'"),
    ({"arms": [{"name": "a", "set": {"no_such_field": 1}}], "baseline": "a"}, "no_such_field"),
    ({"arms": [{"name": "a", "role": "main"}], "baseline": "a"}, "role"),
    ({"last_frac": 0}, "last_frac"),
    ({"arms": [{"name": "grpo"}, {"name": "b", "reference": "nope"}]}, r"arms\[1\].reference.*'grpo'"),
    ({"arms": [{"name": "grpo"}, {"name": "b", "reference": "b"}]}, r"arms\[1\].reference: expected the name of an"),
    ({"metrics": {"final_greedy_acc": "x"}}, r"spec.metrics: expected a non-empty list"),
    ({"metrics": []}, r"spec.metrics: expected a non-empty list"),
    ({"metrics": ["final_greedy_acc", "accuracy"]}, r"spec.metrics: unknown \['accuracy'\] \(known: "),
    ({"metrics": ["kl_last", "kl_last"]}, r"spec.metrics: expected distinct"),
    ({"steps": 0}, r"spec.steps: expected an int >= 1"),
    ({"steps": 3}, r"spec.steps: 3 disagrees with spec.base.steps 2"),
    ({"arms": [{"name": "grpo"}, {"name": "b", "set": {"pass_k": 4}}]}, r"spec.arms\[1\].set.pass_k: 4 differs"),
    ({"arms": [{"name": "grpo", "set": {"eval_n": 8}}, {"name": "b"}]}, r"spec.arms\[1\].set.eval_n: 4 differs from the baseline arm's 8"),
])
def test_bad_specs_raise_naming_the_problem(tmp_path, patch, match):
    with pytest.raises(ValueError, match=match):
        sweep.load_spec(write_spec(tmp_path, {**SPEC, **patch}))


def test_spec_file_errors_name_the_file(tmp_path):
    p = tmp_path / "spec.json"
    p.write_text('{"name": "t",\n "arms": [}')
    with pytest.raises(ValueError, match=r"spec.json line 2"):
        sweep.load_spec(p)
    with pytest.raises(ValueError, match="not found"):
        sweep.load_spec(tmp_path / "missing.json")


def test_plan_is_seed_major_with_pilots_beside_their_seed(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    order = [(a.name, s) for a, s in sweep.plan(spec, tmp_path)]
    assert order == [("grpo", 0), ("calibrl", 0), ("pilot", 0), ("grpo", 1), ("calibrl", 1), ("late", 1)]
    assert [(a.name, s) for a, s in sweep.plan(spec, tmp_path, roles=("secondary",))] == [("late", 1)]
    cfg = sweep.config_for(spec, spec.arm("late"), 1)
    assert cfg.loss.slope == 0.3 and cfg.steps == 2 and cfg.seed == 1 and cfg.threads == 1


# ------------------------------------------------------------------------------------------------- run files
def fake_run(path: Path, steps: int, *, done=True, checkpoint=True, values=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    rows = []
    last = steps if done else steps - 1
    for s in range(1, last + 1):
        v = (values or {}).get(s, {})
        rows.append({"step": s, "entropy_mean": v.get("ent", 0.1 * s), "acc_mean": 0.5, "format_rate": 1.0,
                     "uniform_frac": None if s == 1 else 0.25, "kl_to_start": 0.01 * s,
                     **({"eval_greedy_acc": v.get("acc", 0.5), "eval_pass_at_k": 0.75, "eval_format_rate": 1.0}
                        if s == steps else {})})
    (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if checkpoint:
        (path / "checkpoint").mkdir(exist_ok=True)
        (path / "checkpoint" / "state.pt").write_bytes(b"x")
    return rows


def test_run_state(tmp_path):
    assert sweep.run_state(tmp_path / "none", 5) == "new"
    fake_run(tmp_path / "a", 5)
    assert sweep.run_state(tmp_path / "a", 5) == "done"
    fake_run(tmp_path / "b", 5, done=False)
    assert sweep.run_state(tmp_path / "b", 5) == "resumable"
    fake_run(tmp_path / "c", 5, done=False, checkpoint=False)
    assert sweep.run_state(tmp_path / "c", 5) == "orphan"
    fake_run(tmp_path / "d", 5, checkpoint=False)  # a shipped run: all rows, no checkpoint
    assert sweep.run_state(tmp_path / "d", 5) == "done"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "stray.txt").write_text("x")
    assert sweep.run_state(tmp_path / "e", 5) == "orphan"
    fake_run(tmp_path / "f", 5, done=False, checkpoint=False)
    (tmp_path / "f" / "checkpoint").mkdir()  # killed while writing the first checkpoint: nothing to resume
    assert sweep.run_state(tmp_path / "f", 5) == "orphan"


def test_run_metrics_by_hand():
    rows = [{"step": s, "entropy_mean": float(s), "uniform_frac": None if s == 10 else 0.5,
             **({"eval_greedy_acc": 0.25} if s == 10 else {}), **({"eval_greedy_acc": 0.9} if s == 5 else {})}
            for s in range(1, 11)]
    m = sweep_summary.run_metrics(rows, 10, 0.2)
    assert m["entropy_last"] == 9.5            # steps 9 and 10
    assert m["uniform_last"] == 0.5            # None at step 10 is skipped, not read as 0
    assert m["final_greedy_acc"] == 0.25       # the last step's value, not the best one
    assert m["final_pass_at_k"] is None and m["gate_tie_frac"] is None
    assert m["entropy_trend_last"] == 1.0      # window steps 9-10: step 10 minus step 9
    assert sweep_summary.run_metrics(rows, 10, 0.4)["entropy_trend_last"] == 2.0  # mean(9, 10) - mean(7, 8)
    assert sweep_summary.run_metrics(rows, 10, 0.1)["entropy_trend_last"] is None  # a 1-step window has no halves
    assert set(sweep_summary.POST_HOC) <= set(m)


def test_summary_pairs_seeds_and_rebuilds_identically(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    out = tmp_path / "out"
    for seed, (g, c) in enumerate([(0.5, 0.75), (0.25, 0.75)]):
        fake_run(out / "grpo" / f"s{seed}", 2, values={2: {"acc": g}})
        fake_run(out / "calibrl" / f"s{seed}", 2, values={2: {"acc": c}})
    fake_run(out / "late" / "s1", 2, done=False)
    summary = sweep_summary.write_summary(spec, out)
    cal = summary["arms"]["calibrl"]
    assert cal["seeds_done"] == [0, 1] and summary["arms"]["late"]["seeds_partial"] == [1]
    d = cal["vs_baseline"]["final_greedy_acc"]
    assert d["mean"] == 0.375 and d["seeds"] == [0, 1] and d["wins"] == 2
    assert math.isclose(d["half"], 12.706 * math.sqrt(2 * 0.125 ** 2) / math.sqrt(2))
    md = (out / "summary.md").read_text()
    assert "| calibrl | 2 | 0.375 ± " in md and "late: seeds [1]" in md
    html = (out / "report.html").read_text()
    assert "Plotly.newPlot" in html and not re.search(r"<script[^>]*src=[\"']https?:", html)  # opens offline
    before = md
    sweep_summary.write_summary(spec, out)
    assert (out / "summary.md").read_text() == before


def test_export_is_compact_and_skips_unfinished(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    out, dest = tmp_path / "out", tmp_path / "ship"
    fake_run(out / "grpo" / "s0", 2, values={1: {"ent": 0.123456789}})
    fake_run(out / "grpo" / "s1", 2, done=False)
    (out / "grpo" / "s0" / "eval.jsonl").write_text("".join(json.dumps({"step": s, "q": s}) + "\n" for s in (1, 2, 2)))
    assert sweep_summary.export_runs(spec, out, dest) == 1
    got = dest / "grpo" / "s0"
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "eval.jsonl", "history.jsonl.gz", "samples.jsonl"]
    assert [json.loads(x)["step"] for x in (got / "eval.jsonl").read_text().splitlines()] == [2, 2]
    lines = gzip.decompress((got / "history.jsonl.gz").read_bytes()).decode().splitlines()
    assert json.loads(lines[0])["entropy_mean"] == 0.123457
    src_rows = [json.loads(x) for x in (out / "grpo" / "s0" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in History.load(got).rows] == [r["step"] for r in src_rows] == [1, 2]
    assert History.load(got).rows[1] == src_rows[1]  # every column kept; only floats rounded
    assert not (dest / "grpo" / "s1").exists()
    assert sweep_summary.summarize(spec, dest)["arms"]["grpo"]["seeds_done"] == [0]
    assert sweep.run_state(got, 2) == "done"  # a later sweep with --out DEST skips it
    first = (got / "history.jsonl.gz").read_bytes()
    assert sweep_summary.export_runs(spec, dest, dest) == 1  # in place: idempotent, byte for byte
    assert (got / "history.jsonl.gz").read_bytes() == first
    # a stale plain history in the destination (the former export format) is replaced, not left to shadow the new one
    (got / "history.jsonl").write_text(json.dumps({"step": 1, "stale": True}) + "\n")
    assert sweep_summary.export_runs(spec, out, dest) == 1
    assert not (got / "history.jsonl").exists() and (got / "history.jsonl.gz").read_bytes() == first
    # in place on the run itself: the plain file is replaced by its compressed copy, the rows survive
    assert sweep_summary.export_runs(spec, out, out) == 1
    assert not (out / "grpo" / "s0" / "history.jsonl").exists()
    assert History.load(out / "grpo" / "s0").rows == History.load(got).rows


@pytest.mark.parametrize("workers", [0, -1, True, 1.5])
def test_bad_workers_is_an_error_before_anything_runs(tmp_path, workers):
    spec = sweep.load_spec(write_spec(tmp_path))
    with pytest.raises(ValueError, match="workers: expected an int >= 1"):  # 0 once meant "all cores" silently
        sweep.run_sweep(spec, tmp_path / "out", workers=workers, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_missing_out_for_summarize_only_and_an_unwritable_export(tmp_path):
    p = write_spec(tmp_path)
    base = [sys.executable, "-m", "calibrl", "sweep", str(p)]
    res = subprocess.run(base + ["--out", str(tmp_path / "typo"), "--summarize-only"], capture_output=True, text=True)
    assert res.returncode != 0 and "--summarize-only reads the runs of a sweep there" in res.stderr
    assert not (tmp_path / "typo").exists()  # no empty summary written where the user mistyped
    (tmp_path / "afile").write_text("x")
    res = subprocess.run(base + ["--out", str(tmp_path / "o"), "--export", str(tmp_path / "afile" / "ship")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "--export:" in res.stderr and "is a file" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()  # refused before any run started


def test_report_counts_only_finished_runs(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path))
    out = tmp_path / "out"
    fake_run(out / "grpo" / "s0", 2)
    fake_run(out / "grpo" / "s1", 2, done=False)  # unfinished: not in the tables, the curves or the legend's n
    sweep_summary.write_summary(spec, out)
    page = (out / "report.html").read_text()
    assert "grpo (n=1)" in page and "grpo (n=2)" not in page
    assert "Unfinished runs (not in the tables): grpo: seeds [1]" in page


def test_compact_history_reads_like_the_plain_one_and_bad_gzip_is_named(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"step": 1, "x": 0.5}, {"step": 2, "x": None}]
    (run / "history.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert History.load(run).rows == rows and sweep.run_state(run, 2) == "done"
    (run / "history.jsonl").write_text(json.dumps({"step": 1}) + "\n")  # a run being written wins over a shipped copy
    assert History.load(run).rows == [{"step": 1}]
    (run / "history.jsonl").unlink()
    (run / "history.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"history\.jsonl\.gz: not a readable gzip file"):
        History.load(run)
    (run / "history.jsonl.gz").unlink()
    with pytest.raises(ValueError, match="history.jsonl.gz"):
        History.load(run)


# ----------------------------------------------------------------------------------------------- end to end
def test_real_sweep_two_workers_then_summarize_only(tmp_path):
    spec = {**SPEC, "seeds": [0], "base": {"steps": 2, "eval_every": 2, "eval_n": 2, "pass_k": 2, "save_every": 1},
            "arms": SPEC["arms"][:2]}
    p = write_spec(tmp_path, spec)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "calibrl", "sweep", str(p), "--out", str(out), "--workers", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for arm in ("grpo", "calibrl"):
        rows = [json.loads(x) for x in (out / arm / "s0" / "history.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and rows[-1]["mode"] == arm
    first = (out / "summary.md").read_text()
    # everything finished: a second call trains nothing and rebuilds the same summary
    res = subprocess.run(cmd + ["--summarize-only"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (out / "summary.md").read_text() == first
    assert "| calibrl | 1 |" in first


def test_ablation_is_paired_against_its_reference_arm(tmp_path):
    """An arm with "reference" gets paired differences against that arm (by seed, only seeds both finished),
    its own table in summary.md and verdict sentences naming the reference; arm_frame/reading select it."""
    spec_d = {**SPEC, "seeds": 3, "arms": [
        {"name": "grpo", "set": {"mode": "grpo"}},
        {"name": "calibrl", "set": {"mode": "calibrl"}},
        {"name": "a0.3", "set": {"mode": "calibrl", "slope": 0.3}, "role": "secondary", "reference": "calibrl"}]}
    spec = sweep.load_spec(write_spec(tmp_path, spec_d))
    out = tmp_path / "out"
    acc = {"grpo": [0.5, 0.5, 0.5], "calibrl": [0.75, 0.5, None], "a0.3": [0.5, 0.25, 0.25]}
    for arm, vals in acc.items():
        for seed, v in enumerate(vals):
            if v is not None:
                fake_run(out / arm / f"s{seed}", 2, values={2: {"acc": v}})
    summary = sweep_summary.write_summary(spec, out)
    a = summary["arms"]["a0.3"]
    d = a["vs_reference"]["final_greedy_acc"]
    assert a["reference"] == "calibrl" and d["seeds"] == [0, 1]  # calibrl seed 2 unfinished: not paired
    assert d["mean"] == -0.25 and d["losses"] == 2 and d["half"] is not None and d["half"] < 1e-9  # both -0.25
    assert a["vs_baseline"]["final_greedy_acc"]["seeds"] == [0, 1, 2]
    assert "vs_reference" not in summary["arms"]["calibrl"] and "reference" not in summary["arms"]["grpo"]
    md = (out / "summary.md").read_text()
    table = md.split("## Paired difference against the arm's reference", 1)[1]
    assert "| a0.3 − calibrl | 2 | -0.250 ± 0.000 |" in table
    ref_lines = sweep_summary.reading(summary, "final_greedy_acc", against="reference")
    assert ref_lines == [ln for ln in ref_lines if ln.startswith("a0.3: ")] and len(ref_lines) == 1
    assert "-0.250" in ref_lines[0] and "vs calibrl over 2 paired seeds" in ref_lines[0]
    assert f"- {ref_lines[0]}" in md.split("## Paired verdicts", 1)[1]
    frame = sweep_summary.arm_frame(summary, diff=True, against="reference")
    assert list(frame.index) == ["a0.3"] and frame.loc["a0.3", "reference"] == "calibrl"
    assert frame.loc["a0.3", "n"] == 2 and frame.loc["a0.3", "final_greedy_acc"] == -0.25
    (tmp_path / "plain").mkdir()
    no_ref = sweep_summary.summarize(sweep.load_spec(write_spec(tmp_path / "plain", SPEC)), tmp_path / "none")
    empty = sweep_summary.arm_frame(no_ref, diff=True, against="reference")  # a spec without references: empty
    assert len(empty) == 0 and empty.index.name == "arm"
    with pytest.raises(ValueError, match="against"):
        sweep_summary.reading(summary, "final_greedy_acc", against="calibrl")
    with pytest.raises(ValueError, match="metric"):
        sweep_summary.reading(summary, "accuracy")


def test_load_study_and_reading(tmp_path):
    write_spec(tmp_path)
    out = tmp_path
    for seed, (g, c) in enumerate([(0.5, 0.75), (0.25, 0.75)]):
        fake_run(out / "grpo" / f"s{seed}", 2, values={2: {"acc": g}})
        fake_run(out / "calibrl" / f"s{seed}", 2, values={2: {"acc": c}})
    study = sweep_summary.load_study(out)
    assert [h.run_dir.name for h in study["histories"]["calibrl"]] == ["s0", "s1"]
    lines = sweep_summary.reading(study["summary"], "final_greedy_acc")
    assert lines[0].startswith("calibrl: final greedy accuracy (held-out) +0.375 (95% CI")
    assert "within seed noise" in lines[0]  # n = 2: t = 12.7, the band is wide
    assert any("pilot: no finished seed" in x for x in lines)
    md = sweep_summary.to_markdown(study["summary"])  # verdicts sit under the tables; arms without seeds left out
    assert f"- {lines[0]}" in md.split("## Paired verdicts", 1)[1] and "pilot: no finished seed" not in md
    one = sweep_summary.load_study(out, max_seeds=1)
    assert one["summary"]["arms"]["calibrl"]["seeds_done"] == [0]
    assert "on 1 seed (no interval)" in sweep_summary.reading(one["summary"], "final_greedy_acc")[0]
    with pytest.raises(ValueError, match="max_seeds"):
        sweep_summary.load_study(out, max_seeds=0)


def test_labels_state_the_specs_window_not_a_fixed_20_percent(tmp_path):
    """A spec with last_frac 0.3 averages over the last 30% of steps; its tables and sentences must say 30%."""
    write_spec(tmp_path, {**SPEC, "last_frac": 0.3})
    for seed in (0, 1):
        fake_run(tmp_path / "grpo" / f"s{seed}", 2, values={2: {"acc": 0.5}})
        fake_run(tmp_path / "calibrl" / f"s{seed}", 2, values={2: {"acc": 0.25 * (seed + 2)}})
    summary = sweep_summary.load_study(tmp_path)["summary"]
    md = sweep_summary.to_markdown(summary)
    assert "entropy, last 30% of steps" in md and "uniform-group fraction, last 30%" in md and "20%" not in md
    assert summary["metrics"]["kl_last"] == "KL to the start policy, last 30%"
    assert sweep_summary.reading(summary, "entropy_last")[0].startswith("calibrl: entropy, last 30% of steps")
    assert sweep_summary.metric_label("entropy_trend_last", 0.125) == \
        "entropy change within the last 12.5% (2nd half − 1st half)"
    assert sweep_summary.metric_label("final_greedy_acc", 0.3) == "final greedy accuracy (held-out)"
    assert "final pass@2 (held-out)" in md and "pass@k" not in md  # the spec's k (smoke budget: 2), not "k"
    assert sweep_summary.metric_label("final_pass_at_k", 0.2, pass_k=8) == "final pass@8 (held-out)"
    assert sweep_summary.metric_label("final_pass_at_k", 0.2) == "final pass@k (held-out)"
    with pytest.raises(ValueError, match="last_frac"):
        sweep_summary.metric_label("entropy_last", 0)


def test_spec_metrics_and_steps_are_used_not_ignored(tmp_path):
    """The spec's declared metrics are the tables' columns and the verdicts; a top-level "steps" sets every run's."""
    base = {k: v for k, v in SPEC["base"].items() if k != "steps"}
    spec = sweep.load_spec(write_spec(tmp_path, {**SPEC, "base": base, "steps": 2,
                                                 "metrics": ["train_acc_last", "final_greedy_acc"]}))
    assert spec.metrics == ("train_acc_last", "final_greedy_acc") and spec.base["steps"] == 2
    assert all(sweep.config_for(spec, a, 0).steps == 2 for a in spec.arms)
    for seed in (0, 1):
        fake_run(tmp_path / "grpo" / f"s{seed}", 2, values={2: {"acc": 0.5}})
        fake_run(tmp_path / "calibrl" / f"s{seed}", 2, values={2: {"acc": 0.25 * (seed + 3)}})
    summary = sweep_summary.load_study(tmp_path)["summary"]
    assert summary["declared"] == ["train_acc_last", "final_greedy_acc"]
    md = sweep_summary.to_markdown(summary)
    per_arm = md.split("## Per arm", 1)[1].split("##", 1)[0]
    assert "| arm | seeds | training accuracy, last 20% | final greedy accuracy (held-out) |" in per_arm
    assert "entropy" not in per_arm and "pass@k" not in per_arm
    verdicts = md.split("## Paired verdicts", 1)[1]
    assert "calibrl: final greedy accuracy (held-out)" in verdicts and "entropy" not in verdicts
    assert "training accuracy" not in verdicts  # verdicts: the declared metrics among VERDICT_METRICS
    write_spec(tmp_path, SPEC)  # no "metrics": the pre-declared PRIMARY_METRICS
    assert sweep_summary.load_study(tmp_path)["summary"]["declared"] == list(sweep_summary.PRIMARY_METRICS)


def test_readme_tables_are_the_shipped_study_summary():
    """`python -m calibrl sweep assets/study/spec.json --out assets/study --summarize-only` regenerates the README's
    study tables exactly from the shipped run files."""
    root = Path(__file__).resolve().parents[1]
    spec = sweep.load_spec(root / "assets" / "study" / "spec.json")
    summary = sweep_summary.summarize(spec, root / "assets" / "study")
    summary.pop("_runs")
    readme = (root / "README.md").read_text(encoding="utf-8")
    tables = [ln for ln in sweep_summary.to_markdown(summary).splitlines() if ln.startswith("| ")]
    missing = [ln for ln in tables if ln not in readme]
    assert summary["n_runs"] > 0 and not missing, f"README lacks the study's table rows: {missing[:3]}"
    shipped = (root / "assets" / "study" / "summary.md").read_text(encoding="utf-8")
    assert shipped == sweep_summary.to_markdown(summary)


def test_shipped_study_is_compact_and_tracked():
    """Every shipped run holds only the compact files (no checkpoint, adapter or model weights), every file is
    tracked by git (an ignore rule must not swallow it), and all shipped runs together stay within 20 MB."""
    root = Path(__file__).resolve().parents[1]
    study = root / "assets" / "study"
    allowed = {"config.json", "env.json", "history.jsonl.gz", "eval.jsonl", "samples.jsonl", ".calibrl"}
    runs = sorted(p for p in study.glob("*/s*") if p.is_dir())
    assert runs, "no shipped run under assets/study"
    extra = [str(f.relative_to(root)) for r in runs for f in r.rglob("*") if f.is_file() and f.name not in allowed]
    assert not extra, f"non-compact files in shipped runs: {extra[:5]}"
    for r in runs:
        assert {"config.json", "history.jsonl.gz", "eval.jsonl"} <= {f.name for f in r.iterdir()}, r
    total = sum(f.stat().st_size for r in runs for f in r.rglob("*") if f.is_file())
    assert total <= 20 * 2**20, f"shipped runs total {total / 2**20:.1f} MiB > 20 MiB"
    try:
        listed = set(subprocess.run(["git", "ls-files", "assets/study"], cwd=root, capture_output=True, text=True,
                                    check=True).stdout.split())
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [str(f.relative_to(root)) for r in runs for f in r.rglob("*") if f.is_file()]
    untracked = [f for f in files if f not in listed]
    assert not untracked, f"shipped run files not tracked by git: {untracked[:5]}"


def test_readme_figure_is_drawn_from_the_shipped_runs():
    """assets/study/study.png (tools/plot_study.py) records the runs it was drawn from; they must be the shipped
    study's finished runs, so a new seed without a redrawn figure fails here."""
    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    try:
        import plot_study
    finally:
        sys.path.pop(0)
    spec = sweep.load_spec(root / "assets" / "study" / "spec.json")
    summary = sweep_summary.summarize(spec, root / "assets" / "study")
    with Image.open(root / "assets" / "study" / "study.png") as im:
        drawn = json.loads(im.text["calibrl-runs"])
    assert drawn == plot_study.shipped_runs(summary), "redraw it: python tools/update_readme_study.py"
    assert "assets/study/study.png" in (root / "README.md").read_text(encoding="utf-8")
