"""CPU proof for the chunked LM head: peak RSS of one CalibRL loss forward + backward on a Qwen2.5-VL-3B-shaped model
cut to 2 decoder layers (full vocabulary 151,936, hidden size 2048), chunked (calibrl.lmhead) vs full-vocabulary
log-probs, each in its own fresh subprocess, side by side in one run.

    python benchmarks/bench_chunked_logprobs.py [--group-size 4] [--new-tokens 512] [--image-size 448]
                                                [--vision-depth 2] [--threads 1] [--forward shared|plain]
                                                [--dtype float32|bfloat16] [--checkpointing 0|1]
                                                [--breakdown 0|1] [--json FILE]

Model: benchmarks/qwen25vl3b_config.py with num_hidden_layers = 2 and the vision tower cut to `--vision-depth`
blocks (one of them full-attention), random init, LoRA r = 16 on the language model's q/k/v/o/gate/up/down
(calibrl.trainer.lora_config); the tied embedding / LM head stays frozen, as under LoRA. `--dtype` is the dtype of
the frozen base weights: float32 (the CPU default of calibrl.models.load_policy) or bfloat16 (its CUDA default);
the LoRA adapters are float32 either way (peft's autocast_adapter_dtype, as in load_policy); bfloat16 is only
practical on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX: elsewhere torch's generic bf16 GEMM runs a large
inner dimension at ~0.1 GFLOP/s, hours per step here). `--checkpointing 1`
turns on gradient checkpointing as load_policy does (the default with 4-bit weights, where the trainer takes the
plain forward since the shared prompt needs the KV cache): `--forward plain` only.
Step: 1 prompt (one `--image-size` square image) x G rows of `--new-tokens` response tokens each (random ids, no
suppressed id, ragged: the last row ends early), the teacher-forced decoder forward (`--forward shared`, default:
the trainer's shared-prompt path for Qwen2.5-VL, calibrl.prefix; `plain`: one forward per row), then the response
positions' log-probs through the LM head, `calibrl_loss` with paper defaults against fixed old and expert log-probs,
and backward into the LoRA weights. The two paths share everything except the LM-head step:
  full    : logits = lm_head(hidden) [G,T,V], then the sampler's log_softmax (calibrl.logprobs.token_logprobs)
  chunked : calibrl.lmhead.head_token_logprobs(hidden, lm_head.weight, ...) (no [G,T,V] tensor anywhere)
Peak = the child's peak RSS over the step (VmHWM after resetting the watermark once the model and inputs are built;
it includes the resident model and inputs); `base` = RSS just before the step; ru_maxrss (whole process, model
build included) is reported too. With glibc's default malloc the RSS also holds freed heap memory the allocator
keeps, which after the (identical) decoder forward varied from ~0.1 to ~0.65 GiB between processes on the same
inputs; `MALLOC_MMAP_THRESHOLD_=131072` in the environment (inherited by both children) makes every allocation above
128 KiB its own mapping, returned to the OS when freed, and the peaks reproducible (benchmarks/RESULTS.md).
Each child also reports the loss and the LoRA gradient norm, so the parent checks the paths agree.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _status_mib(key: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _reset_peak() -> None:
    """Reset the peak-RSS watermark to the current RSS (Linux: write 5 to /proc/self/clear_refs), so the peak
    covers the step only and not the model build (which briefly holds two copies of the embedding)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(vision_depth: int, image_size: int, group_size: int, new_tokens: int, dtype: str = "float32",
          checkpointing: bool = False):
    """(LoRA model, inputs dict of the plain forward, response ids [G,T], mask [G,T], suppressed ids)."""
    import torch
    from peft import get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from calibrl.config import TrainConfig
    from calibrl.models import suppress_ids_for
    from calibrl.rollout import encode_prompts
    from calibrl.tasks import DEFAULT_TASK, sample
    from calibrl.tiny import build_tiny_random
    from calibrl.trainer import lora_config
    from qwen25vl3b_config import qwen25vl_3b_config

    _, proc = build_tiny_random(seed=0)
    proc.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": image_size * image_size}
    cfg = qwen25vl_3b_config(proc.tokenizer)
    cfg.text_config.num_hidden_layers = 2
    cfg.vision_config.depth = vision_depth
    cfg.vision_config.fullatt_block_indexes = [vision_depth - 1]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(getattr(torch, dtype))
    if checkpointing:  # as calibrl.models.load_policy
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(TrainConfig()))
    model.train(True)

    class P:  # the two attributes encode_prompts reads
        processor, tokenizer = proc, proc.tokenizer
    P.model = model
    ex = sample(DEFAULT_TASK, 0, 0)
    image = ex["image"].convert("RGB").resize((image_size, image_size))
    inputs = encode_prompts(P, [image], [ex["question"]])  # one prompt
    vocab = cfg.text_config.vocab_size
    eos = cfg.text_config.eos_token_id
    sup = suppress_ids_for(proc.tokenizer, [eos])
    gen = torch.Generator().manual_seed(1)
    comp = torch.randint(0, vocab, (group_size, new_tokens), generator=gen)
    comp[torch.isin(comp, torch.tensor(sup))] = 100
    mask = torch.ones(group_size, new_tokens, dtype=torch.bool)
    mask[-1, new_tokens * 3 // 4:] = False  # one ragged row
    comp[-1, new_tokens * 3 // 4 - 1] = eos
    return model, inputs, comp, mask, sup


def response_hidden(model, inputs, comp, mask, forward: str):
    """Final hidden states [G,T,H] of the positions predicting each response token. `shared`: the trainer's path for
    Qwen2.5-VL (calibrl.prefix: the image and prompt run once, their KV cache is shared by the G rows); `plain`:
    one teacher-forced forward per row over prompt + response."""
    import torch

    t = comp.shape[1]
    if forward == "shared":
        from calibrl import prefix

        rows = torch.zeros(comp.shape[0], dtype=torch.long)
        eos = int(comp[mask][0])
        if hasattr(prefix, "shared_hidden"):  # a SharedHidden (prompt rows unexpanded) in newer calibrl
            h = prefix.shared_hidden(model, inputs, rows, comp, mask, eos)
            return h.dense() if hasattr(h, "dense") else h
        base = model.get_base_model()
        head, base.lm_head = base.lm_head, torch.nn.Identity()  # the same forward, returning hidden states
        try:
            return prefix.shared_logits(model, inputs, rows, comp, mask, eos)
        finally:
            base.lm_head = head
    from calibrl.rollout import select_rows

    inputs = select_rows(inputs, [0] * comp.shape[0])
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["input_ids"] = torch.cat([inputs["input_ids"], torch.where(mask, comp, comp[mask][0])], 1)
    kw["attention_mask"] = torch.cat([inputs["attention_mask"], mask.long()], 1)
    kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(comp)], 1)
    inner = model.get_base_model().model
    return inner(**kw, use_cache=False).last_hidden_state[:, -(t + 1):-1]


