"""Self-contained HTML report comparing runs by mode (plotly inlined once, opens offline).

`python -m calibrl report RUN_DIR... [--out FILE]`. Curves are means over seeds (`calibrl.figures.fig_panel`); with
several seeds a band shows mean ± 95% confidence interval (`calibrl.stats.mean_ci`, Student t over seeds), clipped to
the metric's range. Every value read from run files (config values, names, modes, paths) is HTML-escaped: a run
directory is data, never markup.
"""
from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any, Sequence

from calibrl import stats
from calibrl.palette import method_color


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% half-width) of `values` from `calibrl.stats.mean_ci` (half-width 0 for a single value)."""
    ci = stats.mean_ci(values)
    if ci["n"] == 0:
        raise ValueError("values: expected at least one number, got none")
    return ci["mean"], ci["half"] or 0.0

# (title, y-axis title, [(metric, label suffix, dash)], chance line applies)
PANELS: list[tuple[str, str, list[tuple[str, str, str]], bool]] = [
    ("Reward (on-policy samples)", "reward", [("reward_mean", "", "solid")], False),
    ("Training accuracy (fraction of samples passed)", "accuracy", [("acc_mean", "", "solid")], True),
    ("Held-out accuracy: greedy (solid) and pass@k (dotted)", "accuracy",
     [("eval_greedy_acc", " greedy", "solid"), ("eval_pass_at_k", " pass@k", "dot")], True),
    ("Entropy: passed (solid) vs failed (dashed) samples", "nats/token",
     [("entropy_passed", " passed", "solid"), ("entropy_failed", " failed", "dash")], False),
    ("Entropy: on-policy (solid) vs expert tokens (dotted)", "nats/token",
     [("entropy_mean", " on-policy", "solid"), ("entropy_expert", " expert", "dot")], False),
    ("Gate, passed rows: logp < e_t (weight 1, solid) / >= e_t (weight α, dashed)", "fraction of tokens",
     [("gate_passed_below", " passed<e", "solid"), ("gate_passed_above", " passed>=e", "dash")], False),
    ("Gate, failed rows: logp > e_t (weight 1, solid) / <= e_t (weight α, dashed)", "fraction of tokens",
     [("gate_failed_above", " failed>e", "solid"), ("gate_failed_below", " failed<=e", "dash")], False),
    ("Group rarity: uniform (solid), all-pass (dashed), all-fail (dotted)", "fraction of groups",
     [("uniform_frac", " uniform", "solid"), ("all_pass_frac", " all-pass", "dash"),
      ("all_fail_frac", " all-fail", "dot")], False),
    ("KL to the start policy (k3, adapter disabled)", "nats/token", [("kl_to_start", "", "solid")], False),
    ("Response length", "tokens", [("response_len_mean", "", "solid")], False),
    ("Format rate", "fraction", [("format_rate", "", "solid")], False),
    ("Expert gap logp - e_t: median (solid), 10% / 90% (dotted)", "nats",
     [("expert_gap_q50", " q50", "solid"), ("expert_gap_q10", " q10", "dot"), ("expert_gap_q90", " q90", "dot")],
     False),
    ("Gradient norm: total (solid), policy term (dashed), guidance term (dotted)", "norm",
     [("grad_norm", " total", "solid"), ("grad_norm_pg", " pg", "dash"), ("grad_norm_guide", " guide", "dot")], False),
    ("Sampler vs trainer log-prob gap (must stay ~0)", "max |diff|", [("logp_gap_max", "", "solid")], False),
]
SUMMARY = [("eval_greedy_acc", "final greedy acc", "last"), ("eval_pass_at_k", "final pass@k", "last"),
           ("acc_mean", "train acc, last 10 steps", "tail"), ("entropy_mean", "entropy, mean over steps", "all"),
           ("entropy_mean", "entropy, last 10 steps", "tail"), ("uniform_frac", "uniform groups, mean", "all"),
           ("kl_to_start", "final KL to start", "last"), ("time_s", "seconds/step", "all")]
RESULTS_POINTER = "the README's \"A real result\" section (the shipped 3-seed study, assets/runs/)"


def _e(value: Any) -> str:
    """Any value from a run file as HTML text (escaped, quotes included)."""
    return html.escape(str(value), quote=True)


def _series(hist: Any, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in hist.rows if isinstance(r.get(key), (int, float)) and r.get(key) == r.get(key)}


def _by_mode(histories: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for h in histories:
        out.setdefault(str(h.mode or "?"), []).append(h)
    return out


def _summary_table(groups: dict[str, list[Any]]) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in SUMMARY)
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
        body.append(f"<tr><td style='color:{method_color(mode)}'><b>{_e(mode)}</b></td>"
                    f"<td>{_e(seeds)} (n={len(hists)})</td>{''.join(cells)}</tr>")
    return (f"<table><tr><th>mode</th><th>seeds</th>{head}</tr>{''.join(body)}</table>"
            "<p class='note'>Values: mean over seeds &plusmn; 95% CI half-width (Student t) when there are "
            "several seeds; a single seed shows its value alone. Gate fractions count tokens of non-uniform groups "
            "only; for modes that do not use the expert they are counterfactual (what CalibRL's gate would do).</p>")


def _num(cfg: dict, key: str, default: Any = None) -> Any:
    v = cfg.get(key, default)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _header(histories: Sequence[Any], groups: dict[str, list[Any]], budget: str | None) -> str:
    """What the report compares, and, for a smoke-sized run, that it is a pipeline check, not a result."""
    cfg = histories[0].config
    steps = max(len(h.rows) for h in histories)
    opt = (_num(cfg, "ppo_epochs", 1) or 1) * (_num(cfg, "minibatches", 1) or 1)
    modes = " vs ".join(f"<b style='color:{method_color(m)}'>{_e(m)}</b>" for m in groups)
    seeds = sorted({str(h.seed) for h in histories})
    task = cfg.get("task") or _default_task()
    what = (f"<p>Compares {modes} trained from the same start policy with the same seeds ({_e(', '.join(seeds))}) "
            f"and data order: model {_e(cfg.get('model'))}, task {_e(task)}, {_e(steps)} RL steps of "
            f"P={_e(cfg.get('prompts_per_step'))} prompts &times; G={_e(cfg.get('group_size'))} samples, "
            f"{_e(cfg.get('max_new_tokens'))} new tokens, {_e(opt)} optimizer steps per RL step in every mode.</p>")
    if budget == "smoke" or (budget is None and steps <= _smoke_steps()):
        what += (f"<p class='warn'><b>Pipeline check, not a result.</b> This is a smoke-sized run ({_e(steps)} "
                 f"steps, one or few seeds): it shows that training, the probes and this report work end to end. "
                 f"Modes that share a start and a seed barely move apart in so few steps, so their curves overlap "
                 f"by construction. For what GRPO and CalibRL do, see {_e(RESULTS_POINTER)}, or run "
                 f"<code>calibrl compare --budget small --seeds 0,1,2</code>.</p>")
    elif len(seeds) < 3:
        what += (f"<p class='warn'>{len(seeds)} seed{'s' if len(seeds) != 1 else ''}: differences between modes are "
                 f"not distinguishable from seed noise without several seeds.</p>")
    return what


def build_report(run_dirs: Sequence[str | Path], *, title: str = "calibrl comparison", budget: str | None = None,
                 chance: float | None = None) -> str:
    """The HTML text of a report over the given run directories (plotly.js inlined once). `budget`: the size dial
    the runs used (None: a run of at most the smoke budget's steps counts as smoke); `chance`: a dotted chance
    line on the accuracy panels."""
    from calibrl.figures_train import fig_panel, to_frame
    from calibrl.history import History

    if not run_dirs:
        raise ValueError("run_dirs: expected at least one run directory, got none")
    if budget is not None and budget not in ("smoke", "small", "full"):
        raise ValueError(f"budget: expected smoke, small, full or None, got {budget!r}")
    histories = [History.load(d) for d in run_dirs]
    empty = [str(h.run_dir) for h in histories if not h.rows]
    if empty:
        raise ValueError(f"run_dirs: these runs have no history rows: {empty}")
    groups = _by_mode(histories)
    df = to_frame(histories)
    df["mode"] = [str(m) for m in df["mode"]] if "mode" in df.columns else "?"
    parts = []
    for ttl, ytitle, metrics, has_chance in PANELS:
        present = [m for m in metrics if m[0] in df.columns and df[m[0]].notna().any()]
        if not present:
            continue
        fig = fig_panel(df, present, title=ttl, ytitle=ytitle, chance=chance if has_chance else None)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=not parts, default_width="100%"))
    runs = "".join(f"<li>{_e(h.run_dir)}: {len(h.rows)} steps</li>" for h in histories)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.note{color:#555;font-size:90%}"
             ".warn{background:#fff4e5;border-left:4px solid #f0a030;padding:6px 10px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{style}</style></head><body><h1>{_e(title)}</h1>{_header(histories, groups, budget)}"
            f"{_summary_table(groups)}{''.join(parts)}<h3>Runs</h3><ul>{runs}</ul></body></html>")


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, title: str = "calibrl comparison",
                 budget: str | None = None, chance: float | None = None) -> Path:
    """Write `build_report(run_dirs)` to `out` and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(run_dirs, title=title, budget=budget, chance=chance), encoding="utf-8")
    return out


