"""`python -m calibrl build-tiny`: build the embedded tiny Qwen2.5-VL and warm-start it by supervised fine-tuning.

Recipe (reference/prototype-findings.md §2): random init from fixed seeds (calibrl.tiny), then a full fine-tune with
AdamW (lr 5e-4, linear warm-up, gradient clipping 1.0) on a mixture of all task families in the policy's own short
style (`make_dataset(..., style="policy")`), never the expert solutions, so the expert stays off-policy. Every
`eval_every` steps the model is sampled at temperature 1 on a small selection set of DEFAULT_TASK (seed SELECT_SEED);
the first checkpoint with format >= 0.92 and accuracy in [0.25, 0.65] is kept (a margin inside the target of format
>= 0.9 and accuracy in [0.2, 0.7]). The kept model is then measured on the held-out set exactly as
`python -m calibrl eval --model <out>` does with its defaults, and everything is written to MODEL_CARD.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

TRAIN_SEED_BASE = 10000  # training data of task i uses seed TRAIN_SEED_BASE + i (+ 1000 * --seed)
SELECT_SEED = 20000      # checkpoint-selection prompts (DEFAULT_TASK)
DEFAULT_SHARE = 0.5      # share of DEFAULT_TASK in the SFT mixture; the other families split the rest equally
ACC_RANGE, MIN_FORMAT = (0.25, 0.65), 0.92
BUDGETS: dict[str, dict[str, int]] = {
    "smoke": dict(steps=8, batch=4, warmup=1, eval_every=0, select_n=0, final_n=4, final_k=1, pool=32, max_new=16),
    "full": dict(steps=400, batch=32, warmup=20, eval_every=20, select_n=64, final_n=200, final_k=4, pool=5000, max_new=64),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m calibrl build-tiny`."""
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full", help="smoke: a few steps (CI); full: the shipped model")
    parser.add_argument("--steps", type=int, default=None, help="maximum SFT steps (default: from --budget)")
    parser.add_argument("--seed", type=int, default=0, help="weights / data-order seed (default 0)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (required; in a clone, calibrl/assets/tiny-qwen2.5-vl replaces the "
                             "shipped model; elsewhere point CALIBRL_TINY_PATH at it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of the SFT warm start (default 5e-4)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-select", action="store_true", help="train all --steps, no early checkpoint selection")


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is None:  # never write into an installed package by default
        raise ValueError("--out: expected an output directory (the shipped model is calibrl/assets/tiny-qwen2.5-vl)")
    return Path(args.out)


def task_corpus(n_per_task: int = 200) -> list[str]:
    """Questions and both solution styles of every task family: extra BPE training text for the tokenizer."""
    from calibrl.tasks import TASKS, make_dataset

    texts: list[str] = []
    for i, task in enumerate(sorted(TASKS)):
        for style in ("policy", "expert"):
            ds = make_dataset(task, n_per_task, TRAIN_SEED_BASE + 500 + i, style=style).remove_columns(["image"])
            texts += list(ds["question"]) + list(ds["solution"]) + [f"<answer> {a} </answer>" for a in ds["answer"]]
    return texts


