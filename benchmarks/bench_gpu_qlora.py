"""Peak VRAM and step time of one CalibRL-shaped RL step on a Qwen2.5-VL-3B-sized model in 4-bit NF4 + LoRA.

No hub download is possible on the benchmark machines, so the model is the real Qwen2.5-VL-3B-Instruct
architecture (benchmarks/qwen25vl3b_config.py) with random weights, saved to a local directory and then loaded
through the same path a user takes: `calibrl.models.load_policy(path, quantization="4bit", lora=...)`, then
`calibrl.trainer.Trainer.step()` (rollout with generate, expert row, old log-probs, CalibRL loss, backward,
AdamW). Random weights almost never emit EOS, so every response runs the full `--max-new-tokens`.

Recorded per step: wall time; the phase split (generation, the no-grad old/expert/ref log-prob passes, the update
with its training forwards and backward, the probes) with CUDA peak allocated/reserved memory per phase; the
trainer's own History timings; and the log-prob gap, labelled sampler-vs-trainer only when the sampler recorded its
chosen-token log-probs (otherwise it compares the recomputed old log-probs with the training forward, and says so).
Options: `--cache static` (a preallocated KV cache for `generate`), `--attn sdpa|eager|flash_attention_2`.

    bash benchmarks/gpu_setup.sh local                    # here: the wheels the device image lacks, into .whl/
    bash benchmarks/gpu_setup.sh bench [options]          # there (carry .whl): install, then this script
    python benchmarks/bench_gpu_qlora.py --out /tmp/q3b --steps 3          # needs a CUDA GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_random_3b(out: Path) -> None:
    """Random-init Qwen2.5-VL-3B weights (bf16) plus calibrl's tiny tokenizer/processor, saved to `out`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from calibrl.tiny import build_tiny_random
    from qwen25vl3b_config import qwen25vl_3b_config

    _, processor = build_tiny_random(seed=0)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
    cfg = qwen25vl_3b_config(processor.tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    print(f"built random Qwen2.5-VL-3B architecture: {n / 1e9:.3f} B parameters -> {out}", flush=True)


class _Rows(list):
    """A list of example dicts with the two attributes the trainer reads (the GPU image has no `datasets`)."""

    @property
    def column_names(self) -> list[str]:
        return list(self[0])


class PhaseMeter:
    """Wall time and CUDA peak allocated/reserved memory per phase of a step, by wrapping the functions that make up
    the phases (nested phases: the inner one is charged to itself, and its peak also counts for the outer one)."""

    def __init__(self):
        self.stack: list[dict] = []
        self.rows: dict[str, dict] = {}
        self.sampler_logp_recorded: bool | None = None

    def reset(self) -> None:
        self.rows = {}
        self.sampler_logp_recorded = None

    @staticmethod
    def _peaks() -> tuple[float, float]:
        if not torch.cuda.is_available():  # (a CPU dry run of the wrapping: times only)
            return 0.0, 0.0
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30

    @staticmethod
    def _sync(reset: bool = False) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            if reset:
                torch.cuda.reset_peak_memory_stats()

    def wrap(self, fn, phase: str):
        def wrapped(*a, **k):
            if any(f["phase"] == phase for f in self.stack):  # a recursive call (chunking) of the same phase
                return fn(*a, **k)
            self._sync()
            if self.stack:  # the outer phase's peak so far, before the counters are reset
                top = self.stack[-1]
                top["alloc"], top["res"] = (max(x, y) for x, y in zip((top["alloc"], top["res"]), self._peaks()))
            self._sync(reset=True)
            frame = dict(phase=phase, alloc=0.0, res=0.0, t=time.perf_counter())
            self.stack.append(frame)
            try:
                out = fn(*a, **k)
                self._sync()
            finally:
                self.stack.pop()
                alloc, res = (max(x, y) for x, y in zip((frame["alloc"], frame["res"]), self._peaks()))
                row = self.rows.setdefault(phase, dict(s=0.0, calls=0, peak_alloc_gib=0.0, peak_reserved_gib=0.0))
                row["s"] += time.perf_counter() - frame["t"]
                row["calls"] += 1
                row["peak_alloc_gib"] = max(row["peak_alloc_gib"], alloc)
                row["peak_reserved_gib"] = max(row["peak_reserved_gib"], res)
                if self.stack:
                    top = self.stack[-1]
                    top["alloc"], top["res"] = max(top["alloc"], alloc), max(top["res"], res)
                self._sync(reset=True)
            if phase == "generation":  # did the sampler record its own chosen-token log-probs?
                lp = out[2] if isinstance(out, tuple) else getattr(out, "logp", None)
                self.sampler_logp_recorded = lp is not None
            return out
        return wrapped


def instrument(trainer, meter: PhaseMeter) -> list[str]:
    """Wrap generation (rollout.sample_groups), the no-grad old/expert/ref log-prob passes (rollout.rows_logprobs as
    the rollout calls it), the update (Trainer.update: training forwards, backward, optimizer) and the probes
    (stepstats.rollout_probes). Returns the wrapped names (the set depends on the calibrl version)."""
    import calibrl.rollout as ro
    import calibrl.stepstats as st

    done = []
    for mod, name, phase in ((ro, "sample_groups", "generation"), (ro, "rows_logprobs", "logprobs"),
                             (st, "rollout_probes", "probes")):
        if hasattr(mod, name):
            setattr(mod, name, meter.wrap(getattr(mod, name), phase))
            done.append(f"{mod.__name__}.{name}")
    trainer.update = meter.wrap(trainer.update, "update")
    done.append("Trainer.update")
    return done


def set_generation(policy, cache: str, attn: str) -> dict:
    """Benchmark options: the KV cache kind used by `generate` ("static" preallocates it for max length) and the
    attention implementation. Returns what was applied."""
    base = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
    applied = {}
    if attn != "default":
        if hasattr(base, "set_attn_implementation"):
            base.set_attn_implementation(attn)
        else:
            base.config._attn_implementation = attn
        applied["attn"] = attn
    applied["attn_in_use"] = getattr(base.config, "_attn_implementation", None)
    if cache == "static":  # calibrl builds its own GenerationConfig; add the cache kind at the generate call
        orig = base.generate

        def generate(*a, generation_config=None, **k):
            if generation_config is not None:
                generation_config = copy.deepcopy(generation_config)
                generation_config.cache_implementation = "static"
            else:
                k["cache_implementation"] = "static"
            return orig(*a, generation_config=generation_config, **k)

        base.generate = generate
        applied["cache"] = "static"
    return applied


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/qwen25vl3b-random")
    ap.add_argument("--steps", type=int, default=3, help="RL steps; the first is a warm-up")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic", help="KV cache of generate")
    ap.add_argument("--attn", choices=("default", "sdpa", "eager", "flash_attention_2"), default="default")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from calibrl.config import TrainConfig
    from calibrl.models import load_policy
    from calibrl.tasks import DEFAULT_TASK, sample
    from calibrl.trainer import Trainer, lora_config

    out = Path(args.out)
    if not (out / "config.json").exists():
        build_random_3b(out)
    cfg = TrainConfig.from_budget("smoke", mode="calibrl", model=str(out), steps=args.steps, prompts_per_step=1,
                                  group_size=args.group_size, max_new_tokens=args.max_new_tokens, minibatches=1,
                                  grad_accum=args.grad_accum, eval_every=0, kl_every=1, grad_split_every=1,
                                  out="/tmp/bench-runs", name="gpu-qlora", lr=1e-5)
    t0 = time.perf_counter()
    policy = load_policy(str(out), quantization="4bit", lora=lora_config(cfg))
    load_s = time.perf_counter() - t0
    applied = set_generation(policy, args.cache, args.attn)
    size = (args.image_size, args.image_size)
    rows = [sample(DEFAULT_TASK, i, 0) for i in range(8)]
    data = _Rows([dict(r, image=r["image"].convert("RGB").resize(size)) for r in rows])
    trainer = Trainer(cfg, policy=policy, train_data=data, overwrite=True)
    meter = PhaseMeter()
    wrapped = instrument(trainer, meter)
    dev = torch.cuda.get_device_name()
    grid = trainer.policy.processor.image_processor(images=[data[0]["image"]], return_tensors="pt")["image_grid_thw"]
    n_img = int(grid.prod().item() // 4)
    results = []
    for i in range(args.steps):
        meter.reset()
        torch.cuda.synchronize()
        t = time.perf_counter()
        row = trainer.step()
        torch.cuda.synchronize()
        gap = row.get("logp_gap_max")
        true_gap = bool(meter.sampler_logp_recorded)
        peaks = list(meter.rows.values())
        results.append(dict(
            step=i + 1, wall_s=time.perf_counter() - t,
            peak_alloc_gib=max([r["peak_alloc_gib"] for r in peaks] + [row.get("mem_peak_allocated_gib") or 0]),
            peak_reserved_gib=max([r["peak_reserved_gib"] for r in peaks] + [row.get("mem_peak_reserved_gib") or 0]),
            phases=meter.rows, row_timings={k: v for k, v in row.items() if k.endswith("_s") and k != "time_s"},
            response_len_mean=row.get("response_len_mean"),
            # sampler-vs-trainer only when the sampler recorded its own log-probs; else the trainer's recomputed
            # old log-probs were compared with its training forward (not a drift check of the sampler)
            logp_gap_sampler_vs_trainer=gap if true_gap else None,
            logp_gap_recomputed_vs_trainer=None if true_gap else gap,
            skipped=row.get("skipped")))
        print(json.dumps(results[-1]), flush=True)
    timed = results[1:] or results
    summary = dict(device=dev, torch=torch.__version__, load_s=load_s, image_tokens=n_img, options=applied,
                   group_size=args.group_size, max_new_tokens=args.max_new_tokens, grad_accum=args.grad_accum,
                   wrapped=wrapped, step_s_mean=sum(r["wall_s"] for r in timed) / len(timed),
                   phase_s_mean={k: sum(r["phases"].get(k, {}).get("s", 0.0) for r in timed) / len(timed)
                                 for k in ("generation", "logprobs", "update", "probes")},
                   peak_alloc_gib=max(r["peak_alloc_gib"] for r in results),
                   peak_reserved_gib=max(r["peak_reserved_gib"] for r in results), steps=results)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
