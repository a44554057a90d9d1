"""Train CalibRL with TRL on one or many GPUs: the script behind the README's one `accelerate launch` command.

    accelerate launch --multi_gpu --num_processes 8 -m calibrl.integrations.trl_train \\
        --model Qwen/Qwen2.5-VL-3B-Instruct --task count --train-size 4096 --num-generations 8 \\
        --per-device-batch 8 --max-completion-length 512 --report-to tensorboard --bf16
    python -m calibrl.integrations.trl_train --model tiny --max-steps 2 --use-cpu   # the embedded default, CPU

Add `--use-vllm` for TRL's vLLM generation (colocate mode; the importance-sampling correction is switched off, as
CalibRLConfig requires) and `--config_file` (accelerate's) for DeepSpeed/FSDP. LoRA r=16 on the language model.
"""
from __future__ import annotations

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (embedded default), a local path or a hub id")
    p.add_argument("--task", default=None, help="calibrl task family (default calibrl.tasks.DEFAULT_TASK)")
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--per-device-batch", type=int, default=8, help="completions per device per step")
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--slope", type=float, default=0.5)
    p.add_argument("--guide-coef", type=float, default=0.1)
    p.add_argument("--output-dir", default="runs/trl-calibrl")
    p.add_argument("--report-to", default="none", help="TRL/transformers report_to: none, tensorboard, wandb, trackio")
    p.add_argument("--use-vllm", action="store_true")
    p.add_argument("--use-cpu", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from peft import LoraConfig
    from transformers import AutoProcessor

    from calibrl.integrations.trl import CalibRLConfig, CalibRLTrainer, calibrl_reward, to_trl_dataset
    from calibrl.models import TINY_NAME, suppress_ids_for, tiny_path
    from calibrl.tasks import DEFAULT_TASK, make_dataset
    from calibrl.trainer import LORA_TARGETS

    a = parse_args(argv)
    model = a.model
    if model == TINY_NAME:  # TRL's AutoProcessor must find the tiny model's image-only processor class
        from calibrl.tiny import register_processor
        register_processor()
        model = str(tiny_path())
    processor = AutoProcessor.from_pretrained(model)
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"model: expected a vision-language model with a multimodal processor, got {a.model!r}")
    tok = processor.tokenizer
    suppress = suppress_ids_for(tok, [tok.eos_token_id])  # vision special tokens never sampled (as calibrl)
    args = CalibRLConfig(
        output_dir=a.output_dir, per_device_train_batch_size=a.per_device_batch, num_generations=a.num_generations,
        max_completion_length=a.max_completion_length, max_steps=a.max_steps, learning_rate=a.lr, slope=a.slope,
        guide_coef=a.guide_coef, report_to=a.report_to, use_vllm=a.use_vllm, vllm_mode="colocate",
        vllm_importance_sampling_correction=False, use_cpu=a.use_cpu, bf16=a.bf16, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", seed=a.seed, top_k=0,
        generation_kwargs={"suppress_tokens": suppress})
    data = to_trl_dataset(make_dataset(a.task or DEFAULT_TASK, a.train_size, a.seed))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    trainer = CalibRLTrainer(model=model, reward_funcs=calibrl_reward, args=args, train_dataset=data,
                             processing_class=processor, peft_config=lora)
    trainer.train()
    trainer.save_model(a.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
