"""Summaries of a sweep (calibrl.sweep): pre-declared per-run metrics, mean ± 95% CI per arm over seeds, paired
differences against the baseline arm (and, for an arm with a "reference", against that arm too), and the files
summary.json, summary.md and report.html (offline).

Per-run metrics are fixed before looking at results (METRICS): final held-out greedy accuracy and pass@k, the
final held-out format rate, and means over the last `last_frac` (default 20%) of RL steps of the training entropy,
format rate, accuracy, uniform-group fraction and KL to the start policy; plus the gate probes that explain them
(averaged over all steps: share of passed / failed tokens on the weight-1 side, ties, median logp - e_t).
POST_HOC metrics were added after results were seen and are reported apart, labelled so: whether entropy is still
moving at the end (second half of the last `last_frac` of steps minus its first half).
"""
from __future__ import annotations

import gzip
import html
import json
import os
from pathlib import Path
from typing import Any

from calibrl.runfiles import atomic_write_bytes, atomic_write_text
from calibrl.stats import fmt_ci, mean_ci, paired_diff

# name -> (history column, how, label); how: "final" (last row that has it), "last" (mean over the last
# last_frac of steps), "all" (mean over all steps), "trend" (within the last last_frac of steps: mean of its second
# half minus mean of its first half); "{last}" in a label is the spec's window, e.g. "20%" (metric_label)
METRICS: dict[str, tuple[str, str, str]] = {
    "final_greedy_acc": ("eval_greedy_acc", "final", "final greedy accuracy (held-out)"),
    "final_pass_at_k": ("eval_pass_at_k", "final", "final pass@k (held-out)"),
    "final_format": ("eval_format_rate", "final", "final greedy format rate (held-out)"),
    "entropy_last": ("entropy_mean", "last", "entropy, last {last} of steps"),
    "train_acc_last": ("acc_mean", "last", "training accuracy, last {last}"),
    "format_last": ("format_rate", "last", "training format rate, last {last}"),
    "uniform_last": ("uniform_frac", "last", "uniform-group fraction, last {last}"),
    "kl_last": ("kl_to_start", "last", "KL to the start policy, last {last}"),
    "gate_passed_below": ("gate_passed_below", "all", "passed tokens on the weight-1 side (all steps)"),
    "gate_failed_above": ("gate_failed_above", "all", "failed tokens on the weight-1 side (all steps)"),
    "gate_tie_frac": ("gate_tie_frac", "all", "tokens with logp = e_t exactly (all steps)"),
    "expert_gap_q50": ("expert_gap_q50", "all", "median logp − e_t (all steps)"),
    "entropy_trend_last": ("entropy_mean", "trend", "entropy change within the last {last} (2nd half − 1st half)"),
}
POST_HOC = ("entropy_trend_last",)  # added after the first results (is entropy still moving at 250 steps?)
PRIMARY_METRICS = ("final_greedy_acc", "final_pass_at_k", "entropy_last", "format_last", "uniform_last", "kl_last")
VERDICT_METRICS = ("final_greedy_acc", "final_pass_at_k", "entropy_last")  # the sentences under the tables
CURVES = (("entropy_mean", "entropy"), ("acc_mean", "training accuracy"), ("eval_greedy_acc", "held-out greedy acc"),
          ("uniform_frac", "uniform groups"))
RANGES = {"entropy_mean": (0.0, None), "kl_to_start": (0.0, None)}  # others are fractions in [0, 1]


def metric_label(metric: str, last_frac: float, pass_k: int | None = None) -> str:
    """The human label of `metric` with the averaging window written out (last_frac 0.2 -> "... last 20% ...") and,
    given pass_k, the k of pass@k."""
    from calibrl import _validate as V

    if metric not in METRICS:
        raise ValueError(f"metric: unknown {metric!r} (known: {sorted(METRICS)})")
    last_frac = V.number(last_frac, "last_frac", lo=0, hi=1, lo_open=True)
    label = METRICS[metric][2].format(last=f"{100 * last_frac:.4g}%")
    return label if pass_k is None else label.replace("pass@k", f"pass@{V.int_arg(pass_k, 'pass_k')}")


