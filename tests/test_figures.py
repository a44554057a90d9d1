"""calibrl.figures: trace counts, axis titles, plotted values equal the gate formulas, method colours."""
import numpy as np
import pytest

from calibrl import figures as F


def _batch(seed=0, b=4, t=7):
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(1.0, (b, t))
    expert = -rng.exponential(1.0, (b, t))
    passed = np.array([1, 0, 1, 0][:b], dtype=bool)
    mask = np.ones((b, t), dtype=bool)
    mask[1, 5:] = False
    return logp, expert, passed, mask


def _z(trace):
    return np.array([[np.nan if v is None else v for v in row] for row in trace.z], dtype=float)


def test_method_colors_contract():
    assert F.METHOD_COLORS == {"grpo": "#636EFA", "calibrl": "#EF553B", "dr_grpo": "#00CC96", "dapo": "#AB63FA",
                               "luffy": "#FFA15A", "rlplus": "#19D3F3", "expert": "#7F7F7F"}
    assert F.method_color("calibrl α=0.3") == "#EF553B"
    assert F.method_color("dr_grpo s1") == "#00CC96"  # the longer name wins over grpo
    assert F.method_color("grpo after") == "#636EFA"
    assert F.method_color("start") == F.OTHER_COLOR


@pytest.mark.parametrize("slope", [0.0, 0.3, 0.5, 1.0])
def test_fig_gate_values(slope):
    fig = F.fig_gate(slope, abs_adv=0.5, n=11, gap_range=(-2, 2))
    assert len(fig.data) == 2
    assert "gap" in fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    x = np.asarray(fig.data[0].x)
    # passed (s=+1): |A| * LeakyReLU(-x); failed (s=-1): |A| * LeakyReLU(x)
    np.testing.assert_allclose(fig.data[0].y, 0.5 * np.where(-x >= 0, -x, slope * -x))
    np.testing.assert_allclose(fig.data[1].y, 0.5 * np.where(x >= 0, x, slope * x))
    assert fig.data[0].y[0] == pytest.approx(1.0)  # x = -2: passed row below the expert, full slope 1


def test_gate_weights_formula_and_branches():
    logp = np.array([[-2.0, -0.5], [-2.0, -0.5]])
    expert = np.array([[-1.0, -1.0], [-1.0, -1.0]])
    w = F.gate_weights(logp, expert, [True, False], 0.3)
    # passed below -> 1, passed above -> slope; failed below -> slope, failed above -> 1
    np.testing.assert_allclose(w, [[1.0, 0.3], [0.3, 1.0]])
    # equality: passed logp == e -> slope (>= side), failed logp == e -> slope (<= side)
    np.testing.assert_allclose(F.gate_weights([[-1.0], [-1.0]], [[-1.0], [-1.0]], [1, 0], 0.4), [[0.4], [0.4]])


def test_fig_token_weights_values():
    logp, expert, passed, mask = _batch()
    fig = F.fig_token_weights(logp, expert, passed, 0.25, mask=mask)
    assert len(fig.data) == 4
    assert fig.layout.xaxis.title.text == "expert log-prob e_t" and "policy" in fig.layout.yaxis.title.text
    s = np.where(passed, 1.0, -1.0)[:, None]
    expect = np.where(mask, np.where(s * (logp - expert) < 0, 1.0, 0.25), np.nan)
    np.testing.assert_allclose(_z(fig.data[3]), expect)
    # scatter points: every real token of passed rows, customdata = the weight
    sel = mask & passed[:, None]
    np.testing.assert_allclose(fig.data[0].x, expert[sel])
    np.testing.assert_allclose(fig.data[0].customdata, expect[sel])
    assert len(fig.data[1].x) == int((mask & ~passed[:, None]).sum())


def test_fig_grad_weights_values():
    logp, expert, passed, mask = _batch(1)
    adv = np.array([0.5, -0.5, 0.25, -0.25])
    fig = F.fig_grad_weights(logp, expert, passed, adv, 0.5, mask=mask, guide_coef=0.1)
    assert len(fig.data) == 3
    s = np.where(passed, 1.0, -1.0)[:, None]
    w = np.where(s * (logp - expert) < 0, 1.0, 0.5)
    expect = np.where(mask, 0.1 * s * np.abs(adv)[:, None] * w, np.nan)
    np.testing.assert_allclose(_z(fig.data[0]), expect)
    np.testing.assert_allclose(fig.data[1].y, adv)
    np.testing.assert_allclose(fig.data[2].y, np.nanmean(expect, axis=1))
    assert fig.data[1].marker.color == F.METHOD_COLORS["grpo"] and fig.data[2].marker.color == F.METHOD_COLORS["calibrl"]
    none = F.grad_weights(logp, expert, passed, adv, 0.5, mask=mask, weight="none")
    np.testing.assert_allclose(none, np.where(mask, 0.1 * s * w, np.nan))


