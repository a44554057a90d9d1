"""`python -m calibrl eval`: sample answers from a policy on held-out task prompts; format rate and accuracy.

Held-out seeds: the eval command defaults to `--seed 90001` (HELDOUT_SEED). The warm start trains on seeds
10000 + task index (calibrl.warmstart.TRAIN_SEED_BASE) and selects its checkpoint on seed 20000
(calibrl.warmstart.SELECT_SEED); none of these overlap. `make_dataset(task, n, seed)` is deterministic, so the same
(task, n, seed) always gives the same prompts.

Python API: `evaluate(policy, dataset, *, temperature, n_samples, ...) -> dict` (used by the trainer and notebooks).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

HELDOUT_SEED = 90001


def check_image(image: Any, index: int = 0) -> Any:
    """An RGB PIL image ready for the processor (`calibrl.data.check_image` without side limits: the processor
    rescales any size); ValueError naming `index` for a non-image, an empty image or an aspect ratio above 200."""
    from calibrl.data import check_image as _check

    return _check(image, label=f"image[{index}]", min_side=None, max_side=None)


def generate_completions(policy: Any, images: Sequence[Any], questions: Sequence[str], *, temperature: float,
                         max_new_tokens: int, n_samples: int = 1, top_p: float = 1.0,
                         sampler: str = "auto") -> list[str]:
    """`n_samples` sampled (or greedy, temperature 0) completions per (image, question), grouped by prompt, from the
    training sampler (calibrl.rollout.sample_groups: the same distribution, prompt encoder and EOS ids)."""
    import torch

    from calibrl.prompts import encode_prompts
    from calibrl.rollout import sample_groups

    greedy = temperature == 0
    inputs = encode_prompts(policy, list(images), list(questions))
    s = sample_groups(policy, inputs, n_samples, max_new_tokens=max_new_tokens, temperature=1.0 if greedy else temperature,
                      top_p=top_p, greedy=greedy, sampler=sampler)
    ids = torch.where(s.mask, s.completion_ids, policy.pad_token_id).cpu()
    return policy.tokenizer.batch_decode(ids, skip_special_tokens=True)


def evaluate(policy: Any, dataset: Any, *, temperature: float = 1.0, n_samples: int = 1, batch_size: int = 32,
             max_new_tokens: int = 64, seed: int | None = 0, return_rows: bool = False, top_p: float = 1.0,
             sampler: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Sample `n_samples` answers per prompt of `dataset` (columns image, question, answer) and score them: the one
    held-out evaluator (the trainer's eval columns come from it).

    Returns floats accuracy (mean over all samples), format_rate, reward_mean, pass_at_k (share of prompts with at
    least one correct sample), mean_chars, and ints n_prompts, n_samples; with `return_rows`, also `rows`: one dict
    per sample in the `eval --out` schema (question, answer, completion, pred, correct, prompt_id).
    temperature 0 is greedy (then n_samples must be 1). `batch_size` bounds the rows of one sampler call (whole
    prompts, at least one). `seed` seeds torch's RNG before sampling; None leaves it alone (the trainer's stream).
    `progress`: a tqdm bar over the prompts (the `eval` command turns it on).
    """
    from calibrl.rewards import extract_answer, score

    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                             and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if isinstance(n_samples, bool) or not (isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"n_samples: expected an int >= 1, got {n_samples!r}")
    if temperature == 0 and n_samples != 1:
        raise ValueError(f"n_samples: greedy decoding (temperature 0) gives identical samples; expected 1, got {n_samples}")
    if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: expected None or an int, got {seed!r}")
    missing = [c for c in ("image", "question", "answer") if c not in getattr(dataset, "column_names", [])]
    if missing:
        raise ValueError(f"dataset: missing column(s) {missing}; expected image, question, answer")
    if len(dataset) == 0:
        raise ValueError("dataset: expected at least one prompt, got 0")
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    per_call = max(1, batch_size // n_samples)
    rows: list[dict[str, Any]] = []
    accs, fmts, rewards = [], [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(dataset), desc="eval", unit="prompt", disable=not progress)
    for start in range(0, len(dataset), per_call):
        pids = list(range(start, min(start + per_call, len(dataset))))
        exs = [dataset[i] for i in pids]
        comps = generate_completions(policy, [e["image"] for e in exs], [e["question"] for e in exs],
                                     temperature=temperature, max_new_tokens=max_new_tokens, n_samples=n_samples,
                                     top_p=top_p, sampler=sampler)
        for j, c in enumerate(comps):
            pid, ex = pids[j // n_samples], exs[j // n_samples]
            sc = score(c, ex["answer"])
            accs.append(float(sc["acc"]))
            fmts.append(float(sc["fmt"]))
            rewards.append(float(sc["reward"]))
            rows.append({"question": ex["question"], "answer": str(ex["answer"]), "completion": c,
                         "pred": extract_answer(c), "correct": bool(sc["passed"]), "prompt_id": pid})
        bar.update(len(pids))
    bar.close()
    by_prompt: dict[int, bool] = {}
    for r in rows:
        by_prompt[r["prompt_id"]] = by_prompt.get(r["prompt_id"], False) or r["correct"]
    out: dict[str, Any] = {
        "n_prompts": len(dataset), "n_samples": n_samples, "temperature": float(temperature),
        "accuracy": sum(accs) / len(accs), "format_rate": sum(fmts) / len(fmts),
        "reward_mean": sum(rewards) / len(rewards), "pass_at_k": sum(by_prompt.values()) / len(by_prompt),
        "mean_chars": sum(len(r["completion"]) for r in rows) / len(rows)}
    if return_rows:
        out["rows"] = rows
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m calibrl eval`."""
    parser.add_argument("--model", default="tiny", help='"tiny", a local checkpoint path, or a hub id')
    parser.add_argument("--task", default=None, help="task name (default: calibrl.tasks.DEFAULT_TASK)")
    parser.add_argument("--data", type=Path, default=None,
                        help="evaluate on this saved or hub-format dataset (folder or .parquet) instead of --task")
    parser.add_argument("--n", type=int, default=200, help="number of held-out prompts (default 200)")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED, help=f"dataset seed (default {HELDOUT_SEED}, held out)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="samples per prompt (1 when greedy)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per sampler call (whole prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="most tokens generated per answer (default 64; the tiny model answers in about 19)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quantization", choices=["4bit"], default=None, help="load the model in 4-bit (GPU)")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per sample to this file")


def run(args: argparse.Namespace) -> int:
    """Run the eval command; prints a summary line; returns 0, or 2 on bad input."""
    import time

    import torch

    from calibrl.tasks import DEFAULT_TASK, TASKS, make_dataset
    from calibrl.models import load_policy

    task = args.task or DEFAULT_TASK
    if task not in TASKS:
        raise ValueError(f"--task: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    if args.n < 1:
        raise ValueError(f"--n: expected >= 1, got {args.n}")
    k = args.samples_per_prompt if args.temperature > 0 else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    policy = load_policy(args.model, quantization=args.quantization)
    if args.data is not None:  # a ValueError is reported by calibrl.cli in the one error style
        from calibrl.data import load_user_dataset

        data = load_user_dataset(args.data)
        data = data.select(range(min(args.n, len(data))))
        task = f"--data {args.data}"
    else:
        data = make_dataset(task, args.n, args.seed, style="expert")
    res = evaluate(policy, data, temperature=args.temperature, n_samples=k, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, seed=args.seed, return_rows=args.out is not None,
                   progress=True)
    kind = "greedy" if args.temperature == 0 else f"T={args.temperature:g}, {k} samples/prompt"
    print(f"model={args.model} task={task} n={args.n} seed={args.seed} ({kind}): accuracy={res['accuracy']:.3f} "
          f"format_rate={res['format_rate']:.3f} pass@{k}={res['pass_at_k']:.3f} reward={res['reward_mean']:.3f} "
          f"[{time.perf_counter() - t0:.1f} s]")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r in res.pop("rows"):
                f.write(json.dumps(r) + "\n")
        print(f"wrote {args.out}")
    return 0
