"""Figures over training runs: metric curves with seed bands, the entropy heatmap of sampled responses, gate
activation by branch, the pass-rate histogram and the calibration view. Data in, `go.Figure` out.

Inputs are History rows (runs/<name>/history.jsonl columns), samples.jsonl rows and eval JSONL rows. Import these
from `calibrl.figures` (re-exported there); colours come from `calibrl.palette`, confidence intervals from
`calibrl.stats`. Every curve: nulls drawn as gaps, bands clipped to the metric's range, n (seeds) in the legend,
ticks on whole steps.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from calibrl.palette import FAILED_COLOR, FAILED_LIGHT, PASSED_COLOR, PASSED_LIGHT, REFERENCE_COLOR, method_color
from calibrl.stats import mean_ci, metric_range

GATE_BRANCHES = (
    ("gate_passed_below", "passed, log π < e_t (w=1)", "passed"),
    ("gate_passed_above", "passed, log π ≥ e_t (w=α)", "passed"),
    ("gate_failed_above", "failed, log π > e_t (w=1)", "failed"),
    ("gate_failed_below", "failed, log π ≤ e_t (w=α)", "failed"),
)


def _branch_colors() -> list[str]:
    return [PASSED_COLOR, PASSED_LIGHT, FAILED_COLOR, FAILED_LIGHT]


SPARSE_PREFIXES = ("eval_",)
"""Metrics logged only on some steps (held-out evaluation): there a null means "not measured at this step" and the
measured points are joined. For every other metric a null means "undefined at this step" (e.g. gate fractions when
every group was uniform) and is drawn as a gap, never as 0."""
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0.0)
"""Legend under the plot area: never over lines, colorbars or axis labels."""


def int_step_axis(steps: Sequence[float]) -> dict:
    """x-axis settings for RL steps: ticks on whole steps only (1, 2, 5, 10, ... apart, about 8 ticks), never 1.5."""
    vals = [float(s) for s in steps if s is not None and s == s]
    span = (max(vals) - min(vals)) if vals else 1.0
    dtick = min(d for d in (m * 10 ** p for p in range(7) for m in (1, 2, 5)) if span / d <= 8)
    return dict(tickmode="linear", tick0=0, dtick=dtick, tickformat="d")


def to_frame(data: Any, *, config_keys: Sequence[str] = ("loss.slope",)) -> pd.DataFrame:
    """One DataFrame from a History, a run directory path, a DataFrame, a list of row dicts, or a list of these.
    Adds a `run` column (run name or position) and, for Histories, columns for `config_keys` (dotted paths into
    config.json, named by their last part, e.g. `slope`)."""
    items = list(data) if isinstance(data, (list, tuple)) and data and not isinstance(data[0], dict) else [data]
    frames = []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            from calibrl.history import History

            item = History.load(item)
        if isinstance(item, pd.DataFrame):
            df = item.copy()
        elif isinstance(item, list):
            df = pd.DataFrame(item)
        elif hasattr(item, "rows") and hasattr(item, "config"):
            df = pd.DataFrame(item.rows)
            for key in config_keys:
                val: Any = item.config
                for part in key.split("."):
                    val = val.get(part) if isinstance(val, dict) else None
                df[key.split(".")[-1]] = val
            df["run"] = getattr(item, "name", str(i))
            for key in ("mode", "seed"):  # from config.json when the rows do not carry them
                if key not in df.columns:
                    df[key] = getattr(item, key, None)
        else:
            raise ValueError(f"data: expected a History, run directory, DataFrame or list of rows, got "
                             f"{type(item).__name__}")
        if "run" not in df.columns:
            df["run"] = str(i)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    if df.empty or "step" not in df.columns:
        raise ValueError(f"data: expected history rows with a 'step' column, got columns {list(df.columns)}")
    return df


def mean_ci_by_step(df: pd.DataFrame, metric: str, *, clamp: bool = True) -> pd.DataFrame:
    """Per step of `df`: mean of `metric` over runs, n (runs with a value at that step), and the 95% CI
    (`calibrl.stats.mean_ci`, Student t; half-width 0 for n = 1), clipped to the metric's range
    (`calibrl.stats.metric_range`) unless `clamp=False`. Steps where no run logged a value keep a row with n = 0
    and null mean/lo/hi, so a figure can draw them as gaps."""
    if metric not in df.columns:
        raise ValueError(f"metric: {metric!r} is not a history column (have {sorted(df.columns)})")
    lo_b, hi_b = metric_range(metric) if clamp else (-math.inf, math.inf)
    out = []
    for step, vals in df.groupby("step")[metric]:
        v = pd.to_numeric(vals, errors="coerce").dropna().to_numpy(dtype=float)
        if v.size == 0:
            out.append(dict(step=step, mean=None, n=0, lo=None, hi=None))
            continue
        ci = mean_ci(v)
        m, half = ci["mean"], ci["half"] or 0.0  # one seed: no interval, the band collapses onto the line
        out.append(dict(step=step, mean=m, n=int(v.size), lo=max(m - half, lo_b), hi=min(m + half, hi_b)))
    return pd.DataFrame(out, columns=["step", "mean", "n", "lo", "hi"])


def _segments(stats: pd.DataFrame) -> list[pd.DataFrame]:
    """Runs of consecutive steps with a value (n > 0)."""
    ok = (stats["n"] > 0).to_numpy()
    segs, start = [], None
    for i, flag in enumerate(list(ok) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            segs.append(stats.iloc[start:i])
            start = None
    return segs


def add_series(fig: go.Figure, df: pd.DataFrame, metric: str, *, name: str, color: str, dash: str = "solid",
               ci: bool = True, legendgroup: str | None = None, row: int | None = None, col: int | None = None) -> bool:
    """Add the mean of `metric` over the runs in `df` (one line, hover shows n) and, with several seeds and `ci`,
    a band of the 95% CI clipped to the metric's range (a trace just before the line). Nulls are gaps except for
    `SPARSE_PREFIXES` metrics, whose measured points are joined. Returns False when there is nothing to draw."""
    stats = mean_ci_by_step(df, metric)
    if not (stats["n"] > 0).any():
        return False
    if metric.startswith(SPARSE_PREFIXES):
        stats = stats[stats["n"] > 0]
    n_seeds = int(df["seed"].nunique()) if "seed" in df.columns and df["seed"].notna().any() else \
        int(df["run"].nunique()) if "run" in df.columns else 1
    where = {} if row is None else dict(row=row, col=col)
    name = html.escape(name)  # names come from run files: plotly renders a subset of HTML in legend text
    group = html.escape(legendgroup) if legendgroup else name
    if ci and n_seeds > 1:
        xs: list = []
        ys: list = []
        for seg in _segments(stats):  # one closed band per run of steps with values; None separates them
            sep = [None] if xs else []
            xs += sep + list(seg.step) + list(seg.step[::-1])
            ys += sep + list(seg.hi) + list(seg.lo[::-1])
        fig.add_trace(go.Scatter(x=xs, y=ys, fill="toself", fillcolor=color, opacity=0.18, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, legendgroup=group, name=f"{name} 95% CI"),
                      **where)
    label = f"{name} (n={n_seeds} seed{'s' if n_seeds != 1 else ''}" + (", mean ± 95% CI)" if ci and n_seeds > 1
                                                                          else ")")
    mean = [None if v is None or v != v else float(v) for v in stats["mean"]]
    fig.add_trace(go.Scatter(x=list(stats.step), y=mean, customdata=list(stats.n), connectgaps=False,
                             mode="lines+markers" if len(stats) < 40 else "lines", name=label, legendgroup=group,
                             line=dict(color=color, dash=dash), marker=dict(size=6),
                             hovertemplate="step %{x}: %{y:.4g} (n=%{customdata})<extra>" + name + "</extra>"),
                  **where)
    return True


def _chance_line(fig: go.Figure, chance: float | None, metric: str) -> None:
    if chance is None:
        return
    lo, hi = metric_range(metric)
    if not isinstance(chance, (int, float)) or isinstance(chance, bool) or not (lo <= chance <= hi):
        raise ValueError(f"chance: expected a number in the range of {metric} [{lo}, {hi}], got {chance!r}")
    fig.add_hline(y=float(chance), line=dict(color=REFERENCE_COLOR, dash="dot"),
                  annotation_text=f"chance {chance:g}", annotation_position="bottom right")


def _layout(fig: go.Figure, df: pd.DataFrame, *, title: str, ytitle: str, metric: str, height: int = 420) -> None:
    lo, hi = metric_range(metric)
    fig.update_layout(title=title, xaxis_title="RL step", yaxis_title=ytitle, template="plotly_white",
                      height=height, legend=LEGEND_BELOW, margin=dict(l=60, r=20, t=60, b=110))
    steps = pd.to_numeric(df["step"], errors="coerce").dropna()
    pad = 0.03 * max(float(steps.max() - steps.min()), 1.0)
    fig.update_xaxes(range=[float(steps.min()) - pad, float(steps.max()) + pad], **int_step_axis(steps.tolist()))
    if (lo, hi) == (0.0, 1.0):
        fig.update_yaxes(range=[-0.02, 1.02])


def fig_curves(data: Any, metric: str, *, by: str = "mode", ci: bool = True, title: str | None = None,
               chance: float | None = None) -> go.Figure:
    """`metric` against RL step, one line per value of column `by` (default the mode), in the method's colour
    (groups of the same method get different dashes). Where a group has several seeds, the line is the mean and a
    shaded band (a trace just before the line) is the 95% CI across seeds, clipped to the metric's range; the
    legend names n (seeds). Nulls are gaps (see `SPARSE_PREFIXES`). `chance`: a dotted reference line (e.g. the
    accuracy of guessing)."""
    df = to_frame(data)
    if by not in df.columns:
        raise ValueError(f"by: {by!r} is not a column (have {sorted(df.columns)})")
    if metric not in df.columns:
        raise ValueError(f"metric: {metric!r} is not a history column (have {sorted(df.columns)})")
    fig = go.Figure()
    if df[metric].isna().all():  # logged as null at every step (e.g. no passed rows yet): an empty, labelled figure
        _layout(fig, df, title=f"{metric}: no values logged in these histories", ytitle=metric, metric=metric)
        return fig
    dashes, used = ("solid", "dash", "dot", "dashdot", "longdash"), {}
    for group, sub in df.groupby(by, sort=False):
        mode = str(sub["mode"].iloc[0]) if "mode" in sub.columns else str(group)
        color = method_color(mode)
        dash = dashes[used.get(color, 0) % len(dashes)]
        if add_series(fig, sub, metric, name=str(group), color=color, dash=dash, ci=ci):
            used[color] = used.get(color, 0) + 1
    _chance_line(fig, chance, metric)
    _layout(fig, df, title=title or f"{metric} per RL step", ytitle=metric, metric=metric)
    return fig


def fig_panel(data: Any, metrics: Sequence[tuple[str, str, str]], *, title: str, ytitle: str, by: str = "mode",
              chance: float | None = None, height: int = 380) -> go.Figure:
    """Several related metrics in one figure (the report's panels): for each group of `by` (method colour) and each
    `(metric, label suffix, dash)`, the mean over seeds with its clipped 95% band, n in the legend."""
    df = to_frame(data)
    if by not in df.columns:
        raise ValueError(f"by: {by!r} is not a column (have {sorted(df.columns)})")
    fig = go.Figure()
    for group, sub in df.groupby(by, sort=False):
        for metric, suffix, dash in metrics:
            if metric in sub.columns:
                add_series(fig, sub, metric, name=f"{group}{suffix}", color=method_color(str(group)), dash=dash,
                           legendgroup=f"{group}{suffix}")
    _chance_line(fig, chance, metrics[0][0])
    _layout(fig, df, title=title, ytitle=ytitle, metric=metrics[0][0], height=height)
    return fig


def fig_entropy_heatmap(samples: Sequence[Mapping], *, step: int | None = None, max_rows: int = 16) -> go.Figure:
    """Token entropy of sampled responses (samples.jsonl rows) at one step (default: the last): one heatmap row per
    response, one column per token, the token text on hover, ✓/✗ for passed/failed in the row label."""
    rows = list(samples)
    if not rows:
        raise ValueError("samples: expected at least one samples.jsonl row, got none")
    for key in ("step", "tokens", "entropy"):
        if key not in rows[0]:
            raise ValueError(f"samples: rows need a {key!r} key, got keys {sorted(rows[0])}")
    steps = sorted({r["step"] for r in rows})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"step: expected one of the sampled steps {steps}, got {step!r}")
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows: expected an integer >= 1, got {max_rows!r}")
    sel = [r for r in rows if r["step"] == step][:max_rows]
    width = max(len(r["entropy"]) for r in sel) or 1
    z = [[float(h) for h in r["entropy"]] + [None] * (width - len(r["entropy"])) for r in sel]
    text = [[html.escape(str(t)) for t in r["tokens"]] + [""] * (width - len(r["tokens"])) for r in sel]
    ylab = [html.escape(f"#{i} p{r.get('prompt_id', '?')} {'✓' if r.get('passed') else '✗'}") for i, r in enumerate(sel)]
    fig = go.Figure(go.Heatmap(z=z, text=text, y=ylab, colorscale="Viridis", colorbar=dict(title="entropy"),
                               hovertemplate="%{y}, token %{x}: '%{text}'<br>entropy %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Token entropy of sampled responses, step {step}", xaxis_title="token position",
                      yaxis_title="sampled response", yaxis_autorange="reversed", template="plotly_white",
                      height=max(320, 170 + 28 * len(sel)))
    return fig


def fig_gate_branches(data: Any, *, mode: str | None = "calibrl") -> go.Figure:
    """Gate activation by branch over steps (mean over seeds, clipped 95% band with several seeds): left, the share
    of passed-row tokens below (w=1) / above (w=α) the expert (traces 0, 1, or with bands 0-3); right, failed-row
    tokens above (w=1) / below (w=α). Lines, not stacked areas: a step where every group was uniform has no gate
    value and is a gap, never 0. Rows of `mode` only (None: all rows)."""
    df = to_frame(data)
    if mode is not None and "mode" in df.columns:
        df = df[df["mode"] == mode]
    cols = [c for c, _, _ in GATE_BRANCHES]
    missing = [c for c in cols if c not in df.columns]
    if df.empty or missing:
        raise ValueError(f"data: expected gate columns {cols} in rows of mode {mode!r} (missing {missing or 'rows'})")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=("passed rows", "failed rows"),
                        horizontal_spacing=0.06)
    what = mode or "all modes"
    if df[cols].isna().all().all():  # every group uniform so far: no gate activity to show
        fig.update_layout(title=f"Gate activation by branch ({what}): no values logged (only uniform groups)",
                          template="plotly_white")
        return fig
    for (col, label, group), color, dash in zip(GATE_BRANCHES, _branch_colors(), ("solid", "dash") * 2):
        add_series(fig, df, col, name=label, color=color, dash=dash, row=1, col=1 if group == "passed" else 2)
    steps = df["step"].tolist()
    for c in (1, 2):
        fig.update_xaxes(title_text="RL step", row=1, col=c, **int_step_axis(steps))
    fig.update_yaxes(title_text="fraction of tokens", range=[-0.02, 1.02], row=1, col=1)
    fig.update_layout(title=f"Gate activation by branch ({what})", template="plotly_white", height=420,
                      legend=LEGEND_BELOW, margin=dict(l=60, r=20, t=70, b=120))
    return fig


def fig_rarity_hist(pass_rates: Any, *, group_size: int | None = None) -> go.Figure:
    """Histogram of per-group pass rates (k/G), one overlaid trace per label when given a dict label -> rates
    (method colours). Groups at 0 or 1 are uniform: they carry no advantage and no CalibRL guidance."""
    series = dict(pass_rates) if isinstance(pass_rates, Mapping) else {"groups": pass_rates}
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size: expected an integer >= 1, got {group_size!r}")
    fig = go.Figure()
    for label, rates in series.items():
        r = np.asarray(rates.detach().cpu() if hasattr(rates, "detach") else rates, dtype=float).ravel()
        if r.size == 0 or not np.isfinite(r).all() or (r < 0).any() or (r > 1).any():
            raise ValueError(f"pass_rates[{label!r}]: expected a non-empty array of finite values in [0, 1]")
        bins = dict(start=-0.5 / group_size, end=1 + 0.5 / group_size, size=1 / group_size) if group_size else None
        fig.add_trace(go.Histogram(x=r, name=html.escape(str(label)), marker_color=method_color(str(label)), opacity=0.6, xbins=bins))
    fig.update_layout(title="Group pass rates (0 and 1: uniform groups, no signal)", barmode="overlay",
                      xaxis_title="group pass rate k/G", yaxis_title="groups", template="plotly_white", height=420,
                      legend=LEGEND_BELOW, margin=dict(l=70, r=30, t=70, b=110))
    return fig


def fig_calibration(runs: Mapping[str, Sequence[Mapping]]) -> go.Figure:
    """Calibration view over eval JSONL rows (question, answer = gold, pred, correct, prompt_id), one entry per
    run label (e.g. "start", "grpo after", "calibrl after"). Left: the share of each answer value among the
    policy's answers per run (traces 0..n-1) and among the gold answers (trace n, expert colour). Right: per
    prompt, the share of the policy's samples that agree with the gold answer (traces n+1..2n)."""
    if not runs:
        raise ValueError("runs: expected at least one label -> eval rows entry")
    frames = {}
    for label, rows in runs.items():
        df = pd.DataFrame(list(rows))
        missing = [c for c in ("answer", "pred", "correct", "prompt_id") if c not in df.columns]
        if df.empty or missing:
            raise ValueError(f"runs[{label!r}]: expected eval rows with answer, pred, correct, prompt_id "
                             f"(missing {missing or 'rows'})")
        df["value"] = df["pred"].map(lambda p: "(no answer)" if p is None or p != p else str(p).strip())
        frames[label] = df
    first = next(iter(frames.values()))
    gold = first.drop_duplicates("prompt_id")["answer"].astype(str).str.strip()
    values = sorted(set(gold) | {v for df in frames.values() for v in df["value"]}, key=lambda v: (v == "(no answer)", v))
    ticks = [html.escape(v) for v in values]  # answers come from eval files: text, never markup
    fig = make_subplots(rows=1, cols=2, subplot_titles=("answer distribution", "agreement with gold per prompt"))
    for label, df in frames.items():
        share = df["value"].value_counts(normalize=True)
        fig.add_trace(go.Bar(x=ticks, y=[float(share.get(v, 0.0)) for v in values], name=html.escape(str(label)),
                             marker_color=method_color(str(label)), legendgroup=str(label)), row=1, col=1)
    gshare = gold.value_counts(normalize=True)
    fig.add_trace(go.Bar(x=ticks, y=[float(gshare.get(v, 0.0)) for v in values], name="gold (expert)",
                         marker_color=method_color("expert"), marker_pattern_shape="/"), row=1, col=1)
    for label, df in frames.items():
        agree = df.groupby("prompt_id")["correct"].mean().sort_index()
        fig.add_trace(go.Scatter(x=agree.index, y=agree.values, mode="markers+lines", name=html.escape(f"{label} agreement"),
                                 marker_color=method_color(str(label)), legendgroup=str(label), showlegend=False),
                      row=1, col=2)
    fig.update_xaxes(title_text="answer", row=1, col=1)
    fig.update_yaxes(title_text="share of answers", row=1, col=1)
    fig.update_xaxes(title_text="prompt id", row=1, col=2)
    fig.update_yaxes(title_text="share agreeing with gold", range=[-0.02, 1.02], row=1, col=2)
    fig.update_layout(title="Calibration: the policy's answers vs the gold answer", barmode="group",
                      template="plotly_white", height=500, legend=LEGEND_BELOW, margin=dict(l=70, r=30, t=80, b=120))
    return fig
