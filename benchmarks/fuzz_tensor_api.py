"""Adversarial campaign over the public tensor API: counts of bad inputs tried, clear errors and silent failures.

Every public function of calibrl.advantage, calibrl.losses (with calibrl.losses_hybrid) and calibrl.probes gets,
for each of several valid random draws, one corrupted copy per bad-input class and argument (tests/fuzz_cases.py):
shape, dtype, mask values, non-finite values, out-of-range values and scalars, mixed dtype, mixed device (the "meta"
device stands in for a second device), and the benign variations half precision, requires_grad, NaN/+5 where the
mask hides them. Outcomes:
  clear error   a ValueError whose message starts with the argument's name (expected for a bad input)
  correct       a finite result equal to the float64 reference of tests/fuzz_refs.py, gradients included, no
                gradient into constants (expected for a benign variation)
  silent        a bad input accepted, or a wrong / non-finite number or gradient
  unclear       another exception type, or a ValueError naming another argument
  rejected      a benign variation refused

Usage:  python benchmarks/fuzz_tensor_api.py [--seeds 3] [--show 20]
Point PYTHONPATH at another checkout to count an older version of the package with the same cases.
"""
from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzz_cases as FC  # noqa: E402

COLS = ("ok-error", "ok-equal", "silent", "unclear", "rejected")
NAMES = {"ok-error": "clear error", "ok-equal": "correct", "silent": "silent", "unclear": "unclear",
         "rejected": "rejected"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="valid draws per function (default 3)")
    ap.add_argument("--show", type=int, default=20, help="failures to list (default 20)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import calibrl

    by_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_fn: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []
    specs = FC.specs()
    for spec in specs:
        for seed in range(args.seeds):
            for case in FC.cases(spec, seed):
                got, why = FC.outcome(case)
                kind = "bad" if case.expect == "error" else "benign"
                by_class[f"{case.cls} ({kind})"][got] += 1
                by_fn[spec.name][got] += 1
                if got not in ("ok-error", "ok-equal"):
                    bad.append(f"{spec.name} [{case.cls}] {case.what}: {got}: {why[:160]}")
    total = collections.Counter()
    for c in by_class.values():
        total.update(c)
    n_fn = len({s.name.split("[")[0] for s in specs})
    print(f"package: {Path(calibrl.__file__).parent}   functions: {n_fn}   seeds: {args.seeds}   torch "
          f"{torch.__version__}")
    head = "| class | tried | " + " | ".join(NAMES[c] for c in COLS) + " |"
    print(head)
    print("|" + "---|" * (len(COLS) + 2))
    for cls in sorted(by_class):
        c = by_class[cls]
        print(f"| {cls} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in COLS) + " |")
    n_bad = sum(sum(c.values()) for k, c in by_class.items() if k.endswith("(bad)"))
    n_ben = sum(sum(c.values()) for k, c in by_class.items() if k.endswith("(benign)"))
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[k]) for k in COLS) + " |")
    print(f"\nbad inputs tried: {n_bad}; clear errors: {total['ok-error']}; benign variations tried: {n_ben}; "
          f"correct results: {total['ok-equal']}; silent: {total['silent']}; unclear errors: {total['unclear']}; "
          f"benign rejected: {total['rejected']}")
    for line in bad[: args.show]:
        print("  ", line)
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
