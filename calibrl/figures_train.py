"""Figures over training runs: metric curves with seed bands, the entropy heatmap of sampled responses, gate
activation by branch, the pass-rate histogram and the calibration view. Data in, `go.Figure` out.

Inputs are History rows (runs/<name>/history.jsonl, metric names in the team contract), samples.jsonl rows and eval
JSONL rows. Import these from `calibrl.figures` (re-exported there with METHOD_COLORS).
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

_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Two-sided 95% Student-t quantiles for 1..30 degrees of freedom (1.96 beyond)."""
GATE_BRANCHES = (
    ("gate_passed_below", "passed, log π < e_t (w=1)", "passed"),
    ("gate_passed_above", "passed, log π ≥ e_t (w=α)", "passed"),
    ("gate_failed_above", "failed, log π > e_t (w=1)", "failed"),
    ("gate_failed_below", "failed, log π ≤ e_t (w=α)", "failed"),
)


def _color(name: str) -> str:
    from calibrl.figures import method_color  # lazy: calibrl.figures imports this module

    return method_color(name)


def _branch_colors() -> list[str]:
    from calibrl import figures as f

    return [f.PASSED_COLOR, f.PASSED_LIGHT, f.FAILED_COLOR, f.FAILED_LIGHT]


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


def mean_ci_by_step(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per step: mean of `metric` over runs, n, and the 95% CI (Student t; half-width 0 for n = 1).
    Null values (steps where the metric was not logged) are dropped."""
    if metric not in df.columns:
        raise ValueError(f"metric: {metric!r} is not a history column (have {sorted(df.columns)})")
    sub = df[["step", metric]].dropna()
    out = []
    for step, vals in sub.groupby("step")[metric]:
        v = vals.to_numpy(dtype=float)
        n, m = len(v), float(v.mean())
        half = 0.0 if n < 2 else (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * float(v.std(ddof=1)) / math.sqrt(n)
        out.append(dict(step=step, mean=m, n=n, lo=m - half, hi=m + half))
    return pd.DataFrame(out, columns=["step", "mean", "n", "lo", "hi"])


def fig_curves(data: Any, metric: str, *, by: str = "mode", ci: bool = True, title: str | None = None) -> go.Figure:
    """`metric` against RL step, one line per value of column `by` (default the mode), in the method's colour
    (groups of the same method get different dashes). Where a group has several seeds, the line is the mean and a
    shaded band (a trace just before the line) is the 95% CI across seeds."""
    df = to_frame(data)
    if by not in df.columns:
        raise ValueError(f"by: {by!r} is not a column (have {sorted(df.columns)})")
    if metric not in df.columns:
        raise ValueError(f"metric: {metric!r} is not a history column (have {sorted(df.columns)})")
    fig = go.Figure()
    if df[metric].isna().all():  # logged as null at every step (e.g. no passed rows yet): an empty, labelled figure
        fig.update_layout(title=f"{metric}: no values logged in these histories", xaxis_title="RL step",
                          yaxis_title=metric, template="plotly_white")
        return fig
    dashes, used = ("solid", "dash", "dot", "dashdot", "longdash"), {}
    for group, sub in df.groupby(by, sort=False):
        mode = str(sub["mode"].iloc[0]) if "mode" in sub.columns else str(group)
        color = _color(mode)
        dash = dashes[used.get(color, 0) % len(dashes)]
        used[color] = used.get(color, 0) + 1
        stats = mean_ci_by_step(sub, metric)
        if stats.empty:
            continue
        n_seeds = sub["seed"].nunique() if "seed" in sub.columns else 1
        label = f"{group}" + (f" (mean ± 95% CI, {n_seeds} seeds)" if n_seeds > 1 and ci else "")
        if ci and n_seeds > 1:
            fig.add_trace(go.Scatter(x=list(stats.step) + list(stats.step[::-1]), y=list(stats.hi) + list(stats.lo[::-1]),
                                     fill="toself", fillcolor=color, opacity=0.2, line=dict(width=0),
                                     hoverinfo="skip", showlegend=False, name=f"{group} 95% CI"))
        fig.add_trace(go.Scatter(x=stats.step, y=stats["mean"], mode="lines+markers", name=label,
                                 line=dict(color=color, dash=dash), marker=dict(size=4)))
    fig.update_layout(title=title or f"{metric} per RL step", xaxis_title="RL step", yaxis_title=metric,
                      template="plotly_white")
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
    ylab = [f"#{i} p{r.get('prompt_id', '?')} {'✓' if r.get('passed') else '✗'}" for i, r in enumerate(sel)]
    fig = go.Figure(go.Heatmap(z=z, text=text, y=ylab, colorscale="Viridis", colorbar=dict(title="entropy"),
                               hovertemplate="%{y}, token %{x}: '%{text}'<br>entropy %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Token entropy of sampled responses, step {step}", xaxis_title="token position",
                      yaxis_title="sampled response", yaxis_autorange="reversed", template="plotly_white")
    return fig


def fig_gate_branches(data: Any, *, mode: str | None = "calibrl") -> go.Figure:
    """Gate activation by branch over steps (mean over seeds): left, passed-row tokens below (w=1) / above (w=α)
    the expert (traces 0, 1, stacked to 1); right, failed-row tokens above (w=1) / below (w=α) (traces 2, 3).
    Rows of `mode` only (None: all rows)."""
    df = to_frame(data)
    if mode is not None and "mode" in df.columns:
        df = df[df["mode"] == mode]
    cols = [c for c, _, _ in GATE_BRANCHES]
    missing = [c for c in cols if c not in df.columns]
    if df.empty or missing:
        raise ValueError(f"data: expected gate columns {cols} in rows of mode {mode!r} (missing {missing or 'rows'})")
    mean = df.groupby("step")[cols].mean()
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=("passed rows", "failed rows"))
    if mean.isna().all().all():  # every group uniform so far: no gate activity to show
        fig.update_layout(title=f"Gate activation by branch ({mode or 'all modes'}): no values logged (only uniform "
                                f"groups)", template="plotly_white")
        return fig
    for (col, label, group), color in zip(GATE_BRANCHES, _branch_colors()):
        fig.add_trace(go.Scatter(x=mean.index, y=mean[col], name=label, stackgroup=group, line=dict(color=color),
                                 fillcolor=color, mode="lines"), row=1, col=1 if group == "passed" else 2)
    for c in (1, 2):
        fig.update_xaxes(title_text="RL step", row=1, col=c)
    fig.update_yaxes(title_text="fraction of tokens", range=[0, 1.02], row=1, col=1)
    fig.update_layout(title=f"Gate activation by branch ({mode or 'all modes'})", template="plotly_white")
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
        fig.add_trace(go.Histogram(x=r, name=str(label), marker_color=_color(str(label)), opacity=0.6, xbins=bins))
    fig.update_layout(title="Group pass rates (0 and 1: uniform groups, no signal)", barmode="overlay",
                      xaxis_title="group pass rate k/G", yaxis_title="groups", template="plotly_white")
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
    fig = make_subplots(rows=1, cols=2, subplot_titles=("answer distribution", "agreement with gold per prompt"))
    for label, df in frames.items():
        share = df["value"].value_counts(normalize=True)
        fig.add_trace(go.Bar(x=values, y=[float(share.get(v, 0.0)) for v in values], name=str(label),
                             marker_color=_color(str(label)), legendgroup=str(label)), row=1, col=1)
    gshare = gold.value_counts(normalize=True)
    fig.add_trace(go.Bar(x=values, y=[float(gshare.get(v, 0.0)) for v in values], name="gold (expert)",
                         marker_color=_color("expert"), marker_pattern_shape="/"), row=1, col=1)
    for label, df in frames.items():
        agree = df.groupby("prompt_id")["correct"].mean().sort_index()
        fig.add_trace(go.Scatter(x=agree.index, y=agree.values, mode="markers+lines", name=f"{label} agreement",
                                 marker_color=_color(str(label)), legendgroup=str(label), showlegend=False),
                      row=1, col=2)
    fig.update_xaxes(title_text="answer", row=1, col=1)
    fig.update_yaxes(title_text="share of answers", row=1, col=1)
    fig.update_xaxes(title_text="prompt id", row=1, col=2)
    fig.update_yaxes(title_text="share agreeing with gold", range=[-0.02, 1.02], row=1, col=2)
    fig.update_layout(title="Calibration: the policy's answers vs the gold answer", barmode="group",
                      template="plotly_white")
    return fig