def run_metrics(rows: list[dict], steps: int, last_frac: float) -> dict[str, float | None]:
    """The METRICS of one run's history rows."""
    window = max(1, round(last_frac * steps))
    cut, mid = steps - window, steps - window // 2
    out: dict[str, float | None] = {}
    for name, (col, how, _) in METRICS.items():
        vals = [(r["step"], r.get(col)) for r in rows if r.get(col) is not None]
        if how == "final":
            out[name] = float(vals[-1][1]) if vals and vals[-1][0] == steps else None
        elif how == "trend":
            first = [v for s, v in vals if cut < s <= mid]
            second = [v for s, v in vals if s > mid]
            out[name] = sum(second) / len(second) - sum(first) / len(first) if first and second else None
        else:
            sel = [v for s, v in vals if how == "all" or s > cut]
            out[name] = sum(sel) / len(sel) if sel else None
    return out


def collect(spec: Any, out: Path) -> dict[str, dict[int, dict]]:
    """{arm: {seed: {"metrics", "steps_done", "rows"}}} for the finished runs under `out` (unfinished runs are
    listed with steps_done < steps and no metrics)."""
    from calibrl.history import read_history
    from calibrl.sweep import config_for, run_dir

    res: dict[str, dict[int, dict]] = {}
    for arm in spec.arms:
        res[arm.name] = {}
        for seed in arm.seeds:
            path = run_dir(out, arm, seed)
            rows = read_history(path)
            if not rows:
                continue
            steps = config_for(spec, arm, seed).steps
            done = rows[-1]["step"] == steps
            res[arm.name][seed] = {"steps_done": rows[-1]["step"], "rows": rows,
                                   "metrics": run_metrics(rows, steps, spec.last_frac) if done else None}
    return res


def _paired(fin: dict[int, dict], other: dict[int, dict]) -> dict[str, dict]:
    return {m: paired_diff({s: v[m] for s, v in fin.items()}, {s: v[m] for s, v in other.items()}) for m in METRICS}


def summarize(spec: Any, out: Path) -> dict:
    """Per arm: n finished seeds, mean ± CI of each metric, paired difference vs the baseline arm ("vs_baseline")
    and, for an arm with a reference, vs that arm ("reference", "vs_reference")."""
    from calibrl.sweep import config_for

    runs = collect(spec, out)
    pass_k = config_for(spec, spec.arms[0], spec.arms[0].seeds[0]).pass_k  # load_spec: the same for every arm
    base = {s: r["metrics"] for s, r in runs[spec.baseline].items() if r["metrics"]}
    arms = {}
    for arm in spec.arms:
        fin = {s: r["metrics"] for s, r in runs[arm.name].items() if r["metrics"]}
        entry = {"role": arm.role, "description": arm.description, "overrides": arm.overrides,
                 "seeds_planned": arm.seeds, "seeds_done": sorted(fin),
                 "seeds_partial": sorted(s for s, r in runs[arm.name].items() if not r["metrics"]),
                 "metrics": {m: mean_ci([v[m] for v in fin.values()]) for m in METRICS}}
        if arm.name != spec.baseline:
            entry["vs_baseline"] = _paired(fin, base)
        if arm.reference is not None:
            ref = {s: r["metrics"] for s, r in runs[arm.reference].items() if r["metrics"]}
            entry["reference"], entry["vs_reference"] = arm.reference, _paired(fin, ref)
        entry["runs"] = {str(s): v for s, v in fin.items()}
        arms[arm.name] = entry
    return {"spec": spec.name, "budget": spec.budget, "baseline": spec.baseline, "base": spec.base,
            "last_frac": spec.last_frac, "metrics": {k: metric_label(k, spec.last_frac, pass_k) for k in METRICS},
            "declared": list(spec.metrics or PRIMARY_METRICS), "arms": arms,
            "n_runs": sum(len(a["seeds_done"]) for a in arms.values()), "_runs": runs}