def test_fig_rarity_values():
    adv = np.array([0.75, -0.25, -0.25, -0.25])
    fig = F.fig_rarity(adv, [1, 0, 0, 0], curve=dict(k=[0, 1, 2, 3, 4], abs_adv_passed=[None, .75, .5, .25, 0],
                                                      abs_adv_failed=[0, .25, .5, .75, None], current_k=1))
    assert len(fig.data) == 6
    np.testing.assert_allclose(fig.data[0].y, [0.75])
    np.testing.assert_allclose(fig.data[1].y, [-0.25] * 3)
    np.testing.assert_allclose(fig.data[2].y, np.abs(adv))
    assert fig.layout.yaxis.title.text == "advantage A_i"
    assert len(F.fig_rarity(adv, [1, 0, 0, 0]).data) == 3


def _rows():
    rows = []
    for mode, base in (("grpo", 0.2), ("calibrl", 0.4)):
        for seed in (0, 1, 2):
            for step in (1, 2, 3):
                rows.append(dict(step=step, mode=mode, seed=seed, reward_mean=base + 0.1 * seed + 0.01 * step,
                                 eval_greedy_acc=0.5 if step == 3 else None,
                                 gate_passed_below=0.2, gate_passed_above=0.8, gate_failed_above=0.6,
                                 gate_failed_below=0.4))
    return rows


def test_fig_curves_mean_and_ci():
    fig = F.fig_curves(_rows(), "reward_mean")
    assert len(fig.data) == 4  # band + line per mode
    band, line = fig.data[0], fig.data[1]
    assert line.line.color == F.METHOD_COLORS["grpo"] and fig.data[3].line.color == F.METHOD_COLORS["calibrl"]
    # mean over seeds 0,1,2 at step 1: 0.2 + 0.1 + 0.01; CI half-width t(2) * sd / sqrt(3) with sd = 0.1
    assert line.y[0] == pytest.approx(0.31)
    half = 4.303 * 0.1 / np.sqrt(3)
    assert band.y[0] == pytest.approx(0.31 + half) and band.y[-1] == pytest.approx(0.31 - half)
    assert fig.layout.xaxis.title.text == "RL step" and fig.layout.yaxis.title.text == "reward_mean"
    one_seed = [r for r in _rows() if r["seed"] == 0]
    assert len(F.fig_curves(one_seed, "reward_mean").data) == 2  # no band with a single seed
    assert "n=3 seeds" in line.name and "n=1 seed)" in F.fig_curves(one_seed, "reward_mean").data[0].name
    ev = F.fig_curves(_rows(), "eval_greedy_acc")
    assert list(ev.data[1].x) == [3]  # null steps dropped
    with pytest.raises(ValueError, match="metric"):
        F.fig_curves(_rows(), "nope")
    empty = F.fig_curves([dict(r, reward_mean=None) for r in _rows()], "reward_mean")
    assert len(empty.data) == 0 and "no values" in empty.layout.title.text


def test_fig_curves_same_method_distinct_dashes():
    rows = [dict(r, run=f"a{r['seed']}") for r in _rows() if r["mode"] == "calibrl"]
    fig = F.fig_curves(rows, "reward_mean", by="run")
    lines = [d for d in fig.data if d.mode == "lines+markers"]
    assert len(lines) == 3 and {d.line.color for d in lines} == {F.METHOD_COLORS["calibrl"]}
    assert len({d.line.dash for d in lines}) == 3


def test_fig_gate_branches():
    rows = _rows() + [dict(step=1, mode="grpo", seed=0, reward_mean=0.1)]
    fig = F.fig_gate_branches(rows)
    lines = [d for d in fig.data if d.fill != "toself"]  # bands are 0-width 'toself' traces (constant here)
    assert len(lines) == 4 and not any(d.stackgroup for d in fig.data)  # lines, never stacked (a stack draws None as 0)
    np.testing.assert_allclose(lines[0].y, [0.2] * 3)
    np.testing.assert_allclose(np.add(lines[2].y, lines[3].y), [1.0] * 3)
    assert lines[0].xaxis == "x" and lines[2].xaxis == "x2"
    with pytest.raises(ValueError, match="gate"):
        F.fig_gate_branches([dict(step=1, mode="grpo", reward_mean=0.1)])
    nulls = [dict(r, gate_passed_below=None, gate_passed_above=None, gate_failed_above=None, gate_failed_below=None)
             for r in _rows()]
    assert len(F.fig_gate_branches(nulls).data) == 0


