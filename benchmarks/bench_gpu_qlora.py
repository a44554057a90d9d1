"""Peak VRAM and step time of one CalibRL-shaped RL step on a Qwen2.5-VL-3B-sized model in 4-bit NF4 + LoRA.

No hub download is possible on the benchmark machines, so the model is the real Qwen2.5-VL-3B-Instruct
architecture (benchmarks/qwen25vl3b_config.py) with random weights, saved to a local directory and then loaded
through the same path a user takes: `calibrl.models.load_policy(path, quantization="4bit", lora=...)`, then
`calibrl.trainer.Trainer.step()` (rollout with generate, expert row, old log-probs, CalibRL loss, backward,
AdamW). Random weights almost never emit EOS, so every response runs the full `--max-new-tokens`.

    python benchmarks/bench_gpu_qlora.py --out /tmp/q3b --steps 3          # needs a CUDA GPU
"""
from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/qwen25vl3b-random")
    ap.add_argument("--steps", type=int, default=3, help="RL steps; the first is a warm-up")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=448)
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
                                  eval_every=0, kl_every=1, grad_split_every=1, out="/tmp/bench-runs",
                                  name="gpu-qlora", lr=1e-5)
    t0 = time.perf_counter()
    policy = load_policy(str(out), quantization="4bit", lora=lora_config(cfg))
    load_s = time.perf_counter() - t0
    size = (args.image_size, args.image_size)
    rows = [sample(DEFAULT_TASK, i, 0) for i in range(8)]
    data = _Rows([dict(r, image=r["image"].convert("RGB").resize(size)) for r in rows])
    trainer = Trainer(cfg, policy=policy, train_data=data, overwrite=True)
    dev = torch.cuda.get_device_name()
    grid = trainer.policy.processor.image_processor(images=[data[0]["image"]], return_tensors="pt")["image_grid_thw"]
    n_img = int(grid.prod().item() // 4)
    results = []
    for i in range(args.steps):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t = time.perf_counter()
        row = trainer.step()
        torch.cuda.synchronize()
        results.append(dict(step=i + 1, wall_s=time.perf_counter() - t,
                            peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                            peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                            response_len_mean=row.get("response_len_mean"), logp_gap_max=row.get("logp_gap_max"),
                            skipped=row.get("skipped")))
        print(json.dumps(results[-1]), flush=True)
    timed = results[1:] or results
    summary = dict(device=dev, torch=torch.__version__, params_b=None, load_s=load_s, image_tokens=n_img,
                   group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                   step_s_mean=sum(r["wall_s"] for r in timed) / len(timed),
                   peak_alloc_gib=max(r["peak_alloc_gib"] for r in results),
                   peak_reserved_gib=max(r["peak_reserved_gib"] for r in results), steps=results)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
