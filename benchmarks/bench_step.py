"""One RL step of calibrl's trainer vs TRL 1.16's GRPOTrainer on the same tiny Qwen2.5-VL, side by side.

Same model (the shipped tiny model, else the random-init one saved to a temp dir), same prompts, P prompts x G
samples, same max new tokens, same LoRA (r=16 on the LM's q/k/v/o), fp32, no gradient checkpointing, one optimizer
step per RL step, no KL/reference model, token-mean loss, advantages not scaled by std, temperature 1, top-p 1.
The two contenders alternate step by step in one process: every TRL step ends in a callback that then runs one
calibrl step, so both see the same machine load. Wall and process CPU time are recorded; the first (warm-up) step
of each is dropped.

    python benchmarks/bench_step.py [--steps 6] [--prompts 4] [--group 8] [--new-tokens 32] [--threads 2]
        [--append benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "calibrl" / "assets" / "tiny-qwen2.5-vl"
LM_QKVO = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def model_dir(tmp: Path) -> Path:
    """The shipped tiny model, or the random-init one saved to `tmp` (same architecture)."""
    import calibrl.tiny as tiny

    tiny.register_processor()  # TRL's AutoProcessor must get the image-only processor, not a bare tokenizer
    if (ASSET / "config.json").exists():
        return ASSET
    model, proc = tiny.build_tiny_random(0)
    model.save_pretrained(tmp / "tiny")
    proc.save_pretrained(tmp / "tiny")
    return tmp / "tiny"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="measured steps per contender (plus one warm-up)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append", default=None, help="append a results section to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as d:
        return _bench(args, Path(d))


def _bench(args: argparse.Namespace, tmp: Path) -> int:
    from peft import LoraConfig
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from calibrl.config import TrainConfig
    from calibrl.data import build_messages
    from calibrl.models import load_policy
    from calibrl.rewards import score
    from calibrl.tasks import DEFAULT_TASK, make_dataset
    from calibrl.trainer import Trainer

    load_before = os.getloadavg()[0]
    path = model_dir(tmp)
    n_steps = args.steps + 1
    p, g = args.prompts, args.group
    data = make_dataset(DEFAULT_TASK, p * (n_steps + 2), 0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LM_QKVO)

    # ---- calibrl: mode grpo (token-mean, A = r - mean), one mini-batch = one optimizer step per RL step
    cfg = TrainConfig.from_budget("smoke", mode="grpo", model=str(path), steps=n_steps, prompts_per_step=p,
                                  group_size=g, max_new_tokens=args.new_tokens, minibatches=1, lr=1e-4,
                                  eval_every=0, kl_every=0, grad_split_every=0, samples_per_step=0,
                                  train_size=len(data), out=str(tmp / "runs"), name="ours")
    torch.manual_seed(0)
    ours = Trainer(cfg, policy=load_policy(str(path), lora=lora), train_data=data)

    # ---- TRL: same prompts, G, tokens, LoRA; fp32, no checkpointing, one optimizer step per generation
    processor = AutoProcessor.from_pretrained(str(path))
    assert hasattr(processor, "image_processor"), "AutoProcessor returned a tokenizer (processor not registered)"
    tok = processor.tokenizer
    suppress = [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS] + list(ours.policy.suppress_token_ids)
    trl_data = data.map(lambda e: {"prompt": build_messages(e["question"])})

    def reward(completions, answer, **_):
        return [score(c[0]["content"] if isinstance(c, list) else c, a)["reward"] for c, a in zip(completions, answer)]

    times: dict[str, list[tuple[float, float]]] = {"trl": [], "calibrl": []}

    class Interleave(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, a, state, control, **kw):
            times["trl"].append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))
            t = (time.perf_counter(), time.process_time())
            ours.step()
            times["calibrl"].append((time.perf_counter() - t[0], time.process_time() - t[1]))

    targs = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=p * g, num_generations=g,
                       gradient_accumulation_steps=1, max_completion_length=args.new_tokens, max_steps=n_steps,
                       learning_rate=1e-4, beta=0.0, loss_type="bnpo", scale_rewards="none", temperature=1.0,
                       top_p=1.0, top_k=0, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                       logging_steps=1000, save_strategy="no", shuffle_dataset=False,
                       generation_kwargs={"suppress_tokens": sorted(set(suppress))}, seed=0)
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=str(path), reward_funcs=reward, args=targs, train_dataset=trl_data,
                          processing_class=processor, peft_config=lora, callbacks=[Interleave()])
    trainer.train()

    rows = []
    for name in ("trl", "calibrl"):
        wall = [w for w, _ in times[name][1:]]
        cpu = [c for _, c in times[name][1:]]
        rows.append((name, statistics.median(wall), statistics.mean(wall), statistics.median(cpu)))
    ratio = rows[1][1] / rows[0][1]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " \
              f"{args.threads} threads, 1-min load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after"
    cmd = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    lines = [
        "## One RL step: calibrl trainer vs TRL 1.16 GRPOTrainer (benchmarks/bench_step.py)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine}; model: {'shipped tiny' if path == ASSET else 'random-init tiny'} Qwen2.5-VL; "
        f"{p} prompts x G={g}, <= {args.new_tokens} new tokens, LoRA r=16 on LM q/k/v/o, fp32, 1 optimizer step; "
        f"{args.steps} measured steps each, interleaved in one process, warm-up dropped.",
        "",
        "| contender | median wall s/step | mean wall s/step | median CPU s/step |",
        "|---|---|---|---|",
        *[f"| {n} | {m:.3f} | {a:.3f} | {c:.3f} |" for n, m, a, c in rows],
        "",
        f"**Time ratio calibrl / TRL (median wall): {ratio:.2f}x** (target <= 0.7x). calibrl's step also computes "
        "the expert rows' log-probs and every probe; TRL's excludes data loading.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