def test_fig_entropy_heatmap():
    samples = [dict(step=s, prompt_id=i, tokens=["<think>", "red"][: 1 + i], entropy=[0.5, 0.25][: 1 + i],
                    logp=[-0.1, -0.2][: 1 + i], passed=bool(i), reward=float(i)) for s in (1, 2) for i in (0, 1)]
    fig = F.fig_entropy_heatmap(samples)
    assert len(fig.data) == 1 and "step 2" in fig.layout.title.text
    assert _z(fig.data[0]).tolist()[1] == [0.5, 0.25] and np.isnan(_z(fig.data[0])[0, 1])
    assert fig.data[0].text[0][0] == "&lt;think&gt;"
    assert fig.data[0].y[1].endswith("✓") and fig.data[0].y[0].endswith("✗")
    with pytest.raises(ValueError, match="step"):
        F.fig_entropy_heatmap(samples, step=9)


def test_fig_rarity_hist():
    fig = F.fig_rarity_hist({"grpo": [0, 0.25, 1.0], "calibrl": [0.5]}, group_size=4)
    assert len(fig.data) == 2 and fig.data[0].marker.color == F.METHOD_COLORS["grpo"]
    assert fig.data[0].xbins.size == 0.25
    with pytest.raises(ValueError, match="pass_rates"):
        F.fig_rarity_hist([1.5])


def test_fig_calibration():
    def rows(preds):
        return [dict(question="q", answer=g, completion="", pred=p, correct=p == g, prompt_id=i)
                for i, (g, p) in enumerate(zip(["red", "red", "blue", "green"], preds))]

    runs = {"start": rows(["red", "red", "red", None]), "grpo after": rows(["red", "red", "red", "red"]),
            "calibrl after": rows(["red", "red", "blue", "green"])}
    fig = F.fig_calibration(runs)
    assert len(fig.data) == 2 * 3 + 1
    values = list(fig.data[0].x)
    assert values[-1] == "(no answer)" and set(values) == {"blue", "green", "red", "(no answer)"}
    share = dict(zip(values, fig.data[0].y))
    assert share["red"] == pytest.approx(0.75) and share["(no answer)"] == pytest.approx(0.25)
    gold = dict(zip(values, fig.data[3].y))
    assert fig.data[3].name == "gold (expert)" and gold["red"] == pytest.approx(0.5)
    assert fig.data[3].marker.color == F.METHOD_COLORS["expert"]
    assert fig.data[1].marker.color == F.METHOD_COLORS["grpo"] and fig.data[2].marker.color == F.METHOD_COLORS["calibrl"]
    np.testing.assert_allclose(fig.data[6].y, [1, 1, 1, 1])  # calibrl after agrees on every prompt