class Breakdown:
    """`--breakdown 1`: where the step's memory goes. Per phase (decoder forward, LM-head forward, LM-head backward,
    decoder backward): the peak RSS within it (the watermark is reset at each boundary; the step's peak is the
    largest) and the RSS at its end; the bytes of the distinct non-parameter storages saved for the backward, by
    part; after the decoder forward, the free bytes glibc's main heap keeps resident (mallinfo2: memory freed by
    the forward that the allocator has not returned to the OS)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: dict[str, dict[int, int]] = {}
        self.phases: list[dict] = []
        self.heap_free_mib = None

    @contextlib.contextmanager
    def saving(self, part: str):
        import torch

        seen = self.saved.setdefault(part, {})

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in self.params:
                seen.setdefault(st.data_ptr(), st.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def phase(self, name: str, heap: bool = False) -> float:
        """Record the phase that just ended; returns the step's peak so far."""
        self.phases.append(dict(phase=name, peak_mib=_status_mib("VmHWM"), end_mib=_status_mib("VmRSS")))
        if heap:
            self.heap_free_mib = _heap_free_mib()
        _reset_peak()
        return max(p["peak_mib"] for p in self.phases)

    def report(self) -> dict:
        return dict(phases=self.phases, heap_free_after_decoder_forward_mib=self.heap_free_mib,
                    saved_for_backward_mib={k: sum(v.values()) / 2**20 for k, v in self.saved.items()})