def sft_batch(processor: Any, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Processor inputs for prompt + policy-style solution + <|im_end|>, with `labels` only on the completion."""
    from calibrl.data import build_messages
    from calibrl.evaluate import check_image

    tok = processor.tokenizer
    prompts = [processor.apply_chat_template(build_messages(e["question"]), add_generation_prompt=True, tokenize=False)
               for e in examples]
    comps = [e["solution"] + tok.eos_token for e in examples]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = processor(text=[p + c for p, c in zip(prompts, comps)], padding=True, return_tensors="pt",
                        images=[[check_image(e["image"], i)] for i, e in enumerate(examples)])
    finally:
        tok.padding_side = side
    labels = enc["input_ids"].clone().fill_(-100)
    for r, c in enumerate(comps):
        ids = tok(c, add_special_tokens=False)["input_ids"]
        if enc["input_ids"][r, -len(ids):].tolist() != ids:
            raise ValueError(f"solution[{r}]: tokenizes differently after the prompt; cannot place labels")
        labels[r, -len(ids):] = enc["input_ids"][r, -len(ids):]
    enc["labels"] = labels
    return dict(enc)


def mixture_counts(tasks: list[str], default: str, total: int) -> dict[str, int]:
    """Examples per task: DEFAULT_SHARE of `total` for `default`, the rest split equally (each at least 1)."""
    if default not in tasks or total < 1:
        raise ValueError(f"tasks/total: expected {default!r} among {tasks} and total >= 1, got total={total}")
    if len(tasks) == 1:
        return {default: total}
    rest = max(1, round(total * (1 - DEFAULT_SHARE) / (len(tasks) - 1)))
    return {t: max(1, round(total * DEFAULT_SHARE)) if t == default else rest for t in tasks}


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, step / max(1, warmup))


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm-start, select and save; returns the record written into MODEL_CARD.md (and build.json)."""
    import random

    import torch

    from calibrl.evaluate import HELDOUT_SEED, evaluate
    from calibrl.models import policy_from_model
    from calibrl.tasks import DEFAULT_TASK, TASKS, make_dataset
    from calibrl.tiny import build_tiny_random

    b = dict(BUDGETS[args.budget])
    steps = args.steps if args.steps is not None else b["steps"]
    if steps < 1:
        raise ValueError(f"--steps: expected >= 1, got {steps}")
    if not (0 < args.lr < 1):
        raise ValueError(f"--lr: expected 0 < lr < 1, got {args.lr}")
    torch.set_num_threads(args.threads)
    t_start, load0 = time.perf_counter(), os.getloadavg()
    tasks = sorted(TASKS)
    corpus = task_corpus(200 if args.budget == "full" else 20)
    model, processor = build_tiny_random(args.seed, texts=corpus)
    n_params = sum(p.numel() for p in model.parameters())
    pool_n = min(b["pool"], steps * b["batch"])
    per_task = mixture_counts(tasks, DEFAULT_TASK, pool_n)
    pool: list[dict[str, Any]] = []
    for i, task in enumerate(tasks):
        ds = make_dataset(task, per_task[task], TRAIN_SEED_BASE + i + 1000 * args.seed, style="policy")
        pool += [ds[j] for j in range(len(ds))]
    rng = random.Random(args.seed)
    order: list[int] = []
    select = make_dataset(DEFAULT_TASK, b["select_n"], SELECT_SEED) if b["select_n"] else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    torch.manual_seed(args.seed)
    losses, evals, chosen, best = [], [], None, None
    t_train = time.perf_counter()
    model.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(1, steps + 1), desc="build-tiny SFT", unit="step", disable=not getattr(args, "progress", True)):
        if len(order) < b["batch"]:
            order += rng.sample(range(len(pool)), len(pool))
        idx, order = order[:b["batch"]], order[b["batch"]:]
        for g in opt.param_groups:
            g["lr"] = args.lr * _lr_factor(step, b["warmup"])
        loss = model(**sft_batch(processor, [pool[i] for i in idx])).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"SFT loss became non-finite at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if select is not None and b["eval_every"] and step % b["eval_every"] == 0:
            model.eval()
            r = evaluate(policy_from_model(model, processor), select, temperature=1.0, n_samples=2, max_new_tokens=64)
            model.train()
            row = dict(step=step, train_s=round(time.perf_counter() - t_train, 1), loss=round(sum(losses[-10:]) / len(losses[-10:]), 4),
                       accuracy=round(r["accuracy"], 3), format_rate=round(r["format_rate"], 3))
            evals.append(row)
            print(f"step {step}: {row}", flush=True)
            ok = r["format_rate"] >= MIN_FORMAT and ACC_RANGE[0] <= r["accuracy"] <= ACC_RANGE[1]
            dist = max(0.0, ACC_RANGE[0] - r["accuracy"], r["accuracy"] - ACC_RANGE[1]) + max(0.0, MIN_FORMAT - r["format_rate"])
            if best is None or dist < best[0]:
                best = (dist, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if ok and not args.no_select:
                chosen = step
                break
    train_s = time.perf_counter() - t_train
    if chosen is None and best is not None and not args.no_select:
        chosen = best[1]
        model.load_state_dict(best[2])
        print(f"warning: no checkpoint met the target; keeping the closest, step {chosen}", file=sys.stderr)
    model.eval()
    policy = policy_from_model(model, processor, name="tiny")
    heldout = make_dataset(DEFAULT_TASK, b["final_n"], HELDOUT_SEED)
    final = evaluate(policy, heldout, temperature=1.0, n_samples=b["final_k"], batch_size=64,
                     max_new_tokens=b["max_new"], seed=HELDOUT_SEED)
    greedy = evaluate(policy, heldout, temperature=0.0, n_samples=1, batch_size=64, max_new_tokens=b["max_new"],
                      seed=HELDOUT_SEED)
    record = dict(seed=args.seed, budget=args.budget, max_steps=steps, steps_done=len(losses), chosen_step=chosen or len(losses),
                  batch=b["batch"], lr=args.lr, max_new_tokens=b["max_new"], warmup=b["warmup"], threads=args.threads, loadavg_start=load0,
                  loadavg_end=os.getloadavg(), n_params=n_params, vocab=len(processor.tokenizer), tasks=tasks,
                  default_task=DEFAULT_TASK, pool_per_task=per_task, train_seeds=[TRAIN_SEED_BASE + i + 1000 * args.seed for i in range(len(tasks))],
                  select_seed=SELECT_SEED, heldout_seed=HELDOUT_SEED, loss_first=losses[0], loss_last=sum(losses[-5:]) / len(losses[-5:]),
                  losses=[round(x, 4) for x in losses], evals=evals, train_s=round(train_s, 1),
                  final={k: final[k] for k in ("accuracy", "format_rate", "pass_at_k", "reward_mean", "n_prompts", "n_samples")},
                  greedy={k: greedy[k] for k in ("accuracy", "format_rate")})
    record["total_s"] = round(time.perf_counter() - t_start, 1)
    _save(model, processor, _out_dir(args), record, args.overwrite)
    return record


def _check_out(out: Path, overwrite: bool) -> bool:
    """True if `out` holds a model to replace; ValueError if it must not be written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out: {out} is not empty; pass --overwrite to replace it")
        if not (out / "config.json").is_file():
            raise ValueError(f"--out: {out} is not empty and holds no model (no config.json); refusing to replace it")
        return True
    return False


def _save(model: Any, processor: Any, out: Path, record: dict[str, Any], overwrite: bool) -> None:
    if _check_out(out, overwrite):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(record))


def model_card(r: dict[str, Any]) -> str:
    """MODEL_CARD.md text for a build record."""
    f, g = r["final"], r["greedy"]
    rows = "\n".join(f"| {e['step']} | {e['train_s']} | {e['loss']} | {e['accuracy']} | {e['format_rate']} |" for e in r["evals"])
    cmd = f"python -m calibrl eval --model tiny --task {r['default_task']} --n {f['n_prompts']} --seed {r['heldout_seed']} " \
          f"--temperature 1 --samples-per-prompt {f['n_samples']} --batch-size 64 --max-new-tokens {r['max_new_tokens']}"
    return f"""# tiny-qwen2.5-vl (calibrl embedded default)

A {r['n_params'] / 1e6:.2f}M-parameter `Qwen2_5_VLForConditionalGeneration` (text: hidden 256, 4 layers, 4 heads,
2 KV heads, FFN 512, tied embeddings; vision: depth 2, hidden 96, patch 14, merge 2; 112x112 image -> 16 tokens),
byte-level BPE tokenizer (vocab {r['vocab']}) trained in code with Qwen's special tokens and a Qwen-style chat template,
`Qwen2VLImageProcessorPil` capped at 112*112 pixels, `ImageOnlyQwen2_5_VLProcessor` (calibrl.tiny). Load it with
`calibrl.models.load_policy("tiny")`. It is a teaching model: it knows only calibrl's procedural tasks.

## How it was made
`python -m calibrl build-tiny --budget {r['budget']} --seed {r['seed']}{'' if r['budget'] == 'full' else ' --out DIR'}` (calibrl.warmstart)
- Random init: `calibrl.tiny.build_tiny_random(seed={r['seed']})`, tokenizer corpus = built-in synthetic text + the questions
  and both solution styles of every task (seeds {TRAIN_SEED_BASE + 500}+i).
- SFT data: a mixture of tasks {', '.join(r['tasks'])} in the policy's own short style (`style="policy"`), never
  the expert solutions; examples per task {r['pool_per_task']} (seeds {r['train_seeds']} in that order), batches
  drawn uniformly from the pool without replacement per epoch.
- Full fine-tune, AdamW (betas 0.9/0.95, no weight decay), lr {r['lr']} with {r['warmup']} linear warm-up steps,
  grad clip 1.0, batch {r['batch']}, labels on the completion only (solution + `<|im_end|>`).
- Checkpoint selection: every 20 steps, sampled at T=1 on {BUDGETS[r['budget']]['select_n']} prompts x 2 of
  {r['default_task']} (seed {r['select_seed']}); kept the first step with format >= {MIN_FORMAT} and accuracy in
  {list(ACC_RANGE)}: **step {r['chosen_step']}** of at most {r['max_steps']}.
- Time: {r['train_s']} s of training, {r['total_s']} s in all, torch threads {r['threads']}, on a shared 2-core CPU
  (load average at start {r['loadavg_start'][0]:.2f}, at end {r['loadavg_end'][0]:.2f}).
- Loss: {r['loss_first']:.3f} at step 1 -> {r['loss_last']:.3f} (mean of the last 5 steps).

| step | train s | loss (last 10) | sampled acc (T=1) | format |
|---|---|---|---|---|
{rows}

## What it scores (held-out prompts, seed {r['heldout_seed']}, disjoint from training and selection seeds)
`{cmd}`

| decoding | prompts x samples | accuracy | format-valid | pass@k | mean reward |
|---|---|---|---|---|---|
| T=1 | {f['n_prompts']} x {f['n_samples']} | {f['accuracy']:.3f} | {f['format_rate']:.3f} | {f['pass_at_k']:.3f} | {f['reward_mean']:.3f} |
| greedy | {f['n_prompts']} x 1 | {g['accuracy']:.3f} | {g['format_rate']:.3f} | | |

Target: format-valid >= 0.90 and accuracy in [0.20, 0.70] at T=1. Numbers come from `calibrl.evaluate.evaluate` with
the same arguments as the command above; re-running the command reproduces them up to CPU thread-count numerics.
"""


def run(args: argparse.Namespace) -> int:
    """Run build-tiny; prints the chosen step and scores; returns 0, or 2 on bad input."""
    out = _out_dir(args)  # a ValueError is reported by calibrl.cli in the one error style
    _check_out(out, args.overwrite)
    rec = build(args)
    f = rec["final"]
    print(f"wrote {out}: step {rec['chosen_step']}, train {rec['train_s']} s, loss {rec['loss_first']:.3f} -> "
          f"{rec['loss_last']:.3f}, T=1 accuracy {f['accuracy']:.3f} format {f['format_rate']:.3f}, "
          f"greedy accuracy {rec['greedy']['accuracy']:.3f}")
    return 0
