"""ipywidgets explorers and dashboards around `calibrl.figures` (the only module that imports ipywidgets).

Every widget keeps its controls (`slider`, ...) and its `plotly.graph_objects.Figure`s (`fig`, ..., each shown by a
`FigurePane` in `panes`) as attributes and exposes its callbacks (`set_slope`, `update`, ...), so it can be driven
without a browser: `w = SlopeExplorer(); w.set_slope(0.3); w.fig.data[3].z`. Display one with `display(w)` or as a
cell's last value.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from calibrl import figures as F
from calibrl import history

_LABELS = dict(style=dict(description_width="initial"))
"""Control descriptions at their natural width (the default 90 px cuts off "group size G")."""

DASHBOARD_METRICS = ("reward_mean", "acc_mean", "entropy_mean", "entropy_passed", "entropy_failed", "entropy_expert",
                     "uniform_frac", "abs_adv_mean", "gate_weight_mean", "expert_gap_q50", "cov_logp_adv",
                     "kl_to_start", "response_len_mean", "format_rate", "clipfrac", "grad_norm", "guide_loss",
                     "eval_greedy_acc", "eval_pass_at_k")
"""Metrics offered by the training dashboard's dropdown (contract names)."""


def sync_figure(widget: go.Figure, fig: go.Figure) -> None:
    """Make the figure `widget` (a go.Figure or FigureWidget) equal `fig`, in place: traces updated when the trace
    layout is unchanged, otherwise replaced; the layout follows."""
    same = len(widget.data) == len(fig.data) and all(a.type == b.type for a, b in zip(widget.data, fig.data))
    if same:
        with widget.batch_update():
            for old, new in zip(widget.data, fig.data):
                spec = new.to_plotly_json()
                spec.pop("type", None)
                spec.pop("uid", None)
                old.update(spec, overwrite=True)
            widget.layout.update(fig.layout.to_plotly_json(), overwrite=True)
    else:
        widget.data = ()
        widget.add_traces(list(fig.data))
        widget.layout = fig.layout


def _mimebundle(fig: go.Figure) -> dict:
    """What `display(fig)` would show: the renderers of `calibrl.notebook.setup()` (plotly's mimetype in JupyterLab
    and VS Code, HTML on Colab), or plotly's mimetype alone where no renderer is set (plain Python)."""
    bundle = fig._repr_mimebundle_()
    return bundle or pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())


class FigurePane:
    """A plotly figure shown in an `ipywidgets.Output`, redrawn whole by `show(fig)`.

    Not a `go.FigureWidget`: plotly 7's FigureWidget is an anywidget that sends its ~5 MB JavaScript bundle with every
    figure, and anywidget 0.11 gives a model 2 s to load it; past that the model drops every message from the
    kernel, so on a busy machine the figure stays blank and never follows its sliders (tests/test_browser.py saw
    this in 6 of 7 JupyterLab runs on the shared 2-core machine). An Output needs no widget JavaScript beyond
    ipywidgets' own: the notebook's plotly renderer draws the figure.
    `figure`: the go.Figure shown, updated in place; `widget`: the Output (its minimum height is the figure's, so
    a redraw does not make the page jump)."""

    def __init__(self, fig: go.Figure):
        if not isinstance(fig, go.Figure):
            raise ValueError(f"fig: expected a plotly go.Figure, got {type(fig).__name__}")
        self.figure = go.Figure(fig)
        self.widget = W.Output()
        self.draw()

    def show(self, fig: go.Figure) -> None:
        """Make `figure` equal `fig` and redraw it."""
        sync_figure(self.figure, fig)
        self.draw()

    def draw(self) -> None:
        height = self.figure.layout.height
        self.widget.layout.min_height = f"{int(height)}px" if height else None
        self.widget.outputs = ({"output_type": "display_data", "data": _mimebundle(self.figure), "metadata": {}},)