def _default_task() -> str:
    from calibrl.tasks import DEFAULT_TASK

    return f"{DEFAULT_TASK} (default)"


def _smoke_steps() -> int:
    from calibrl.config import TrainConfig

    return TrainConfig.from_budget("smoke").steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`report RUN_DIR... [--out FILE] [--title T] [--budget B] [--chance P]`."""
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with history.jsonl)")
    parser.add_argument("--out", default=None, help="output HTML file (default: report.html beside the first run)")
    parser.add_argument("--title", default="calibrl comparison", help="page title")
    parser.add_argument("--budget", default=None, choices=("smoke", "small", "full"),
                        help="budget the runs used (default: inferred; smoke-sized runs get a 'pipeline check' note)")
    parser.add_argument("--chance", type=float, default=None,
                        help="accuracy of guessing, drawn as a dotted line on the accuracy panels (e.g. 0.25)")


def run(args: argparse.Namespace) -> int:
    """Build the report and print its path."""
    from calibrl.history import history_path

    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not history_path(d).exists():
            raise ValueError(f"run_dirs: {d} has no history.jsonl (or history.jsonl.gz)")
    out = Path(args.out) if args.out else dirs[0].parent / "report.html"
    print(write_report(dirs, out, title=args.title, budget=args.budget, chance=args.chance))
    return 0