@pytest.mark.parametrize("call, match", [
    (lambda: F.fig_gate(1.5), "slope"),
    (lambda: F.gate_weights(np.zeros((2, 3)), np.zeros((2, 4)), [1, 0], 0.5), "expert_logp"),
    (lambda: F.gate_weights(np.zeros((2, 3)), np.zeros((2, 3)), [1, 0, 1], 0.5), "passed"),
    (lambda: F.gate_weights(np.zeros((2, 3)), np.zeros((2, 3)), [1, 0], 0.5, np.zeros((2, 3))), "mask"),
    (lambda: F.gate_weights(np.full((2, 3), np.nan), np.zeros((2, 3)), [1, 0], 0.5), "finite"),
    (lambda: F.grad_weights(np.zeros((2, 3)), np.zeros((2, 3)), [1, 0], [0.1], 0.5), "adv"),
    (lambda: F.grad_weights(np.zeros((2, 3)), np.zeros((2, 3)), [1, 0], [0.1, 0.2], 0.5, weight="x"), "weight"),
    (lambda: F.fig_calibration({}), "runs"),
    (lambda: F.fig_curves([{"mode": "grpo"}], "reward_mean"), "step"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------- figure hygiene
def _gap_rows():
    """3 seeds x 4 steps of calibrl; at step 2 every group was uniform: the gate columns are null in every seed."""
    rows = []
    for seed, acc in zip((0, 1, 2), (0.9, 1.0, 1.0)):
        for step in (1, 2, 3, 4):
            gate = None if step == 2 else 0.3
            rows.append(dict(step=step, mode="calibrl", seed=seed, acc_mean=acc, entropy_mean=[0.0, 0.02, 0.0][seed],
                             gate_passed_below=gate, gate_passed_above=None if gate is None else 1 - gate,
                             gate_failed_above=gate, gate_failed_below=None if gate is None else 1 - gate,
                             eval_greedy_acc=0.5 if step in (1, 3) else None))
    return rows


def test_null_steps_are_gaps_never_zero():
    fig = F.fig_curves(_gap_rows(), "gate_passed_below")
    band, line = fig.data
    assert list(line.x) == [1, 2, 3, 4] and line.y[1] is None and not line.connectgaps
    assert list(band.x).count(None) == 1  # two closed band pieces (steps 1 and 3-4), none across the gap
    gate = F.fig_gate_branches(_gap_rows())
    for trace in gate.data:
        if trace.fill != "toself":
            assert trace.y[1] is None and trace.stackgroup is None
    # a sparse (eval-only) metric is not a gap where it was not measured: its points are joined
    ev = F.fig_curves(_gap_rows(), "eval_greedy_acc")
    assert list(ev.data[-1].x) == [1, 3]


def test_bands_clamped_to_the_metric_range():
    fig = F.fig_curves(_gap_rows(), "acc_mean")
    band = fig.data[0]
    m, half = 29 / 30, 4.303 * np.std([0.9, 1.0, 1.0], ddof=1) / np.sqrt(3)
    assert m + half > 1  # the unclamped interval leaves [0, 1]
    ys = [y for y in band.y if y is not None]
    assert max(ys) == pytest.approx(1.0) and min(ys) == pytest.approx(m - half)
    ent = F.fig_curves(_gap_rows(), "entropy_mean").data[0]
    assert min(y for y in ent.y if y is not None) == 0.0  # entropy >= 0 (unclamped: 0.00667 - 0.0287 < 0)
    stats = F.mean_ci_by_step(F.to_frame(_gap_rows()), "acc_mean")
    assert (stats["hi"] <= 1).all() and (stats["n"] == 3).all()
    unclamped = F.mean_ci_by_step(F.to_frame(_gap_rows()), "acc_mean", clamp=False)
    assert unclamped["hi"].iloc[0] == pytest.approx(m + half)


def test_n_per_step_in_hover_and_legend():
    rows = [r for r in _rows() if not (r["mode"] == "grpo" and r["seed"] == 2 and r["step"] == 3)]
    line = F.fig_curves(rows, "reward_mean").data[1]
    assert list(line.customdata) == [3, 3, 2] and "n=3 seeds" in line.name


def test_chance_line_and_integer_step_ticks():
    fig = F.fig_curves(_gap_rows(), "acc_mean", chance=0.25)
    hlines = [s for s in fig.layout.shapes if s.y0 == s.y1 == 0.25]
    assert len(hlines) == 1 and any("chance" in a.text for a in fig.layout.annotations)
    with pytest.raises(ValueError, match="chance"):
        F.fig_curves(_gap_rows(), "acc_mean", chance=1.5)
    assert fig.layout.xaxis.tickformat == "d" and fig.layout.xaxis.dtick == 1
    assert F.int_step_axis(list(range(1, 61)))["dtick"] == 10 and F.int_step_axis([1, 2, 3])["dtick"] == 1
    assert F.int_step_axis(list(range(0, 201)))["dtick"] == 50


def test_teaching_figures_keep_legends_and_colorbars_clear():
    logp, expert, passed, mask = _batch()
    adv = np.array([0.5, -0.5, 0.25, -0.25])
    figs = [F.fig_gate(0.5), F.fig_token_weights(logp, expert, passed, 0.5, mask=mask),
            F.fig_grad_weights(logp, expert, passed, adv, 0.5, mask=mask),
            F.fig_rarity(adv, [1, 0, 1, 0]), F.fig_curves(_rows(), "reward_mean")]
    for fig in figs:  # legend under the plot area, not over lines or the colorbar on the right
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0
    grad = figs[2]
    heat = [d for d in grad.data if d.type == "heatmap"][0]
    # the heatmap sits in the right-hand subplot, so its colorbar (default x > 1) covers no axis label
    assert heat.xaxis == "x2" and heat.colorbar.x is None


def test_one_palette_one_ci_helper_no_circle():
    import subprocess
    import sys
    from pathlib import Path

    from calibrl import palette, report, stats

    assert F.METHOD_COLORS is palette.METHOD_COLORS and report.mean_ci([1.0, 2.0, 3.0])[1] == pytest.approx(
        stats.mean_ci([1.0, 2.0, 3.0])["half"])
    src = Path(F.__file__).parent
    for path in src.glob("*.py"):
        text = path.read_text()
        if path.name != "palette.py":
            assert "#636EFA" not in text.upper(), f"{path.name} defines its own palette"
        if path.name != "stats.py":
            assert "4.303" not in text and "12.706" not in text, f"{path.name} has its own t table"
    assert "calibrl.figures " not in (src / "figures_train.py").read_text().replace("calibrl.figures_train", "")
    code = "import sys, calibrl.figures_train; print('calibrl.figures' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