class _Widget:
    widget: W.Widget
    panes: dict[str, FigurePane]

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def _pane(self, name: str, fig: go.Figure) -> W.Output:
        """Show `fig` in a new pane; attribute `name` is the figure it keeps current. Returns the pane's Output."""
        if not hasattr(self, "panes"):
            self.panes = {}
        self.panes[name] = FigurePane(fig)
        setattr(self, name, self.panes[name].figure)
        return self.panes[name].widget

    def _show(self, name: str, fig: go.Figure) -> None:
        self.panes[name].show(fig)


def demo_batch(rows: int = 6, tokens: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """A small hand-made batch (for when no model batch is passed): policy log-probs near 0 (a confident policy),
    expert log-probs spread lower (off-policy expert text), alternating passed/failed rows, advantages of a group
    of `rows` with the passed half rewarded 1."""
    if rows < 2 or tokens < 1:
        raise ValueError(f"rows/tokens: expected rows >= 2 and tokens >= 1, got {rows}, {tokens}")
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(0.8, size=(rows, tokens))
    expert = -rng.exponential(1.5, size=(rows, tokens))
    passed = np.arange(rows) % 2 == 0
    adv = passed.astype(float) - passed.mean()
    mask = np.ones((rows, tokens), dtype=bool)
    for r in range(rows):
        mask[r, tokens - (r % 3) * max(1, tokens // 6):] = False
    return dict(logp=logp, expert_logp=expert, passed=passed, adv=adv, mask=mask)


def _np(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class SlopeExplorer(_Widget):
    """The LeakyReLU slope α (first control) and the guidance knobs, over a batch of policy and expert log-probs.

    Figures: `fig_gate` (the gate function, scaled by the |A| control), `fig` = `fig_weights` (per-token weights
    1 vs α, trace 3 is the weight heatmap), `fig_grad` (guide coefficient λ·s·|A|·w per token, trace 0).
    Callbacks: `set_slope`, `set_abs_adv`, `set_guide_coef`, `set_weight`, `update`."""

    def __init__(self, logp: Any = None, expert_logp: Any = None, passed: Any = None, adv: Any = None,
                 mask: Any = None, *, slope: float = 0.5, abs_adv: float = 0.5, guide_coef: float = 0.1,
                 weight: str = "abs-adv"):
        if logp is None:
            b = demo_batch()
            logp, expert_logp, passed, adv, mask = b["logp"], b["expert_logp"], b["passed"], b["adv"], b["mask"]
        if expert_logp is None or passed is None or adv is None:
            raise ValueError("expert_logp/passed/adv: expected all of them with logp (or none of them)")
        self.batch = dict(logp=_np(logp), expert_logp=_np(expert_logp), passed=_np(passed).astype(bool),
                          adv=_np(adv).astype(float), mask=None if mask is None else _np(mask).astype(bool))
        F.grad_weights(**self._args(slope, guide_coef, weight))  # validates the batch once
        self.slider = W.FloatSlider(value=slope, min=0.0, max=1.0, step=0.05, description="slope α", **_LABELS,
                                    continuous_update=True, readout_format=".2f")
        self.adv_slider = W.FloatSlider(value=abs_adv, min=0.0, max=1.0, step=0.05, description="|A| (gate)", **_LABELS)
        self.coef_slider = W.FloatSlider(value=guide_coef, min=0.0, max=1.0, step=0.05, description="λ guide", **_LABELS)
        self.weight_toggle = W.ToggleButtons(options=["abs-adv", "none"], value=weight, description="weight", **_LABELS)
        panes = [self._pane("fig_gate", F.fig_gate(slope, abs_adv=abs_adv)),
                 self._pane("fig_weights", F.fig_token_weights(**self._args(slope))),
                 self._pane("fig_grad", F.fig_grad_weights(**self._args(slope, guide_coef, weight)))]
        self.fig = self.fig_weights
        for control in (self.slider, self.adv_slider, self.coef_slider, self.weight_toggle):
            control.observe(self.update, names="value")
        self.widget = W.VBox([W.HBox([self.slider, self.adv_slider]), W.HBox([self.coef_slider, self.weight_toggle]),
                              *panes])

    def _args(self, slope: float, guide_coef: float | None = None, weight: str | None = None) -> dict:
        b = self.batch
        args = dict(logp=b["logp"], expert_logp=b["expert_logp"], passed=b["passed"], slope=slope, mask=b["mask"])
        if guide_coef is not None:
            args.update(adv=b["adv"], guide_coef=guide_coef, weight=weight)
        return args

    @property
    def slope(self) -> float:
        return float(self.slider.value)

    def weights(self) -> np.ndarray:
        """The plotted per-token gate weights at the current slope ([B, T], NaN where masked)."""
        return F.gate_weights(self.batch["logp"], self.batch["expert_logp"], self.batch["passed"], self.slope,
                              self.batch["mask"])

    def set_slope(self, value: float) -> None:
        """Move the α slider (figures update through its observer)."""
        self.slider.value = value

    def set_abs_adv(self, value: float) -> None:
        self.adv_slider.value = value

    def set_guide_coef(self, value: float) -> None:
        self.coef_slider.value = value

    def set_weight(self, value: str) -> None:
        self.weight_toggle.value = value

    def update(self, change: Any = None) -> None:
        """Recompute all three figures from the controls and update their traces in place."""
        s, coef, weight = self.slope, float(self.coef_slider.value), self.weight_toggle.value
        self._show("fig_gate", F.fig_gate(s, abs_adv=float(self.adv_slider.value)))
        self._show("fig_weights", F.fig_token_weights(**self._args(s)))
        self._show("fig_grad", F.fig_grad_weights(**self._args(s, coef, weight)))


class RarityExplorer(_Widget):
    """Group size G and number of passes k -> the group's advantages (calibrl.advantage.group_advantages on rewards
    1 for passes, 0 otherwise), |A| = the guidance weight, and |A| against k. Callbacks: `set_group`, `update`;
    results in `advantages`, `passed` and `fig` (traces as in `calibrl.figures.fig_rarity`)."""

    def __init__(self, group_size: int = 8, passes: int = 2, *, scale: str = "none"):
        if not isinstance(group_size, int) or not 2 <= group_size <= 32:
            raise ValueError(f"group_size: expected an integer in [2, 32], got {group_size!r}")
        if not isinstance(passes, int) or not 0 <= passes <= group_size:
            raise ValueError(f"passes: expected an integer in [0, group_size={group_size}], got {passes!r}")
        if scale not in ("none", "group"):
            raise ValueError(f"scale: expected 'none' or 'group', got {scale!r}")
        self.g_slider = W.IntSlider(value=group_size, min=2, max=32, description="group size G", **_LABELS)
        self.k_slider = W.IntSlider(value=passes, min=0, max=group_size, description="passes k", **_LABELS)
        self.scale_toggle = W.ToggleButtons(options=["none", "group"], value=scale, description="scale", **_LABELS)
        self.advantages, self.passed = self.compute(group_size, passes, scale)
        pane = self._pane("fig", self._figure())
        self.g_slider.observe(self._on_group_size, names="value")
        self.k_slider.observe(self.update, names="value")
        self.scale_toggle.observe(self.update, names="value")
        self.widget = W.VBox([W.HBox([self.g_slider, self.k_slider, self.scale_toggle]), pane])

    @staticmethod
    def compute(group_size: int, passes: int, scale: str = "none"):
        """(advantages [G] tensor, passed [G] bool tensor) of one group with `passes` rewards of 1, the rest 0."""
        import torch

        from calibrl.advantage import group_advantages

        rewards = torch.tensor([1.0] * passes + [0.0] * (group_size - passes))
        adv = group_advantages(rewards, torch.zeros(group_size, dtype=torch.long), scale=scale)
        return adv, rewards > 0.5

    def _figure(self) -> go.Figure:
        g, scale = int(self.g_slider.value), self.scale_toggle.value
        ks = list(range(g + 1))
        a_pass, a_fail = [], []
        for k in ks:
            adv, passed = self.compute(g, k, scale)
            a_pass.append(float(adv[passed].abs()[0]) if passed.any() else None)
            a_fail.append(float(adv[~passed].abs()[0]) if (~passed).any() else None)
        curve = dict(k=ks, abs_adv_passed=a_pass, abs_adv_failed=a_fail, current_k=int(self.k_slider.value))
        return F.fig_rarity(self.advantages.numpy(), self.passed.numpy(), curve=curve)

    def set_group(self, group_size: int | None = None, passes: int | None = None) -> None:
        """Move the G and/or k sliders (k is clipped to G)."""
        if group_size is not None:
            self.g_slider.value = group_size
        if passes is not None:
            self.k_slider.value = passes

    def _on_group_size(self, change: Any) -> None:
        self.k_slider.max = int(self.g_slider.value)  # clamps k, which may call update itself
        self.update()

    def update(self, change: Any = None) -> None:
        """Recompute the advantages for the current G, k, scale and update the figure in place."""
        self.advantages, self.passed = self.compute(int(self.g_slider.value), int(self.k_slider.value),
                                                    self.scale_toggle.value)
        self._show("fig", self._figure())


def _placeholder(title: str) -> go.Figure:
    return go.Figure(layout=dict(title=title, template="plotly_white", height=250))


class TrainingDashboard(_Widget):
    """Curves (a metric per step per mode, seed bands), the token-entropy heatmap of sampled responses, and gate
    activation by branch, over History rows. Live: pass `dash.update` as the trainer's `on_step` callback (with
    `watch(run_dir)` the heatmap follows runs/<name>/samples.jsonl); saved runs: `TrainingDashboard.from_runs(dirs)`.
    Figures: `fig` (curves), `fig_entropy`, `fig_gate`. Callbacks: `update(row)`, `set_metric`, `set_step`."""

    def __init__(self, rows: Any = None, *, samples: Sequence[Mapping] | None = None, metric: str = "reward_mean",
                 metrics: Sequence[str] = DASHBOARD_METRICS):
        self.rows: list[dict] = [] if rows is None else F.to_frame(rows).replace({np.nan: None}).to_dict("records")
        self.samples: list[dict] = list(samples or [])
        self.run_dir: Path | None = None
        options = list(dict.fromkeys([metric, *metrics]))
        self.metric_dropdown = W.Dropdown(options=options, value=metric, description="metric", **_LABELS)
        self.step_slider = W.IntSlider(value=0, min=0, max=0, description="sample step", **_LABELS)
        self.status = W.HTML()
        curves = self._pane("fig", _placeholder("waiting for the first step"))
        entropy = self._pane("fig_entropy", _placeholder("no sampled responses yet"))
        gate = self._pane("fig_gate", _placeholder("no gate activation yet"))
        self.metric_dropdown.observe(lambda _: self.refresh_curves(), names="value")
        self.step_slider.observe(lambda _: self.refresh_entropy(), names="value")
        self.widget = W.VBox([W.HBox([self.metric_dropdown, self.status]), curves, self.step_slider, entropy, gate])
        self.refresh()

    @classmethod
    def from_runs(cls, run_dirs: Sequence[str | Path], **kwargs: Any) -> "TrainingDashboard":
        """A dashboard over saved runs (runs/<name>/ with history.jsonl and samples.jsonl); the heatmap shows the
        samples of the last run given."""
        from calibrl.history import History

        if not run_dirs:
            raise ValueError("run_dirs: expected at least one run directory")
        hists = [History.load(d) for d in run_dirs]
        return cls(hists, samples=hists[-1].samples(), **kwargs)

    def watch(self, run_dir: str | Path) -> "TrainingDashboard":
        """Read sampled responses from run_dir/samples.jsonl on every `update` (live training)."""
        self.run_dir = Path(run_dir)
        return self

    def set_metric(self, metric: str) -> None:
        self.metric_dropdown.value = metric

    def set_step(self, step: int) -> None:
        self.step_slider.value = step

    def update(self, row: Mapping, samples: Sequence[Mapping] | None = None) -> None:
        """Append one History row (and optional samples rows) and refresh every figure; usable as `on_step`."""
        if not isinstance(row, Mapping) or "step" not in row:
            raise ValueError(f"row: expected a History row dict with a 'step' key, got {type(row).__name__}")
        self.rows.append(dict(row))
        if samples is not None:
            self.samples.extend(samples)
        elif self.run_dir is not None:
            self.samples = history.read_jsonl(self.run_dir / "samples.jsonl")
        self.refresh()

    def refresh(self) -> None:
        """Redraw curves, heatmap and gate figures from `rows` and `samples`."""
        self.refresh_curves()
        steps = sorted({r["step"] for r in self.samples})
        if steps:
            at_end = self.step_slider.value in (0, self.step_slider.max)
            sl = self.step_slider
            sl.max = max(sl.min, steps[-1])
            sl.min, sl.max = steps[0], steps[-1]
            if at_end:
                self.step_slider.value = steps[-1]
        self.refresh_entropy()
        try:
            self._show("fig_gate", F.fig_gate_branches(self.rows))
        except ValueError:
            pass  # no CalibRL gate values yet: keep the placeholder
        last = self.rows[-1] if self.rows else {}
        self.status.value = (f"<b>{len(self.rows)}</b> rows; last: step {html.escape(str(last.get('step')))} "
                             f"{html.escape(str(last.get('mode', '')))}" if self.rows else "no rows yet")

    def refresh_curves(self) -> None:
        metric = self.metric_dropdown.value
        try:
            self._show("fig", F.fig_curves(self.rows, metric))
        except ValueError as err:
            self._show("fig", _placeholder(f"{metric}: {err}" if self.rows else "waiting for the first step"))

    def refresh_entropy(self) -> None:
        steps = {r["step"] for r in self.samples}
        if not steps:
            return
        step = self.step_slider.value if self.step_slider.value in steps else max(steps)
        self._show("fig_entropy", F.fig_entropy_heatmap(self.samples, step=step))


def load_eval_rows(path: str | Path, step: int | str | None = None) -> list[dict]:
    """Eval JSONL rows (the `eval --out` / runs/<name>/eval.jsonl schema); `step` keeps rows of that step
    ("first", "last" or an int) when the rows carry one."""
    rows = history.read_jsonl(path)
    if not rows:
        raise ValueError(f"path: expected eval JSONL rows in {path}, found none")
    steps = sorted({r["step"] for r in rows if "step" in r})
    if step is None or not steps:
        return rows
    want = steps[0] if step == "first" else steps[-1] if step == "last" else step
    if want not in steps:
        raise ValueError(f"step: expected 'first', 'last' or one of {steps}, got {step!r}")
    return [r for r in rows if r.get("step") == want]


class CalibrationView(_Widget):
    """The policy's answers against the gold answer, before/after training and per method, from eval JSONL rows:
    `CalibrationView({"start": rows0, "grpo after": rows1, "calibrl after": rows2})`. A multi-select picks the
    runs shown; callback `set_runs(labels)`; figure `fig` (traces as in `calibrl.figures.fig_calibration`)."""

    def __init__(self, runs: Mapping[str, Sequence[Mapping]]):
        if not runs:
            raise ValueError("runs: expected at least one label -> eval rows entry")
        self.runs = {str(k): list(v) for k, v in runs.items()}
        self.select = W.SelectMultiple(options=list(self.runs), value=tuple(self.runs), description="runs", **_LABELS,
                                       rows=min(6, len(self.runs)))
        pane = self._pane("fig", F.fig_calibration(self.runs))
        self.select.observe(self.update, names="value")
        self.widget = W.VBox([self.select, pane])

    @classmethod
    def from_files(cls, paths: Mapping[str, str | Path], step: int | str | None = "last") -> "CalibrationView":
        """Labels -> eval JSONL files (rows of `step` when the files carry steps)."""
        return cls({label: load_eval_rows(p, step) for label, p in paths.items()})

    def set_runs(self, labels: Sequence[str]) -> None:
        unknown = [lab for lab in labels if lab not in self.runs]
        if unknown or not labels:
            raise ValueError(f"labels: expected a non-empty subset of {list(self.runs)}, got {list(labels)}")
        self.select.value = tuple(labels)

    def update(self, change: Any = None) -> None:
        chosen = self.select.value or tuple(self.runs)
        self._show("fig", F.fig_calibration({k: self.runs[k] for k in chosen}))
