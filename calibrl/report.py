"""Self-contained HTML report comparing runs by mode (plotly inlined once, opens offline).

`python -m calibrl report RUN_DIR... [--out FILE]`. Curves are means over seeds; with several seeds a band shows
mean +- 95% confidence interval (Student t over seeds)."""
from __future__ import annotations

import argparse
import html
import math
from pathlib import Path
from typing import Any, Sequence

_FALLBACK_COLORS = {"grpo": "#636EFA", "calibrl": "#EF553B", "dr_grpo": "#00CC96", "dapo": "#AB63FA",
                    "luffy": "#FFA15A", "rlplus": "#19D3F3", "expert": "#7F7F7F"}


def _color(mode: str) -> str:
    """One colour per method everywhere: calibrl.figures.METHOD_COLORS (the contract's palette as fallback)."""
    try:
        from calibrl.figures import METHOD_COLORS as colors
    except ImportError:
        colors = _FALLBACK_COLORS
    return colors.get(mode, "#444444")


_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

# (title, y-axis title, [(metric, label suffix, dash)])
PANELS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("Reward (on-policy samples)", "reward", [("reward_mean", "", "solid")]),
    ("Training accuracy (fraction of samples passed)", "accuracy", [("acc_mean", "", "solid")]),
    ("Held-out accuracy: greedy (solid) and pass@k (dotted)", "accuracy",
     [("eval_greedy_acc", " greedy", "solid"), ("eval_pass_at_k", " pass@k", "dot")]),
    ("Entropy: passed (solid) vs failed (dashed) samples", "nats/token",
     [("entropy_passed", " passed", "solid"), ("entropy_failed", " failed", "dash")]),
    ("Entropy: on-policy (solid) vs expert tokens (dotted)", "nats/token",
     [("entropy_mean", " on-policy", "solid"), ("entropy_expert", " expert", "dot")]),
    ("Gate, passed rows: logp < e_t (weight 1, solid) / >= e_t (weight slope, dashed)", "fraction of tokens",
     [("gate_passed_below", " passed<e", "solid"), ("gate_passed_above", " passed>=e", "dash")]),
    ("Gate, failed rows: logp > e_t (weight 1, solid) / <= e_t (weight slope, dashed)", "fraction of tokens",
     [("gate_failed_above", " failed>e", "solid"), ("gate_failed_below", " failed<=e", "dash")]),
    ("Group rarity: uniform groups (solid), all-pass (dashed), all-fail (dotted)", "fraction of groups",
     [("uniform_frac", " uniform", "solid"), ("all_pass_frac", " all-pass", "dash"), ("all_fail_frac", " all-fail", "dot")]),
    ("KL to the start policy (k3, adapter disabled)", "nats/token", [("kl_to_start", "", "solid")]),
    ("Response length", "tokens", [("response_len_mean", "", "solid")]),
    ("Format rate", "fraction", [("format_rate", "", "solid")]),
    ("Expert gap logp - e_t: median (solid), 10% / 90% (dotted)", "nats",
     [("expert_gap_q50", " q50", "solid"), ("expert_gap_q10", " q10", "dot"), ("expert_gap_q90", " q90", "dot")]),
    ("Gradient norm: total (solid), policy term (dashed), guidance term (dotted)", "norm",
     [("grad_norm", " total", "solid"), ("grad_norm_pg", " pg", "dash"), ("grad_norm_guide", " guide", "dot")]),
    ("Sampler vs trainer log-prob gap (must stay ~0)", "max |diff|", [("logp_gap_max", "", "solid")]),
]
SUMMARY = [("eval_greedy_acc", "final greedy acc", "last"), ("eval_pass_at_k", "final pass@k", "last"),
           ("acc_mean", "train acc, last 10 steps", "tail"), ("entropy_mean", "entropy, mean over steps", "all"),
           ("entropy_mean", "entropy, last 10 steps", "tail"), ("uniform_frac", "uniform groups, mean", "all"),
           ("kl_to_start", "final KL to start", "last"), ("time_s", "seconds/step", "all")]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (Student t; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values: expected at least one number, got none")
    n, m = len(vals), sum(vals) / len(vals)
    if n == 1:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    t = _T95[min(n - 1, len(_T95)) - 1] if n - 1 <= len(_T95) else 1.96
    return m, t * sd / math.sqrt(n)


def _series(hist: Any, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in hist.rows if r.get(key) is not None}


def _by_mode(histories: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for h in histories:
        out.setdefault(h.mode or "?", []).append(h)
    return out


def _figure(title: str, ytitle: str, metrics: list[tuple[str, str, str]], groups: dict[str, list[Any]]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for mode, hists in groups.items():
        color = _color(mode)
        for key, suffix, dash in metrics:
            per_seed = [_series(h, key) for h in hists]
            steps = sorted(set().union(*per_seed))
            if not steps:
                continue
            stats = [mean_ci([s[t] for s in per_seed if t in s]) for t in steps]
            mean = [m for m, _ in stats]
            if len(hists) > 1:
                hi = [m + c for m, c in stats]
                lo = [m - c for m, c in stats]
                fig.add_trace(go.Scatter(x=steps + steps[::-1], y=hi + lo[::-1], fill="toself", fillcolor=color,
                                         opacity=0.15, line=dict(width=0), hoverinfo="skip", showlegend=False,
                                         legendgroup=mode + suffix))
            fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines+markers" if len(steps) < 12 else "lines",
                                     name=f"{mode}{suffix} (n={len(hists)})", legendgroup=mode + suffix,
                                     line=dict(color=color, dash=dash)))
    fig.update_layout(title=title, xaxis_title="RL step", yaxis_title=ytitle, height=360,
                      margin=dict(l=60, r=20, t=50, b=40), template="plotly_white")
    return fig


def _summary_table(groups: dict[str, list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in SUMMARY)
    body = []
    for mode, hists in groups.items():
        cells = []
        for key, _, how in SUMMARY:
            vals = []
            for h in hists:
                s = _series(h, key)
                if not s:
                    continue
                xs = [s[k] for k in sorted(s)]
                xs = xs[-1:] if how == "last" else xs[-10:] if how == "tail" else xs
                vals.append(sum(xs) / len(xs))
            if vals:
                m, c = mean_ci(vals)
                cells.append(f"<td>{m:.3f} &plusmn; {c:.3f}</td>" if len(vals) > 1 else f"<td>{m:.3f}</td>")
            else:
                cells.append("<td>&ndash;</td>")
        seeds = ", ".join(str(h.seed) for h in hists)
        body.append(f"<tr><td style='color:{_color(mode)}'><b>{html.escape(mode)}</b></td>"
                    f"<td>{html.escape(seeds)}</td>{''.join(cells)}</tr>")
    return (f"<table><tr><th>mode</th><th>seeds</th>{head}</tr>{''.join(body)}</table>"
            "<p class='note'>Values: mean over seeds &plusmn; 95% CI half-width (Student t) when there are "
            "several seeds. Gate fractions count tokens of non-uniform groups only; for modes that do not use the "
            "expert they are counterfactual (what CalibRL's gate would do).</p>")


def build_report(run_dirs: Sequence[str | Path], *, title: str = "calibrl comparison") -> str:
    """The HTML text of a report over the given run directories (plotly.js inlined once)."""
    from calibrl.history import History

    if not run_dirs:
        raise ValueError("run_dirs: expected at least one run directory, got none")
    histories = [History.load(d) for d in run_dirs]
    empty = [str(h.run_dir) for h in histories if not h.rows]
    if empty:
        raise ValueError(f"run_dirs: these runs have no history rows: {empty}")
    groups = _by_mode(histories)
    parts = []
    for i, (ttl, ytitle, metrics) in enumerate(PANELS):
        fig = _figure(ttl, ytitle, metrics, groups)
        if not fig.data:
            continue
        parts.append(fig.to_html(full_html=False, include_plotlyjs=not parts, default_width="100%"))
    cfg = histories[0].config
    meta = (f"model {html.escape(str(cfg.get('model')))}, task {html.escape(str(cfg.get('task') or _default_task()))}, "
            f"{cfg.get('steps')} steps, P={cfg.get('prompts_per_step')} prompts x G={cfg.get('group_size')}, "
            f"{cfg.get('max_new_tokens')} new tokens, {cfg.get('ppo_epochs', 1) * cfg.get('minibatches', 1)} "
            f"optimizer steps per RL step in every mode")
    runs = "".join(f"<li>{html.escape(str(h.run_dir))}: {len(h.rows)} steps</li>" for h in histories)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.note{color:#555;font-size:90%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{meta}</p>"
            f"{_summary_table(groups)}{''.join(parts)}<h3>Runs</h3><ul>{runs}</ul></body></html>")


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, title: str = "calibrl comparison") -> Path:
    """Write `build_report(run_dirs)` to `out` and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(run_dirs, title=title), encoding="utf-8")
    return out


def _default_task() -> str:
    from calibrl.tasks import DEFAULT_TASK

    return f"{DEFAULT_TASK} (default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`report RUN_DIR... [--out FILE] [--title T]`."""
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with history.jsonl)")
    parser.add_argument("--out", default=None, help="output HTML file (default: report.html beside the first run)")
    parser.add_argument("--title", default="calibrl comparison", help="page title")


def run(args: argparse.Namespace) -> int:
    """Build the report and print its path."""
    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not (d / "history.jsonl").exists():
            raise ValueError(f"run_dirs: {d} has no history.jsonl")
    out = Path(args.out) if args.out else dirs[0].parent / "report.html"
    print(write_report(dirs, out, title=args.title))
    return 0