def _table(summary: dict, metrics: tuple[str, ...], diff: bool, against: str = "baseline") -> list[str]:
    """Per-arm means (diff=False) or paired differences; against="reference" labels rows "arm − reference" and
    counts the paired seeds (the seeds both arms finished)."""
    by_ref = diff and against == "reference"
    head = ("| arm − reference | paired seeds | " if by_ref else "| arm | seeds | ") \
        + " | ".join(summary["metrics"][m] for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for name, a in summary["arms"].items():
        src = a.get(f"vs_{against}") if diff else a["metrics"]
        if src is None:
            continue
        label, n = (f"{name} − {a['reference']}", src[metrics[0]]["n"]) if by_ref else (name, len(a["seeds_done"]))
        lines.append(f"| {label} | {n} | " + " | ".join(fmt_ci(src[m]) for m in metrics) + " |")
    return lines


AGAINST = ("baseline", "reference")  # what a paired difference is taken against


def _check_against(against: str) -> str:
    if against not in AGAINST:
        raise ValueError(f"against: expected one of {AGAINST}, got {against!r}")
    return f"vs_{against}"


def to_markdown(summary: dict) -> str:
    """summary.md: the per-arm table (mean ± 95% t-interval over seeds), the paired differences against the baseline
    and (arms with a reference) against their reference, the gate probes and one sentence per paired comparison on
    VERDICT_METRICS (from `reading`). The tables show the spec's declared metrics (default PRIMARY_METRICS), the
    verdicts the declared ones among VERDICT_METRICS (all declared ones when none is)."""
    declared = tuple(summary["declared"])
    verdict_metrics = tuple(m for m in declared if m in VERDICT_METRICS) or declared
    gate = ("gate_passed_below", "gate_failed_above", "gate_tie_frac", "expert_gap_q50")
    partial = {n: a["seeds_partial"] for n, a in summary["arms"].items() if a["seeds_partial"]}
    lines = [f"# Sweep `{summary['spec']}`", "",
             f"Budget `{summary['budget']}` with {json.dumps(summary['base'])}; baseline arm `{summary['baseline']}`. "
             f"Mean ± 95% t-interval over finished seeds; differences are paired by seed (arm − baseline).", "",
             "## Per arm", "", *_table(summary, declared, False), "",
             "## Paired difference against the baseline", "", *_table(summary, declared, True), "",
             "## Gate probes (what CalibRL's gate does; counterfactual for arms without the guidance term)", "",
             *_table(summary, gate, False), ""]
    lines += ["## Still moving at the end? (post hoc: added after the first results, not pre-declared)", "",
              *_table(summary, POST_HOC, False), ""]
    if any("vs_reference" in a for a in summary["arms"].values()):
        lines += ["## Paired difference against the arm's reference (ablations against the setting they vary)", "",
                  *_table(summary, declared, True, "reference"), ""]
    verdicts = [f"- {line}" for against in AGAINST for m in verdict_metrics
                for line in reading(summary, m, against=against) if "no finished seed" not in line]
    if verdicts:
        lines += ["## Paired verdicts", "",
                  "Each 95% interval is for one comparison on its own, not corrected for the "
                  f"{len(verdicts)} shown (about 1 in 20 true-null comparisons excludes 0 by chance).", "",
                  *verdicts, ""]
    if partial:
        lines += ["Unfinished runs (not in the tables): " + "; ".join(f"{n}: seeds {s}" for n, s in partial.items()),
                  ""]
    return "\n".join(lines)


def write_summary(spec: Any, out: Path) -> dict:
    """Write OUT/summary.json, summary.md and report.html; returns the summary (without the raw rows)."""
    summary = summarize(spec, out)
    runs = summary.pop("_runs")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "summary.md", to_markdown(summary))
    atomic_write_text(out / "report.html", to_html(summary, runs))
    return summary


