"""Per-step cost of checkpointing every step (save_every=1) on the embedded tiny model.

    python benchmarks/bench_checkpoint.py --budget small --steps 6 --threads 1

Trains `--steps` RL steps of the budget (mode calibrl) with a checkpoint after every step and times each
`save_checkpoint` call (torch.save to memory, temporary file, fsync, rename) against the whole step. Prints one
markdown row per budget: checkpoint size, median save ms, median step ms, and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="small")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    import calibrl.trainer as tr
    from calibrl.checkpoint import checkpoint_path
    from calibrl.config import TrainConfig

    torch.set_num_threads(args.threads)
    saves: list[float] = []
    real = tr.save_checkpoint

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        saves.append(time.perf_counter() - t0)
        return out

    tr.save_checkpoint = timed
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_budget(args.budget, mode="calibrl", steps=args.steps, save_every=1, eval_every=0,
                                      out=out, name="bench", threads=args.threads)
        trainer = tr.Trainer(cfg)
        steps = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.step()
            steps.append(time.perf_counter() - t0)
        size = checkpoint_path(trainer.run_dir).stat().st_size
    step_saves = saves[1:]  # saves[0] is the step-0 checkpoint written at start
    save_ms, step_ms = 1e3 * statistics.median(step_saves), 1e3 * statistics.median(steps)
    print("| budget | checkpoint size | save ms (median) | step ms (median, save included) | save / step |")
    print("|---|---|---|---|---|")
    print(f"| {args.budget} | {size / 1e6:.2f} MB | {save_ms:.1f} | {step_ms:.0f} | {100 * save_ms / step_ms:.1f}% |")


if __name__ == "__main__":
    main()
