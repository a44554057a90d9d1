"""Benchmark: calibrl_loss forward+backward against TRL 1.16.0's GRPO loss on identical tensors, and the peak
memory of the chunked entropy probe (hidden states + LM head) against a naive full-softmax entropy.

    python benchmarks/bench_losses.py --part time     [--repeats 30] [--threads 1]      (needs trl==1.16.0)
    python benchmarks/bench_losses.py --part memory   [--device cpu|cuda] [--batch 8]   (each method in its own
                                                                                      subprocess)
Time: B=64, T=1024, ragged mask, ratios near 1; contenders alternate call by call in one process (order swapped
every repeat), first 3 rounds dropped as warm-up; median wall and process-CPU time per call (forward + backward,
info dicts included). Memory: V=151,936, hidden 2048 (Qwen2.5-VL-3B), bf16 hidden states and LM head, T=1024.
On CPU the peak is the process's ru_maxrss after the probe minus ru_maxrss before it (inputs already built); on
CUDA it is torch.cuda.max_memory_allocated minus the memory allocated before the probe.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

VOCAB, HIDDEN = 151_936, 2048


# ---------------------------------------------------------------------------------------------------- time
def make_batch(B: int = 64, T: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.1).clamp(max=0.0)   # log-probs are <= 0
    lens = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    rewards = (torch.rand(B, generator=g) > 0.5).float()
    adv = rewards - rewards.view(-1, 8).mean(1).repeat_interleave(8)
    expert = -torch.rand(B, T, generator=g) * 6
    return logp, old, adv, mask, expert, rewards > 0.1


def bench_time(repeats: int, threads: int) -> dict:
    from test_trl_parity import trl_loss  # the mock harness of tests/test_trl_parity.py (trl 1.16.0)

    from calibrl.losses import calibrl_loss, policy_loss

    torch.set_num_threads(threads)
    logp, old, adv, mask, expert, passed = make_batch()

    def run_calibrl():
        x = logp.clone().requires_grad_()
        loss, _ = calibrl_loss(x, old, expert, adv, mask, passed)
        loss.backward()

    def run_policy():
        x = logp.clone().requires_grad_()
        loss, _ = policy_loss(x, old, adv, mask)
        loss.backward()

    def run_trl():
        x = logp.clone().requires_grad_()
        trl_loss("dapo", x, old, adv, mask).backward()

    fns = {"calibrl_loss (ours)": run_calibrl, "policy_loss (ours, GRPO)": run_policy, "TRL dapo _compute_loss": run_trl}
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats + 3):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            w1, c1 = time.perf_counter(), time.process_time()
            if r >= 3:
                wall[k].append(w1 - w0)
                cpu[k].append(c1 - c0)
    out = {k: {"wall_ms": 1e3 * statistics.median(wall[k]), "cpu_ms": 1e3 * statistics.median(cpu[k]),
               "wall_ms_min": 1e3 * min(wall[k])} for k in fns}
    trl = out["TRL dapo _compute_loss"]
    out["ratio_calibrl_vs_trl_wall"] = out["calibrl_loss (ours)"]["wall_ms"] / trl["wall_ms"]
    out["ratio_calibrl_vs_trl_cpu"] = out["calibrl_loss (ours)"]["cpu_ms"] / trl["cpu_ms"]
    out["config"] = {"B": 64, "T": 1024, "repeats": repeats, "threads": threads, "torch": torch.__version__}
    return out


# ---------------------------------------------------------------------------------------------------- memory
def naive_entropy(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The usual full-softmax entropy: the whole [B,T,V] float32 logits at once."""
    logits = (hidden @ weight.T).float()                   # [B,T,V]
    logp = torch.log_softmax(logits, -1)                   # [B,T,V]
    return -(logp.exp() * logp).sum(-1)                    # [B,T]


def mem_worker(method: str, device: str, batch: int, seq: int) -> dict:
    """Build inputs, record the baseline, run one entropy method, report the extra peak (bytes)."""
    from calibrl.probes import entropy_from_hidden

    torch.manual_seed(0)
    dev = torch.device(device)
    hidden = torch.empty(batch, seq, HIDDEN, dtype=torch.bfloat16, device=dev).normal_()
    weight = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16, device=dev).normal_(std=0.02)
    fn = naive_entropy if method == "naive" else (lambda h, w: entropy_from_hidden(h, w, chunk_size=256))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            ent = fn(hidden, weight)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        how = "torch.cuda.max_memory_allocated - memory_allocated before"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        t0 = time.perf_counter()
        with torch.no_grad():
            ent = fn(hidden, weight)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        how = "ru_maxrss after - ru_maxrss before (inputs built)"
    secs = time.perf_counter() - t0
    return {"method": method, "device": device, "peak_bytes": peak, "seconds": secs, "how": how,
            "entropy_mean": float(ent.float().mean()), "B": batch, "T": seq, "V": VOCAB, "H": HIDDEN}


def bench_memory(device: str, batch: int, seq: int) -> dict:
    res = {}
    for method in ("chunked", "naive"):
        cmd = [sys.executable, __file__, "--mem-worker", method, "--device", device, "--batch", str(batch),
               "--seq", str(seq)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if p.returncode != 0:
            raise RuntimeError(f"{method} worker failed:\n{p.stderr[-3000:]}")
        res[method] = json.loads(p.stdout.strip().splitlines()[-1])
    res["ratio_chunked_vs_naive"] = res["chunked"]["peak_bytes"] / res["naive"]["peak_bytes"]
    res["max_abs_entropy_mean_diff"] = abs(res["chunked"]["entropy_mean"] - res["naive"]["entropy_mean"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("time", "memory", "all"), default="all")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--mem-worker", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_worker:
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(mem_worker(a.mem_worker, a.device, a.batch, a.seq)))
        return 0
    res = {}
    if a.part in ("time", "all"):
        res["time"] = bench_time(a.repeats, a.threads)
        t = res["time"]
        print("| contender | wall ms (median) | CPU ms (median) | wall ms (min) |\n|---|---|---|---|")
        for k in ("calibrl_loss (ours)", "policy_loss (ours, GRPO)", "TRL dapo _compute_loss"):
            print(f"| {k} | {t[k]['wall_ms']:.2f} | {t[k]['cpu_ms']:.2f} | {t[k]['wall_ms_min']:.2f} |")
        print(f"time ratio calibrl/TRL: wall {t['ratio_calibrl_vs_trl_wall']:.3f}, "
              f"CPU {t['ratio_calibrl_vs_trl_cpu']:.3f}")
    if a.part in ("memory", "all"):
        res["memory"] = m = bench_memory(a.device, a.batch, a.seq)
        print("| entropy method | peak extra memory (MiB) | seconds |\n|---|---|---|")
        for k in ("chunked", "naive"):
            print(f"| {k} | {m[k]['peak_bytes'] / 2**20:.0f} | {m[k]['seconds']:.1f} |")
        print(f"memory ratio chunked/naive: {m['ratio_chunked_vs_naive']:.4f} ({m['chunked']['how']}); "
              f"|mean entropy diff| {m['max_abs_entropy_mean_diff']:.2e}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