def to_html(summary: dict, runs: dict) -> str:
    """Offline report: the tables and one curve figure per CURVES metric (mean ± CI band per arm, clamped)."""
    from plotly.subplots import make_subplots

    from calibrl.stats import mean_ci as ci

    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in CURVES], vertical_spacing=0.17)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    for k, (name, arm_runs) in enumerate(runs.items()):
        color = palette[k % len(palette)]
        n_done = sum(r["metrics"] is not None for r in arm_runs.values())  # the curves use finished runs only
        for j, (col, _) in enumerate(CURVES):
            by_step: dict[int, list[float]] = {}
            for r in arm_runs.values():
                if r["metrics"] is None:
                    continue
                for row in r["rows"]:
                    if row.get(col) is not None:
                        by_step.setdefault(row["step"], []).append(row[col])
            if not by_step:
                continue
            steps = sorted(by_step)
            stats = [ci(by_step[s]) for s in steps]
            lo_clip, hi_clip = RANGES.get(col, (0.0, 1.0))
            clamp = lambda v: None if v is None else min(max(v, lo_clip), hi_clip if hi_clip is not None else v)
            mean = [s["mean"] for s in stats]
            lo = [clamp(s["lo"] if s["lo"] is not None else s["mean"]) for s in stats]
            hi = [clamp(s["hi"] if s["hi"] is not None else s["mean"]) for s in stats]
            pos = dict(row=j // 2 + 1, col=j % 2 + 1)
            fig.add_scatter(x=steps + steps[::-1], y=hi + lo[::-1], fill="toself", line=dict(width=0),
                            fillcolor=color, opacity=0.15, hoverinfo="skip", showlegend=False, **pos)
            fig.add_scatter(x=steps, y=mean, mode="lines+markers" if len(steps) < 12 else "lines",
                            line=dict(color=color), name=f"{name} (n={n_done})", legendgroup=name,
                            showlegend=j == 0, **pos)
    fig.update_xaxes(title_text="RL step", tickformat="d")
    fig.update_layout(template="plotly_white", height=720, legend=dict(orientation="h", y=-0.12))
    md_tables = to_markdown(summary).split("\n")
    rows_html = []
    for line in md_tables:
        if line.startswith("|---") or line.startswith("|-"):
            continue
        if line.startswith("| "):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            rows_html.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("#"):
            rows_html.append(f"</table><h2>{html.escape(line.lstrip('# '))}</h2><table>")
        elif line.startswith("- "):  # a verdict sentence
            rows_html.append(f"</table><ul><li>{html.escape(line[2:])}</li></ul><table>")
        elif line.strip():
            rows_html.append(f"</table><p>{html.escape(line)}</p><table>")
    body = fig.to_html(full_html=False, include_plotlyjs=True)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(f"sweep {summary['spec']}")
            + "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto}td{padding:2px 8px;"
              "border-bottom:1px solid #ddd}ul{margin:4px 0}</style></head><body><table>" + "".join(rows_html)
            + "</table>" + body + "</body></html>")


