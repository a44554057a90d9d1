"""calibrl.widgets driven without a browser: the callbacks update the figures as the formulas say, and each figure's
Output pane holds what it shows."""
import numpy as np
import pytest

import torch

from calibrl import advantage as adv_mod
from calibrl import figures as F
from calibrl import history
from calibrl import widgets as Wd


def _z(trace):
    return np.array([[np.nan if v is None else v for v in row] for row in trace.z], dtype=float)


def _expected_weights(b, slope):
    s = np.where(b["passed"], 1.0, -1.0)[:, None]
    return np.where(b["mask"], np.where(s * (b["logp"] - b["expert_logp"]) < 0, 1.0, slope), np.nan)


@pytest.mark.parametrize("slope", [0.0, 0.3, 0.8, 1.0])
def test_slope_explorer_slider_updates_weights(slope):
    b = Wd.demo_batch(rows=4, tokens=6, seed=3)
    w = Wd.SlopeExplorer(b["logp"], b["expert_logp"], b["passed"], b["adv"], b["mask"])
    assert w.slider.description == "slope α" and (w.slider.min, w.slider.max, w.slider.step) == (0.0, 1.0, 0.05)
    w.set_slope(slope)
    np.testing.assert_allclose(_z(w.fig.data[3]), _expected_weights(b, slope))
    # the gate curve and the gradient weights follow the same slope
    x = np.asarray(w.fig_gate.data[0].x)
    np.testing.assert_allclose(w.fig_gate.data[0].y, 0.5 * np.where(-x >= 0, -x, slope * -x))
    s = np.where(b["passed"], 1.0, -1.0)[:, None]
    expect = 0.1 * s * np.abs(b["adv"])[:, None] * _expected_weights(b, slope)
    np.testing.assert_allclose(_z(w.fig_grad.data[0]), expect)


def test_slope_explorer_slider_value_and_other_controls():
    w = Wd.SlopeExplorer()
    before = _z(w.fig.data[3])
    w.slider.value = 0.2  # moving the slider itself (what the browser does)
    after = _z(w.fig.data[3])
    changed = ~np.isnan(before) & (before != 1.0)
    assert changed.any() and np.allclose(after[changed], 0.2) and np.allclose(before[changed], 0.5)
    w.set_abs_adv(1.0)
    assert max(w.fig_gate.data[0].y) == pytest.approx(3.0)  # |A| * LeakyReLU(-(-3)) = 3
    w.set_weight("none")
    w.set_guide_coef(0.5)
    s = np.where(w.batch["passed"], 1.0, -1.0)[:, None]
    np.testing.assert_allclose(_z(w.fig_grad.data[0]), 0.5 * s * w.weights())
    assert len(w.fig.data) == 4 and len(w.fig_grad.data) == 3


def test_slope_explorer_rejects_bad_batch():
    with pytest.raises(ValueError, match="expert_logp"):
        Wd.SlopeExplorer(np.zeros((2, 3)), np.zeros((2, 2)), [1, 0], [0.5, -0.5])
    with pytest.raises(ValueError, match="expert_logp/passed/adv"):
        Wd.SlopeExplorer(np.zeros((2, 3)))


def test_rarity_explorer_matches_group_advantages():
    w = Wd.RarityExplorer(group_size=8, passes=2)
    for g, k in ((8, 2), (5, 1), (5, 5), (12, 0), (3, 2)):
        w.set_group(g, k)
        rewards = torch.tensor([1.0] * k + [0.0] * (g - k))
        ref = adv_mod.group_advantages(rewards, torch.zeros(g, dtype=torch.long))
        np.testing.assert_allclose(w.advantages.numpy(), ref.numpy(), atol=1e-7)
        plotted = np.concatenate([np.asarray(w.fig.data[0].y, float), np.asarray(w.fig.data[1].y, float)])
        np.testing.assert_allclose(np.sort(plotted), np.sort(ref.numpy()), atol=1e-7)
        np.testing.assert_allclose(w.fig.data[2].y, ref.abs().numpy(), atol=1e-7)
        assert list(w.fig.data[3].x) == list(range(g + 1)) and w.fig.data[5].x[0] == k
    assert w.k_slider.max == 3
    w.set_group(4, 2)
    assert w.fig.data[3].y[2] == pytest.approx(0.5)  # |A| of a pass at k=2 of G=4: 1 - 2/4


def _row(step, mode="calibrl", seed=0, r=0.5):
    return dict(step=step, mode=mode, seed=seed, reward_mean=r, entropy_mean=1.0 / step, gate_passed_below=0.3,
                gate_passed_above=0.7, gate_failed_above=0.5, gate_failed_below=0.5)


