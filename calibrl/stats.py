"""Small-sample statistics for seed comparisons: Student-t confidence intervals of a mean and of paired differences.

Seeds are the unit of replication. `mean_ci` is the 95% t-interval of the mean over seeds; `paired_diff` pairs two
arms by seed (same seed = same prompts, same start, same sampling stream at step 1) and gives the t-interval of the
mean difference, which removes the between-seed variance both arms share.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30; beyond 30 the table's tail is interpolated in 1/df
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (exact table to 30, then 1/df interpolation
    towards the normal quantile 1.960; error < 0.001)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df: expected an int >= 1, got {df!r}")
    if df <= 30:
        return _T975[df - 1]
    return 1.960 + (2.042 - 1.960) * 30 / df


def _finite(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values if v is not None]
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name}: expected finite numbers, got {bad[:3]}")
    return out


def mean_ci(values: Sequence[float | None]) -> dict:
    """{"mean", "lo", "hi", "half", "n", "sd"} of the non-None values: the 95% t-interval of the mean. With n = 1
    the interval is undefined (lo = hi = half = None); with n = 0 everything is None."""
    xs = _finite(values, "values")
    n = len(xs)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "half": None, "n": 0, "sd": None}
    m = sum(xs) / n
    if n == 1:
        return {"mean": m, "lo": None, "hi": None, "half": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "half": half, "n": n, "sd": sd}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least this uneven | each non-tied pair is a fair coin),
    2 · P(X >= max(wins, losses)) for X ~ Binomial(wins + losses, 1/2), capped at 1 (1.0 with no non-tied pair).
    It needs no normality, which the paired t-interval does (a seed that collapses makes the differences bimodal)."""
    for name, v in (("wins", wins), ("losses", losses)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    n, k = wins + losses, max(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_diff(arm: Mapping[int, float | None], base: Mapping[int, float | None]) -> dict:
    """Mean of arm[s] - base[s] over the seeds s present (not None) in both, with its 95% paired t-interval;
    also "seeds" (the paired seeds), "wins" / "losses" (seeds where the arm is larger / smaller; ties are neither)
    and "sign_p" (`sign_test` of wins against losses)."""
    seeds = sorted(s for s in arm if s in base and arm[s] is not None and base[s] is not None)
    diffs = [float(arm[s]) - float(base[s]) for s in seeds]
    out = mean_ci(diffs)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    out.update(seeds=seeds, wins=wins, losses=losses, sign_p=sign_test(wins, losses))
    return out


def fmt_ci(ci: Mapping, digits: int = 3) -> str:
    """"m ± h (n)" for a mean_ci/paired_diff result; "–" when empty."""
    if ci.get("mean") is None:
        return "–"
    if ci.get("half") is None:
        return f"{ci['mean']:.{digits}f} (n={ci['n']})"
    return f"{ci['mean']:.{digits}f} ± {ci['half']:.{digits}f}"


# --------------------------------------------------------------------------------- metric ranges (figure bands)
_UNIT = (0.0, 1.0)
_NONNEG = (0.0, math.inf)
_FREE = (-math.inf, math.inf)


def metric_range(metric: str) -> tuple[float, float]:
    """The range a History metric can take: [0, 1] for fractions, rates and accuracies, [0, inf) for entropies,
    KL (k3 >= 0), lengths, norms, times, |A| and the reward (accuracy + format bonus); (-inf, inf) otherwise
    (losses, gaps, covariances). Figures clip a metric's confidence band to this range."""
    if not isinstance(metric, str):
        raise ValueError(f"metric: expected a column name, got {type(metric).__name__}")
    m = metric.lower()
    if (m.endswith(("_frac", "_rate", "_acc")) or m.startswith(("acc", "gate_", "eval_greedy_acc", "eval_pass_at"))
            or m in ("clipfrac", "pass_rate")):
        return _UNIT
    if m.startswith(("entropy", "kl_", "response_len", "expert_len", "grad_norm", "abs_adv", "time_")) or \
            m in ("time_s", "logp_gap_max", "reward_mean"):
        return _NONNEG
    return _FREE


__all__ = ["t975", "mean_ci", "paired_diff", "fmt_ci", "metric_range"]
