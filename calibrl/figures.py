"""Plotly figure factories: data in, `plotly.graph_objects.Figure` out, no global state.

Teaching figures live here (the LeakyReLU gate, per-token weights, gradient weights, group rarity); figures over
training runs (curves, entropy heatmap, gate by branch, pass-rate histogram, calibration) live in
`calibrl.figures_train` and are re-exported here. One colour per method everywhere: `METHOD_COLORS` (from
`calibrl.palette`, re-exported).

The gate (calibrl-algorithm.md §2): with gap_t = log pi(y_t) - e_t and s = +1 for passed rows, -1 otherwise,
guide loss per token = |A| * LeakyReLU(-s * gap_t, alpha); its gradient weight on log pi(y_t) is
w_t = 1 where s * gap_t < 0 (the side that still needs correcting) and w_t = alpha otherwise.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# Figures over training runs, re-exported so that this module is the one import point for figures
# (one-way: figures_train never imports this module).
from calibrl.figures_train import (
    GATE_BRANCHES, LEGEND_BELOW, fig_calibration, fig_curves, fig_entropy_heatmap, fig_gate_branches, fig_panel,
    fig_rarity_hist, int_step_axis, mean_ci_by_step, to_frame,
)
from calibrl.palette import (
    FAILED_COLOR, FAILED_LIGHT, METHOD_COLORS, OTHER_COLOR, PASSED_COLOR, PASSED_LIGHT, REFERENCE_COLOR, method_color,
)

# ------------------------------------------------------------------------------------------------ gate math
def _array(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=float)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    return arr


def _check_slope(slope: float) -> float:
    if not isinstance(slope, (int, float, np.floating)) or not (0.0 <= float(slope) <= 1.0):
        raise ValueError(f"slope: expected a number in [0, 1], got {slope!r}")
    return float(slope)


def leaky_relu(x: Any, slope: float) -> np.ndarray:
    """LeakyReLU(x, slope) = x where x >= 0, slope * x otherwise (numpy)."""
    x = _array(x, "x")
    return np.where(x >= 0, x, _check_slope(slope) * x)


def _batch(logp: Any, expert_logp: Any, passed: Any, mask: Any | None):
    lp, ep = _array(logp, "logp", 2), _array(expert_logp, "expert_logp", 2)
    if ep.shape != lp.shape:
        raise ValueError(f"expert_logp: expected shape {lp.shape} like logp, got {ep.shape}")
    if not (np.isfinite(lp).all() and np.isfinite(ep).all()):
        raise ValueError("logp/expert_logp: expected finite values")
    ps = _array(passed, "passed", 1)
    if ps.shape != (lp.shape[0],) or not np.isin(ps, (0, 1)).all():
        raise ValueError(f"passed: expected {lp.shape[0]} values in {{0, 1}}, got shape {ps.shape}")
    m = np.ones_like(lp, dtype=bool) if mask is None else _array(mask, "mask", 2)
    if m.shape != lp.shape or not np.isin(m, (0, 1)).all():
        raise ValueError(f"mask: expected a binary array of shape {lp.shape} like logp, got {m.shape}")
    if not m.any():
        raise ValueError("mask: expected at least one real token, got all masked")
    return lp, ep, ps.astype(bool), m.astype(bool)


def gate_weights(logp: Any, expert_logp: Any, passed: Any, slope: float, mask: Any | None = None) -> np.ndarray:
    """Per-token gate weight [B, T]: 1 where s * (logp - expert_logp) < 0, else `slope`; NaN on masked tokens.

    `logp`, `expert_logp`: [B, T] log-probs; `passed`: [B] bool (s = +1 / -1); `mask`: [B, T] binary or None."""
    slope = _check_slope(slope)
    lp, ep, ps, m = _batch(logp, expert_logp, passed, mask)
    s = np.where(ps, 1.0, -1.0)[:, None]
    w = np.where(s * (lp - ep) < 0, 1.0, slope)
    return np.where(m, w, np.nan)


def _layout(fig: go.Figure, title: str, *, height: int = 520) -> go.Figure:
    """Shared layout of the teaching figures: legend under the plots (never over a line, a colorbar or an axis
    label), room for it in the bottom margin."""
    fig.update_layout(title=title, template="plotly_white", height=height, legend=LEGEND_BELOW,
                      margin=dict(l=70, r=30, t=80, b=120))
    return fig


def _nan_to_none(a: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]


# ------------------------------------------------------------------------------------------------ figures
def fig_gate(slope: float = 0.5, *, abs_adv: float = 1.0, gap_range: tuple[float, float] = (-3.0, 3.0),
             n: int = 241) -> go.Figure:
    """The guide loss |A| * LeakyReLU(-s * gap, slope) over the gap = log pi(y_t) - e_t, for a passed row (s=+1,
    trace 0) and a failed row (s=-1, trace 1). Slope 1 on the side that still needs correcting, `slope` beyond."""
    slope = _check_slope(slope)
    if not isinstance(abs_adv, (int, float)) or not np.isfinite(abs_adv) or abs_adv < 0:
        raise ValueError(f"abs_adv: expected a finite number >= 0, got {abs_adv!r}")
    lo, hi = gap_range
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < 0 < hi):
        raise ValueError(f"gap_range: expected (low < 0 < high), got {gap_range!r}")
    if not isinstance(n, int) or n < 3:
        raise ValueError(f"n: expected an integer >= 3, got {n!r}")
    x = np.linspace(lo, hi, n)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=abs_adv * leaky_relu(-x, slope), name="passed (s=+1)",
                             line=dict(color=PASSED_COLOR, width=3)))
    fig.add_trace(go.Scatter(x=x, y=abs_adv * leaky_relu(x, slope), name="failed (s=-1)",
                             line=dict(color=FAILED_COLOR, width=3, dash="dash")))
    fig.add_vline(x=0, line=dict(color=REFERENCE_COLOR, dash="dot"))
    fig.update_layout(xaxis_title="gap = log π(y_t) − e_t (policy minus expert)", yaxis_title="guide loss per token")
    return _layout(fig, f"CalibRL gate: |A|·LeakyReLU(−s·gap, α={slope:g}), |A|={abs_adv:g}", height=440)


def fig_token_weights(logp: Any, expert_logp: Any, passed: Any, slope: float, *, mask: Any | None = None) -> go.Figure:
    """Per-token gate weights on a batch. Left: every real token at (e_t, log pi(y_t)), passed rows (trace 0) and
    failed rows (trace 1), filled where the weight is 1 and open where it is `slope` (customdata = weight); the
    diagonal (trace 2) is the gate boundary. Right: heatmap of the weights [B, T] (trace 3, None where masked)."""
    w = gate_weights(logp, expert_logp, passed, slope, mask)
    lp, ep, ps, m = _batch(logp, expert_logp, passed, mask)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.47, 0.53], horizontal_spacing=0.12,
                        subplot_titles=("log-probs per token (filled: w=1, open: w=α)", "gate weight per token"))
    for flag, name, color in ((True, "passed rows", PASSED_COLOR), (False, "failed rows", FAILED_COLOR)):
        sel = m & (ps[:, None] == flag)
        ww = w[sel]
        fig.add_trace(go.Scatter(
            x=ep[sel], y=lp[sel], mode="markers", name=name, customdata=ww,
            marker=dict(color=color, size=8, symbol=["circle" if v == 1.0 else "circle-open" for v in ww]),
            hovertemplate="e_t=%{x:.2f}<br>log π=%{y:.2f}<br>weight=%{customdata:g}<extra>" + name + "</extra>"),
            row=1, col=1)
    both = np.concatenate([lp[m], ep[m]])
    lo, hi = float(both.min()), float(max(both.max(), 0.0))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="log π = e_t",
                             line=dict(color=REFERENCE_COLOR, dash="dot")), row=1, col=1)
    fig.add_trace(go.Heatmap(z=_nan_to_none(w), zmin=0, zmax=1, colorscale="Greys", name="weight",
                             colorbar=dict(title="w"), hovertemplate="row %{y}, token %{x}: w=%{z:g}<extra></extra>"),
                  row=1, col=2)
    fig.update_xaxes(title_text="expert log-prob e_t", row=1, col=1)
    fig.update_yaxes(title_text="policy log-prob log π(y_t)", row=1, col=1)
    fig.update_xaxes(title_text="token position t", row=1, col=2)
    fig.update_yaxes(title_text="response row", autorange="reversed", row=1, col=2)
    return _layout(fig, f"Token weights: 1 on the side to correct, α={_check_slope(slope):g} beyond the expert")


def grad_weights(logp: Any, expert_logp: Any, passed: Any, adv: Any, slope: float, *, mask: Any | None = None,
                 guide_coef: float = 0.1, weight: str = "abs-adv") -> np.ndarray:
    """Per-token coefficient of the guide term on grad log pi(y_t), ascent direction, before token-mean:
    guide_coef * s * |A| * w (weight="abs-adv", official) or guide_coef * s * w (weight="none"); NaN where masked."""
    if weight not in ("abs-adv", "none"):
        raise ValueError(f"weight: expected 'abs-adv' or 'none', got {weight!r}")
    if not isinstance(guide_coef, (int, float)) or not np.isfinite(guide_coef) or guide_coef < 0:
        raise ValueError(f"guide_coef: expected a finite number >= 0, got {guide_coef!r}")
    w = gate_weights(logp, expert_logp, passed, slope, mask)
    a = _array(adv, "adv", 1)
    if a.shape != (w.shape[0],) or not np.isfinite(a).all():
        raise ValueError(f"adv: expected {w.shape[0]} finite values (one per row), got shape {a.shape}")
    s = np.where(_array(passed, "passed", 1).astype(bool), 1.0, -1.0)
    mag = np.abs(a) if weight == "abs-adv" else np.ones_like(a)
    return guide_coef * (s * mag)[:, None] * w


def fig_grad_weights(logp: Any, expert_logp: Any, passed: Any, adv: Any, slope: float, *, mask: Any | None = None,
                     guide_coef: float = 0.1, weight: str = "abs-adv") -> go.Figure:
    """What the update does to each token. Heatmap (trace 0) of the guide term's coefficient on grad log pi
    (`grad_weights`; + pushes the token up), drawn on the right. Left: per row, the policy term's coefficient A_i
    at ratio 1 (trace 1) and the row mean of the guide coefficient (trace 2)."""
    g = grad_weights(logp, expert_logp, passed, adv, slope, mask=mask, guide_coef=guide_coef, weight=weight)
    a = _array(adv, "adv", 1)
    rows = list(range(g.shape[0]))
    bound = float(np.nanmax(np.abs(g))) or 1.0
    fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6], horizontal_spacing=0.12,
                        subplot_titles=("per row: policy A vs mean guide", "guide coefficient per token"))
    fig.add_trace(go.Heatmap(z=_nan_to_none(g), zmid=0, zmin=-bound, zmax=bound, colorscale="RdBu",
                             colorbar=dict(title="λ·s·|A|·w"), name="guide coef",
                             hovertemplate="row %{y}, token %{x}: %{z:.3f}<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Bar(x=rows, y=a, name="policy term A_i", marker_color=METHOD_COLORS["grpo"]), row=1, col=1)
    fig.add_trace(go.Bar(x=rows, y=np.nanmean(g, axis=1), name="guide term (row mean)",
                         marker_color=METHOD_COLORS["calibrl"]), row=1, col=1)
    fig.update_xaxes(title_text="response row", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="coefficient on ∇log π", row=1, col=1)
    fig.update_xaxes(title_text="token position t", row=1, col=2)
    fig.update_yaxes(title_text="response row", autorange="reversed", row=1, col=2)
    fig.update_layout(barmode="group")
    return _layout(fig, f"Gradient weights (α={slope:g}, λ={guide_coef:g}, weight={weight}); + pushes a token up")


def fig_rarity(advantages: Any, passed: Any, *, curve: dict | None = None) -> go.Figure:
    """Group rarity. Left: A_i of each response of one group, passed (trace 0) and failed (trace 1) bars, and the
    guidance weight |A_i| (trace 2). Right, when `curve` is given (keys k, abs_adv_passed, abs_adv_failed, and
    optionally current_k): |A| of a passed / failed response against the number of passes k (traces 3, 4) and the
    current k (trace 5). A uniform group (k = 0 or G) has A = 0 everywhere: no policy and no guidance signal."""
    a = _array(advantages, "advantages", 1)
    ps = _array(passed, "passed", 1)
    if ps.shape != a.shape or not np.isin(ps, (0, 1)).all():
        raise ValueError(f"passed: expected {a.shape[0]} values in {{0, 1}} like advantages, got shape {ps.shape}")
    ps = ps.astype(bool)
    idx = np.arange(len(a))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("advantages of one group", "rarity: |A| vs passes k"))
    fig.add_trace(go.Bar(x=idx[ps], y=a[ps], name="A_i passed", marker_color=PASSED_COLOR), row=1, col=1)
    fig.add_trace(go.Bar(x=idx[~ps], y=a[~ps], name="A_i failed", marker_color=FAILED_COLOR), row=1, col=1)
    fig.add_trace(go.Scatter(x=idx, y=np.abs(a), mode="markers", name="|A_i| (guidance weight)",
                             marker=dict(color=METHOD_COLORS["calibrl"], size=11, symbol="diamond")), row=1, col=1)
    if curve is not None:
        missing = [k for k in ("k", "abs_adv_passed", "abs_adv_failed") if k not in curve]
        if missing:
            raise ValueError(f"curve: expected keys k, abs_adv_passed, abs_adv_failed, missing {missing}")
        fig.add_trace(go.Scatter(x=curve["k"], y=curve["abs_adv_passed"], name="|A| of a passed response",
                                 line=dict(color=PASSED_COLOR)), row=1, col=2)
        fig.add_trace(go.Scatter(x=curve["k"], y=curve["abs_adv_failed"], name="|A| of a failed response",
                                 line=dict(color=FAILED_COLOR, dash="dash")), row=1, col=2)
        if curve.get("current_k") is not None:
            fig.add_trace(go.Scatter(x=[curve["current_k"]] * 2, y=[0, float(np.abs(a).max(initial=0.0))],
                                     mode="lines", name="this group", line=dict(color=REFERENCE_COLOR, dash="dot")),
                          row=1, col=2)
        fig.update_xaxes(title_text="passes k in the group", row=1, col=2)
        fig.update_yaxes(title_text="|A|", row=1, col=2)
    fig.update_xaxes(title_text="response i", row=1, col=1)
    fig.update_yaxes(title_text="advantage A_i", row=1, col=1)
    fig.update_xaxes(dtick=1 if len(a) <= 16 else None, row=1, col=1)
    fig.update_layout(barmode="overlay")
    return _layout(fig, f"Group of G={len(a)} with k={int(ps.sum())} passes")


__all__ = [
    "METHOD_COLORS", "OTHER_COLOR", "PASSED_COLOR", "FAILED_COLOR", "method_color", "leaky_relu", "gate_weights",
    "grad_weights", "fig_gate", "fig_token_weights", "fig_grad_weights", "fig_rarity", "fig_curves", "fig_entropy_heatmap", "fig_gate_branches",
    "fig_rarity_hist", "fig_calibration", "to_frame", "mean_ci_by_step", "int_step_axis",
]