def test_dashboard_update_appends_points():
    d = Wd.TrainingDashboard()
    assert len(d.fig.data) == 0
    for s in (1, 2, 3):
        d.update(_row(s, r=0.1 * s), samples=[dict(step=s, prompt_id=0, tokens=["a", "b"], entropy=[0.2, 0.1],
                                                    logp=[-0.1, -0.2], passed=True, reward=1.1)])
        assert list(d.fig.data[0].x) == list(range(1, s + 1))
    np.testing.assert_allclose(d.fig.data[0].y, [0.1, 0.2, 0.3])
    assert d.fig.data[0].line.color == F.METHOD_COLORS["calibrl"]
    assert len([t for t in d.fig_gate.data if t.fill != "toself"]) == 4 and "step 3" in d.fig_entropy.layout.title.text
    d.set_step(1)
    assert "step 1" in d.fig_entropy.layout.title.text
    d.set_metric("entropy_mean")
    np.testing.assert_allclose(d.fig.data[0].y, [1.0, 0.5, 1 / 3])
    d.update(_row(1, mode="grpo"))
    assert [t.name.split(" (")[0] for t in d.fig.data] == ["calibrl", "grpo"]
    with pytest.raises(ValueError, match="row"):
        d.update({"mode": "grpo"})


def test_dashboard_from_runs(tmp_path):
    dirs = []
    for seed in (0, 1):
        h = history.History.create(tmp_path / f"calibrl-s{seed}", {"seed": seed, "loss": {"mode": "calibrl"}})
        for s in (1, 2):
            h.append(_row(s, seed=seed, r=0.1 * seed))
        h.append_samples([dict(step=2, prompt_id=1, tokens=["x"], entropy=[0.3], logp=[-0.5], passed=False,
                               reward=0.1)])
        dirs.append(h.run_dir)
    d = Wd.TrainingDashboard.from_runs(dirs)
    assert len(d.fig.data) == 2  # mean line + CI band over 2 seeds
    np.testing.assert_allclose(d.fig.data[1].y, [0.05, 0.05])
    assert d.fig_entropy.data[0].z[0][0] == pytest.approx(0.3)


def test_calibration_view_select(tmp_path):
    rows = [dict(question="q", answer="red", completion="", pred=p, correct=p == "red", prompt_id=i, step=st)
            for st in (3, 6) for i, p in enumerate(["red", "blue" if st == 3 else "red"])]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    last = Wd.load_eval_rows(path, "last")
    assert {r["step"] for r in last} == {6}
    v = Wd.CalibrationView({"start": Wd.load_eval_rows(path, "first"), "calibrl after": last})
    assert len(v.fig.data) == 5
    v.set_runs(["calibrl after"])
    assert len(v.fig.data) == 3 and v.fig.data[0].marker.color == F.METHOD_COLORS["calibrl"]
    np.testing.assert_allclose(v.fig.data[2].y, [1, 1])
    with pytest.raises(ValueError, match="labels"):
        v.set_runs(["nope"])


def test_dashboard_status_and_names_escape_run_values():
    d = Wd.TrainingDashboard()
    evil = "<script>alert(1)</script>"
    d.update(_row(1, mode=evil))
    assert "<script>" not in d.status.value and "&lt;script&gt;" in d.status.value
    assert all("<script>" not in (t.name or "") for t in d.fig.data)


def test_control_labels_not_cut_off():
    r, s = Wd.RarityExplorer(), Wd.SlopeExplorer()
    for control in (r.g_slider, r.k_slider, s.slider, s.adv_slider, s.coef_slider):
        assert control.style.description_width == "initial", control.description


def test_panes_show_the_current_figure_in_an_output():
    """What the browser gets: each pane's Output holds one plotly mimebundle equal to the figure after every update
    (no FigureWidget: tests/test_browser.py and calibrl.widgets.FigurePane say why)."""
    import ipywidgets
    import plotly.graph_objects as go

    w = Wd.SlopeExplorer()
    assert set(w.panes) == {"fig_gate", "fig_weights", "fig_grad"} and w.panes["fig_weights"].figure is w.fig
    assert not any(isinstance(c, go.FigureWidget) for c in w.widget.children)
    for slope in (0.5, 0.15):
        w.set_slope(slope)
        for name, pane in w.panes.items():
            assert isinstance(pane.widget, ipywidgets.Output) and len(pane.widget.outputs) == 1, name
            shown = pane.widget.outputs[0]["data"]["application/vnd.plotly.v1+json"]
            assert len(shown["data"]) == len(getattr(w, name).data), name
            assert pane.widget.layout.min_height == f"{getattr(w, name).layout.height}px", name
        z = w.panes["fig_weights"].widget.outputs[0]["data"]["application/vnd.plotly.v1+json"]["data"][3]["z"]
        z = np.array([[np.nan if v is None else v for v in row] for row in z], dtype=float)
        np.testing.assert_allclose(z, _z(w.fig.data[3]))
        assert sorted(set(z[~np.isnan(z)].round(6))) == [slope, 1.0]
    with pytest.raises(ValueError, match="fig"):
        Wd.FigurePane({"data": []})
