"""The offline HTML page of `python -m calibrl diagnose`: the verdict, the numbers and four figures (plotly.js
embedded once, so the page opens without a network)."""
from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

ROWS = [("acc_mean", "share of responses that passed"), ("uniform_frac", "uniform groups (no signal in either term)"),
        ("entropy_passed", "token entropy, passed responses"), ("entropy_failed", "token entropy, failed responses"),
        ("expert_gap_q50", "median logp - e_t (nats)"), ("expert_past_end_frac", "tokens past the expert's end"),
        ("gate_passed_below", "passed tokens on the weight-1 side"),
        ("gate_failed_above", "failed tokens on the weight-1 side"), ("gate_tie_frac", "tokens exactly at e_t"),
        ("step_factor_passed", "step factor on passed tokens (1 + lambda w)"),
        ("step_factor_failed", "step factor on failed tokens (1 + lambda w)"),
        ("grad_norm_ratio", "|guidance gradient| / |policy gradient|"),
        ("grad_cos_pg_guide", "cosine(guidance, policy gradient)")]


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def figures(r: dict) -> list[go.Figure]:
    """Pass-rate histogram, expert gap by position, gate shares, step factors."""
    edges = r["pass_rate_edges"]
    f1 = go.Figure(go.Bar(x=[f"{a:.1f}-{b:.1f}" for a, b in zip(edges[:-1], edges[1:])], y=r["pass_rate_hist"]))
    f1.update_layout(title=f"Groups by pass rate (n = {r['n_prompts']} groups of {r['group_size']})",
                     xaxis_title="pass rate", yaxis_title="groups", template="plotly_white")
    g = r["expert_gap_by_position"]
    t = list(range(len(g["q50"])))
    f2 = go.Figure([go.Scatter(x=t, y=g["q90"], line=dict(width=0), showlegend=False, connectgaps=False),
                    go.Scatter(x=t, y=g["q10"], fill="tonexty", line=dict(width=0), name="q10-q90",
                               connectgaps=False),
                    go.Scatter(x=t, y=g["q50"], name="median", connectgaps=False)])
    f2.add_hline(y=0, line_dash="dot", line_color="#999")
    f2.update_layout(title="Expert gap logp - e_t by token position (e_t aligned by index, 0 past the expert's end)",
                     xaxis_title="token position t", yaxis_title="nats", template="plotly_white")
    keys = ["gate_passed_below", "gate_passed_above", "gate_failed_above", "gate_failed_below"]
    f3 = go.Figure(go.Bar(x=keys, y=[r.get(k) for k in keys]))
    f3.update_layout(title=f"Gate shares at slope {r['slope']:g} (tokens of non-uniform groups)",
                     yaxis=dict(range=[0, 1], title="share"), template="plotly_white")
    f4 = go.Figure(go.Bar(x=["passed", "failed"], y=[r.get("step_factor_passed"), r.get("step_factor_failed")]))
    f4.add_hline(y=1, line_dash="dot", line_color="#999", annotation_text="GRPO")
    f4.update_layout(title="Predicted step vs GRPO at ratio 1 (|A|-weighted mean of 1 + λ·w·s·sign A)",
                     yaxis_title="factor", template="plotly_white")
    return [f1, f2, f3, f4]


def build_html(r: dict) -> str:
    """One self-contained page."""
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td><code>{k}</code></td><td>{_fmt(r.get(k))}</td></tr>"
                   for k, label in ROWS)
    figs = "".join(f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures(r)))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>calibrl diagnose</title></head><body "
            f"style='font-family:sans-serif;max-width:1000px;margin:auto'><h1>calibrl diagnose: {_fmt(r['model'])}"
            f"</h1><p><b>Verdict:</b> {html.escape(r['verdict'])}</p><table border=1 cellpadding=4>{rows}</table>"
            f"{figs}</body></html>")