def _round(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    return value


def export_runs(spec: Any, out: Path, dest: Path) -> int:
    """Write the compact files of FINISHED runs to dest/<arm>/s<seed>/: config.json, env.json (if the run has
    one), history.jsonl.gz (every column of every step, floats rounded to 6 significant digits, gzip-compressed:
    about 1/7 of the plain file;
    `calibrl.history.History.load`, `zcat` and pandas read it), the last evaluation's rows of eval.jsonl and the last
    step's rows of samples.jsonl. Checkpoints, adapters and unfinished runs are not copied. dest may equal out
    (compacts in place: the plain history.jsonl is replaced by its compressed copy once that is written)."""
    from calibrl.history import COMPACT_HISTORY_FILE, HISTORY_FILE, read_history, read_jsonl
    from calibrl.runenv import ENV_FILE
    from calibrl.sweep import config_for, run_dir

    n = 0
    for arm in spec.arms:
        for seed in arm.seeds:
            src, dst = run_dir(out, arm, seed), run_dir(dest, arm, seed)
            rows = read_history(src)
            if not rows or rows[-1]["step"] != config_for(spec, arm, seed).steps:
                continue
            files = {"config.json": (src / "config.json").read_text(encoding="utf-8")}
            if (src / ENV_FILE).is_file():  # where it ran (calibrl.runenv); runs from before it have none
                files[ENV_FILE] = (src / ENV_FILE).read_text(encoding="utf-8")
            for name in ("eval.jsonl", "samples.jsonl"):
                extra = read_jsonl(src / name) if (src / name).exists() else []
                last = max((r.get("step", 0) for r in extra), default=None)
                files[name] = "".join(json.dumps(r) + "\n" for r in extra if r.get("step", 0) == last)
            lines = [json.dumps(_round(r)) for r in rows]
            dst.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                atomic_write_text(dst / name, text)
            # mtime=0: the same rows give the same bytes, so a re-export leaves git clean
            data = "".join(line + "\n" for line in lines).encode("utf-8")
            atomic_write_bytes(dst / COMPACT_HISTORY_FILE, gzip.compress(data, compresslevel=9, mtime=0))
            if read_jsonl(dst / COMPACT_HISTORY_FILE) != [json.loads(line) for line in lines]:
                raise RuntimeError(f"{dst / COMPACT_HISTORY_FILE}: does not read back as written; the plain "
                                   f"history is kept")
            if (dst / HISTORY_FILE).exists():  # the plain copy (in place: the source) is now redundant
                (dst / HISTORY_FILE).unlink()
            n += 1
    return n


def load_study(root: str | os.PathLike = "assets/study", *, spec_file: str = "spec.json",
               max_seeds: int | None = None) -> dict:
    """A shipped (or running) sweep for notebooks: {"spec", "summary", "histories": {arm: [History, ...]}, "root"}.
    `max_seeds` keeps the first seeds of each arm (FAST mode); the summary is computed over the kept seeds."""
    import dataclasses

    from calibrl.history import History
    from calibrl.sweep import load_spec, run_dir

    root = Path(root)
    spec = load_spec(root / spec_file)
    if max_seeds is not None:
        if isinstance(max_seeds, bool) or not isinstance(max_seeds, int) or max_seeds < 1:
            raise ValueError(f"max_seeds: expected an int >= 1 or None, got {max_seeds!r}")
        spec = dataclasses.replace(spec, arms=[dataclasses.replace(a, seeds=a.seeds[:max_seeds]) for a in spec.arms])
    summary = summarize(spec, root)
    runs = summary.pop("_runs")
    histories = {a.name: [History.load(run_dir(root, a, s)) for s in sorted(runs[a.name])
                          if runs[a.name][s]["metrics"] is not None] for a in spec.arms}
    return {"spec": spec, "summary": summary, "histories": histories, "root": root}


def reading(summary: dict, metric: str, *, digits: int = 3, against: str = "baseline") -> list[str]:
    """One plain sentence per arm: its paired difference to the baseline (`against="reference"`: to its reference
    arm, for the arms that have one) on `metric`, and whether the 95% CI excludes 0 or not."""
    if metric not in METRICS:
        raise ValueError(f"metric: unknown {metric!r} (known: {sorted(METRICS)})")
    key = _check_against(against)
    label = summary["metrics"][metric]
    lines = []
    for name, a in summary["arms"].items():
        d = a.get(key, {}).get(metric)
        if d is None:
            continue
        other = summary["baseline"] if against == "baseline" else a["reference"]
        if d["mean"] is None:
            lines.append(f"{name}: no finished seed paired with {other} yet")
        elif d["half"] is None:
            lines.append(f"{name}: {label} {d['mean']:+.{digits}f} vs {other} on 1 seed (no interval)")
        else:
            sig = "a difference beyond seed noise" if d["lo"] > 0 or d["hi"] < 0 else "within seed noise"
            lines.append(f"{name}: {label} {d['mean']:+.{digits}f} (95% CI {d['lo']:+.{digits}f} to "
                         f"{d['hi']:+.{digits}f}) vs {other} over {d['n']} paired seeds: {sig} "
                         f"(higher in {d['wins']}/{d['n']} seeds, sign test p = {d['sign_p']:.2g})")
    return lines


def arm_frame(summary: dict, metrics: tuple[str, ...] = PRIMARY_METRICS, *, diff: bool = False,
              against: str = "baseline"):
    """A pandas DataFrame of the summary: one row per arm, `n` finished seeds, and per metric its mean and the CI
    half-width (column "<metric> ±"); `diff=True` gives the paired differences against the baseline instead
    (`against="reference"`: against each arm's reference, arms without one left out; column "reference")."""
    import pandas as pd

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown} (known: {sorted(METRICS)})")
    key = _check_against(against)
    rows = []
    for arm, a in summary["arms"].items():
        if diff and key not in a:
            continue
        src = a[key] if diff else a["metrics"]
        row: dict[str, Any] = {"arm": arm, "n": src[metrics[0]]["n"] if diff else len(a["seeds_done"])}
        if diff and against == "reference":
            row["reference"] = a["reference"]
        for m in metrics:
            row[m] = None if src[m]["mean"] is None else round(src[m]["mean"], 4)
            row[m + " ±"] = None if src[m]["half"] is None else round(src[m]["half"], 4)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["arm", "n"]).set_index("arm")  # no rows: empty, same index


def stand_in_study(root: str | os.PathLike) -> dict:
    """A 2-step smoke sweep (GRPO and CalibRL, one seed) in `root`, loaded like a study: a pipeline check for
    notebooks when the shipped study is missing. Its numbers are not evidence."""
    from calibrl.sweep import load_spec, run_sweep

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps({
        "name": "stand-in", "budget": "smoke", "baseline": "grpo", "seeds": 1,
        "base": {"steps": 2, "eval_every": 2, "eval_n": 4, "pass_k": 2, "grad_split_every": 0},
        "arms": [{"name": "grpo", "set": {"mode": "grpo"}}, {"name": "calibrl", "set": {"mode": "calibrl"}}]}))
    run_sweep(load_spec(root / "spec.json"), root, workers=1, progress=False)
    return load_study(root)