def _heap_free_mib() -> float | None:
    """Free bytes in glibc's main malloc arena (resident unless trimmed), MiB; None off glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn().fordblks / 2**20


def child(args) -> dict:
    import torch

    from calibrl.lmhead import head_token_logprobs, output_head
    from calibrl.losses import calibrl_loss
    from calibrl.logprobs import token_logprobs

    torch.set_num_threads(args.threads)
    model, inputs, comp, mask, sup = build(args.vision_depth, args.image_size, args.group_size, args.new_tokens,
                                             args.dtype, bool(args.checkpointing))
    gen = torch.Generator().manual_seed(2)
    g = comp.shape[0]
    old = torch.where(mask, -12.0 + 0.1 * torch.randn(comp.shape, generator=gen), torch.zeros(()))
    expert = torch.where(mask, -12.0 + torch.randn(comp.shape, generator=gen), torch.zeros(()))
    adv = torch.linspace(-1, 1, g)
    passed = adv > 0
    weight, bias = output_head(model)
    gc.collect()
    bd = Breakdown(model) if args.breakdown else None
    _reset_peak()
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    with bd.saving("decoder") if bd else contextlib.nullcontext():
        hidden = response_hidden(model, inputs, comp, mask, args.forward)
    if bd:
        bd.phase("decoder forward", heap=True)
        hidden.register_hook(lambda _: bd.phase("LM-head backward") and None)  # a hook must return None
    with bd.saving("LM head") if bd else contextlib.nullcontext():
        if args.path == "full":
            logits = model.get_output_embeddings()(hidden)
            logp, _ = token_logprobs(logits, comp, mask, suppress_token_ids=sup)
            del logits
        else:
            logp, _ = head_token_logprobs(hidden, weight, comp, mask, bias=bias, suppress_token_ids=sup)
        loss, _ = calibrl_loss(logp, old, expert, adv, mask, passed)
    if bd:
        bd.phase("LM-head forward")
    loss.backward()
    wall = time.perf_counter() - t0
    peak = bd.phase("decoder backward") if bd else _status_mib("VmHWM")
    gn = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    n_prompt = int(inputs["input_ids"].shape[1])
    extra = bd.report() if bd else {}
    return dict(path=args.path, peak_rss_mib=peak, base_rss_mib=base, **extra,
                ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step_s=wall,
                loss=float(loss), lora_grad_norm=float(gn),
                logp_sum=float(logp.detach().double().sum()), prompt_tokens=n_prompt,
                image_tokens=int((inputs["mm_token_type_ids"][0] == 1).sum()), rows=g, response_tokens=int(mask.sum()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="frozen base weights (LoRA stays float32)")
    ap.add_argument("--checkpointing", type=int, choices=(0, 1), default=0,
                    help="gradient checkpointing (as load_policy with 4-bit weights); --forward plain only")
    ap.add_argument("--forward", choices=("shared", "plain"), default="shared",
                    help="decoder forward shared by both paths: the trainer's shared-prompt path or one per row")
    ap.add_argument("--breakdown", type=int, choices=(0, 1), default=0,
                    help="also report per-phase peaks, bytes saved for the backward and free heap (see Breakdown)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--path", choices=("full", "chunked"), default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.checkpointing and args.forward == "shared":
        ap.error("--checkpointing 1 needs --forward plain (the shared prompt needs the KV cache checkpointing drops)")
    if args.path:
        print(json.dumps(child(args)), flush=True)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    res = {}
    for path in ("chunked", "full"):
        cmd = [sys.executable, __file__, "--path", path] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                            if k not in ("json", "path")]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-4000:], file=sys.stderr)
            return out.returncode
        res[path] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res[path]), flush=True)
    c, f = res["chunked"], res["full"]
    summary = dict(args=vars(args), chunked=c, full=f, peak_ratio=c["peak_rss_mib"] / f["peak_rss_mib"],
                   step_increment_ratio=(c["peak_rss_mib"] - c["base_rss_mib"]) / (f["peak_rss_mib"] - f["base_rss_mib"]),
                   loss_diff=abs(c["loss"] - f["loss"]),
                   grad_norm_rel_diff=abs(c["lora_grad_norm"] - f["lora_grad_norm"]) / f["lora_grad_norm"])
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
