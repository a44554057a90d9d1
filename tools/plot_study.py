"""The README's study figure, assets/study/study.png, drawn from the shipped run files (matplotlib, a tool-only
dependency). The PNG records which runs it was drawn from (text chunk "calibrl-runs"), so
tests/test_sweep.py can tell when the figure no longer matches the shipped study.

    python tools/plot_study.py            # also run by tools/update_readme_study.py

Panels: token entropy and uniform-group fraction per RL step (a 10-step rolling mean per seed, then mean over
seeds), held-out greedy accuracy and pass@k at each evaluation. Bands: 95% t-interval over seeds, clipped to the
metric's range (calibrl.stats.metric_range), for arms with >= 3 seeds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "study" / "study.png"
MIN_BAND_SEEDS = 3  # a 2-seed t-interval (x 12.7 the spread) would hide every curve
PANELS = (("entropy_mean", "token entropy (nats)", 10), ("uniform_frac", "uniform-group fraction", 10),
          ("eval_greedy_acc", "held-out greedy accuracy", 0), ("eval_pass_at_k", "held-out pass@k", 0))


def shipped_runs(summary: dict) -> list[str]:
    """'arm/s<seed>' of every finished run in the summary, sorted: what the figure is drawn from."""
    return sorted(f"{arm}/s{s}" for arm, a in summary["arms"].items() for s in a["seeds_done"])


def _long_frame(hists, col: str, window: int):
    """Rows (step, col) of one arm's histories, each seed smoothed by a trailing `window`-step mean (none for 0)."""
    import pandas as pd

    parts = []
    for h in hists:
        s = pd.Series({r["step"]: r[col] for r in h.rows if r.get(col) is not None}, dtype=float).sort_index()
        s = s.rolling(window, min_periods=1).mean() if window else s
        parts.append(pd.DataFrame({"step": s.index, col: s.to_numpy()}))
    return pd.concat(parts, ignore_index=True) if parts else None


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from calibrl import palette, stats, sweep_summary
    from calibrl.figures_train import mean_ci_by_step

    study = sweep_summary.load_study(ROOT / "assets" / "study")
    arms = [a for a in study["spec"].arms if a.role == "primary" and study["histories"].get(a.name)]
    styles, seen = {}, {}
    for arm in arms:  # colour by method (the palette), line style by variant in spec order
        color = palette.method_color(arm.name)
        styles[arm.name] = (color, ("solid", "dashed", "dotted", "dashdot")[seen.get(color, 0) % 4])
        seen[color] = seen.get(color, 0) + 1
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (col, label, window) in zip(axes.flat, PANELS):
        hi = stats.metric_range(col)[1]
        top = 0.0
        for arm in arms:
            frame = _long_frame(study["histories"][arm.name], col, window)
            if frame is None or frame.empty:
                continue
            band = mean_ci_by_step(frame, col)  # mean and 95% CI per step, clipped to the metric's range
            steps, mean = band["step"].to_numpy(), band["mean"].to_numpy(dtype=float)
            color, style = styles[arm.name]
            n = len(study["histories"][arm.name])
            ax.plot(steps, mean, color=color, ls=style, marker="o" if not window else None, ms=4,
                    label=f"{arm.name} (n={n})")
            top = max(top, float(np.nanmax(mean)))
            if n >= MIN_BAND_SEEDS:
                ax.fill_between(steps, band["lo"].to_numpy(dtype=float), band["hi"].to_numpy(dtype=float),
                                color=color, alpha=0.12, lw=0)
        k = study["spec"].base.get("pass_k")
        ax.set_title(label.replace("pass@k", f"pass@{k}") if k else label, fontsize=11)
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if hi == 1.0:
            ax.set_ylim(0, 1)
        else:  # the means stay in view; a wide band may run off the top
            ax.set_ylim(0, 1.5 * top if top > 0 else None)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=max(1, len(labels)), frameon=False)
    fig.suptitle("GRPO vs CalibRL on the embedded default: mean over seeds, 95% CI bands (shipped study)",
                 fontsize=12)
    runs = shipped_runs(study["summary"])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_name(OUT.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png", metadata={"calibrl-runs": json.dumps(runs)})
    tmp.replace(OUT)
    plt.close(fig)
    print(f"{OUT.relative_to(ROOT)}: {len(runs)} runs, primary arms {[a.name for a in arms]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
