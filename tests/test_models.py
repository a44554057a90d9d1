"""calibrl.tiny and calibrl.models on CPU: the tiny model saved to a tmp dir (no hub), LoRA placement, adapter
round-trip, the 4-bit path in train mode, a LLaVA checkpoint through the same loader, and the sampler/forward
log-prob invariant (mm_token_type_ids extended over the completion)."""
from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from calibrl.models import (LORA_TARGET_REGEX, Policy, generation_kwargs, load_policy, lora_module_names,
                            policy_from_model)
from calibrl.tiny import SPECIAL_TOKENS, TEXT_ARCH, VISION_TOKENS, build_tiny_random

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_random(0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("tiny")
    model, proc = tiny
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


def _prompt(policy_or_proc, question="What is the colour of the biggest shape?"):
    proc = getattr(policy_or_proc, "processor", policy_or_proc)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _inputs(proc, sizes=((112, 112), (60, 100))):
    imgs = [Image.new("RGB", s, c) for s, c in zip(sizes, ["white", "red", "blue"])]
    texts = [_prompt(proc, q) for q in ["What is the colour of the biggest shape?", "How many circles?", "Left?"][:len(imgs)]]
    proc.tokenizer.padding_side = "left"
    return dict(proc(text=texts, images=[[im] for im in imgs], padding=True, return_tensors="pt"))


# ------------------------------------------------------------------------------------------------------ tiny.py
def test_build_is_deterministic_and_small(tiny):
    model, proc = tiny
    model2, proc2 = build_tiny_random(0)
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert proc.tokenizer.get_vocab() == proc2.tokenizer.get_vocab()
    other, _ = build_tiny_random(1)
    assert not torch.equal(other.state_dict()["lm_head.weight"], sd1["lm_head.weight"])
    n = sum(p.numel() for p in model.parameters())
    assert 2.5e6 < n < 3.6e6, n
    head_dim = TEXT_ARCH["hidden_size"] // TEXT_ARCH["num_attention_heads"]
    assert sum(model.config.text_config.rope_parameters["mrope_section"]) == head_dim // 2


def test_tokenizer_specials_template_and_single_token_answers(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    assert all(tok.convert_tokens_to_ids(t) != tok.unk_token_id and t in tok.get_vocab() for t in SPECIAL_TOKENS)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    for word in [" red", " green", " blue", " yellow", " 3", " 12", " left"]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    text = _prompt(proc)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_processor_caps_image_tokens_and_round_trips(tiny, tiny_dir):
    from transformers import AutoProcessor

    _, proc = tiny
    big = proc(text=[_prompt(proc)], images=[[Image.new("RGB", (1000, 1000))]], return_tensors="pt")
    assert int((big["input_ids"] == proc.image_token_id).sum()) == 16  # longest_edge cap: 112*112 px
    assert "mm_token_type_ids" in big
    loaded = AutoProcessor.from_pretrained(tiny_dir)
    assert hasattr(loaded, "image_processor") and type(loaded).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    again = loaded(text=[_prompt(loaded)], images=[[Image.new("RGB", (1000, 1000))]], return_tensors="pt")
    assert torch.equal(again["input_ids"], big["input_ids"]) and torch.equal(again["pixel_values"], big["pixel_values"])


# ----------------------------------------------------------------------------------------------------- models.py
def test_load_by_path(tiny_dir, tiny):
    t0 = time.perf_counter()
    pol = load_policy(str(tiny_dir))
    assert time.perf_counter() - t0 < 10  # ~0.1 s warm; generous for a shared CPU
    assert isinstance(pol, Policy) and not pol.model.training and not pol.is_lora
    tok = pol.tokenizer
    assert pol.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert pol.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert {tok.convert_tokens_to_ids(t) for t in VISION_TOKENS} <= set(pol.suppress_token_ids)
    assert pol.eos_token_id not in pol.suppress_token_ids
    sd = tiny[0].state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in pol.model.state_dict().items())


def test_load_tiny_asset_fast():
    from calibrl.models import tiny_path

    assert (tiny_path() / "config.json").is_file(), "the shipped calibrl/assets/tiny-qwen2.5-vl is missing"
    load_policy("tiny")  # first call pays lazy imports
    t0 = time.perf_counter()
    pol = load_policy("tiny")
    assert time.perf_counter() - t0 < 2.0
    assert hasattr(pol.processor, "image_processor")


def test_embedded_model_loads_without_a_progress_bar_and_leaves_bars_as_they_were(capfd, tiny_dir):
    """The main job's output is its own bars and result line: transformers' "Loading weights" bar for a model that
    loads in milliseconds is clutter. Other checkpoints keep the bar, and the user's setting is restored."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    capfd.readouterr()
    load_policy("tiny")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored
    load_policy(str(tiny_dir))
    assert "Loading weights" in capfd.readouterr().err  # a checkpoint path: the bar stays
    hf_logging.disable_progress_bar()
    try:
        load_policy("tiny")
        assert not hf_logging.is_progress_bar_enabled()  # a user who turned bars off keeps them off
    finally:
        hf_logging.enable_progress_bar()


def test_unknown_names_and_bad_options(tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match='"tiny"'):
        load_policy("no-such-model")
    with pytest.raises(ValueError, match="config.json"):
        load_policy(str(tiny_dir.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        load_policy("Qwen/Qwen2.5-VL-3B-Instruct")
    with pytest.raises(ValueError, match="quantization"):
        load_policy(str(tiny_dir), quantization="8bit")
    with pytest.raises(ValueError, match="lora"):
        load_policy(str(tiny_dir), lora="yes")
    with pytest.raises(ValueError, match="dtype"):
        load_policy(str(tiny_dir), dtype="int3")


def test_generation_kwargs(tiny_dir):
    pol = load_policy(str(tiny_dir))
    kw = generation_kwargs(pol, temperature=0.7, max_new_tokens=5)
    assert kw["do_sample"] and kw["temperature"] == 0.7 and kw["top_k"] == 0
    assert kw["suppress_tokens"] == pol.suppress_token_ids
    assert generation_kwargs(pol, temperature=0)["do_sample"] is False
    for bad in [dict(temperature=-1), dict(max_new_tokens=0), dict(top_p=0)]:
        with pytest.raises(ValueError):
            generation_kwargs(pol, **bad)
    from calibrl.rollout import response_mask

    torch.manual_seed(0)
    out = pol.model.generate(**_inputs(pol.processor), **generation_kwargs(pol, max_new_tokens=12))
    comp = out[:, -12:]
    real = comp[response_mask(comp, pol.eos_token_ids)]  # pads after EOS (pad id 0 is suppressed) are not sampled
    assert not set(real.tolist()) & set(pol.suppress_token_ids)


def test_lora_only_on_language_model_and_adapter_round_trip(tiny_dir, tmp_path):
    from peft import PeftModel

    pol = load_policy(str(tiny_dir), lora=True)
    names = lora_module_names(pol.model)
    assert pol.is_lora and len(names) == 4 * 7  # 4 layers x q,k,v,o,gate,up,down
    assert not [n for n in names if "visual" in n]
    trainable = [n for n, p in pol.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-trivial (lora_B starts at zero)
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    inp = _inputs(pol.processor)
    with torch.no_grad():
        lo = pol.model(**inp).logits
        with pol.model.disable_adapter():
            base = pol.model(**inp).logits
    assert (lo - base).abs().max() > 1e-3
    pol.model.save_pretrained(tmp_path / "adapter")
    fresh = load_policy(str(tiny_dir))
    again = PeftModel.from_pretrained(fresh.model, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(again(**inp).logits, lo, atol=1e-6)


def test_lora_on_vision_tower_is_rejected(tiny_dir):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="vision tower"):
        load_policy(str(tiny_dir), lora=LoraConfig(r=4, target_modules=["qkv", "q_proj"]))
    assert LORA_TARGET_REGEX.startswith(".*(?:language_model|text_model)")


def test_policy_from_model_validates(tiny):
    model, proc = tiny
    assert policy_from_model(model, proc).suppress_token_ids
    with pytest.raises(ValueError, match="processor"):
        policy_from_model(model, proc.tokenizer)


def test_sampler_logprobs_equal_teacher_forced_forward(tiny):
    """generate(output_logits=True) == a forward over prompt+completion with attention_mask and mm_token_type_ids
    extended over the completion; dropping mm_token_type_ids breaks it (so the check can fail)."""
    model, proc = tiny
    pol = policy_from_model(model, proc)
    inp = _inputs(proc, sizes=((112, 112), (60, 100), (200, 50)))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inp, **generation_kwargs(pol, max_new_tokens=10), return_dict_in_generate=True,
                             output_logits=True)
    p_len = inp["input_ids"].shape[1]
    comp = out.sequences[:, p_len:]
    gen_lp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    valid = torch.cumsum((comp == pol.eos_token_id).long(), 1) - (comp == pol.eos_token_id).long() == 0
    full = dict(inp, input_ids=out.sequences,
                attention_mask=torch.cat([inp["attention_mask"], torch.ones_like(comp)], 1),
                mm_token_type_ids=torch.cat([inp["mm_token_type_ids"], torch.zeros_like(comp)], 1))
    with torch.no_grad():
        fwd = model(**full).logits[:, p_len - 1:-1].float()
        no_mm = model(**{k: v for k, v in full.items() if k != "mm_token_type_ids"}).logits[:, p_len - 1:-1].float()
    diff = (torch.log_softmax(fwd, -1) - gen_lp).abs().amax(-1)[valid]
    assert diff.max() <= 1e-4, float(diff.max())
    bad = (torch.log_softmax(no_mm, -1) - gen_lp).abs().amax(-1)[valid]
    assert bad.max() > 1e-3


# -------------------------------------------------------------------------------------------------- 4-bit (bnb)
@pytest.fixture(scope="module")
def qpol(tiny_dir):
    pytest.importorskip("bitsandbytes")
    return load_policy(str(tiny_dir), quantization="4bit", lora=True)


def test_4bit_loads_quantized_language_model_only(qpol):
    import bitsandbytes as bnb

    q = [n for n, m in qpol.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q) == 4 * 7
    assert not [n for n in q if "visual" in n or "lm_head" in n]
    assert qpol.model.training  # CPU: kept in train mode (bnb eval-mode repacking bug)
    assert not [n for n in lora_module_names(qpol.model) if "visual" in n]


def test_4bit_train_mode_forward_generate_backward(qpol):
    inp = _inputs(qpol.processor)
    with torch.no_grad():
        out = qpol.model.generate(**inp, **generation_kwargs(qpol, max_new_tokens=6))
    assert out.shape[1] > inp["input_ids"].shape[1]
    params = [p for n, p in qpol.model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in qpol.model.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    logits = qpol.model(**inp).logits
    loss = -torch.log_softmax(logits[:, -1].float(), -1)[:, 7].mean()
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def _cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:
        return True  # unknown CPU: keep the expected failure


@pytest.mark.xfail(_cpu_has("avx512_bf16"), strict=False,
                   reason="bitsandbytes 0.50 on AVX512-BF16 CPUs: an eval-mode forward repacks the "
                   "4-bit weights (packing_format_for_cpu) and a later LoRA backward raises 'a view of a leaf Variable "
                   "that requires grad is being used in an in-place operation'; CUDA is unaffected")
def test_4bit_backward_after_eval_mode_forward(tiny_dir):
    pytest.importorskip("bitsandbytes")
    pol = load_policy(str(tiny_dir), quantization="4bit", lora=True)
    inp = _inputs(pol.processor)
    pol.model.eval()
    with torch.no_grad():
        pol.model(**inp)
    pol.model.train()
    pol.model(**inp).logits.float().logsumexp(-1).mean().backward()


# ------------------------------------------------------------------------------------------ another VLM family
def test_llava_checkpoint_loads_through_the_same_path(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor, Qwen2Config

    from calibrl.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == "
                         "'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=tok.chat_template)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(vision_config=vis, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    pol = load_policy(str(tmp_path), lora=True)
    names = lora_module_names(pol.model)
    assert names and all("language_model" in n for n in names)
    assert any("vision_tower" in n and n.endswith("q_proj") for n, _ in pol.model.named_modules())  # exists, untouched
    assert tok.convert_tokens_to_ids("<image>") in pol.suppress_token_ids
    inp = dict(pol.processor(text=[_prompt(pol)], images=[[Image.new("RGB", (40, 30), "red")]], return_tensors="pt"))
    with torch.no_grad():
        out = pol.model.generate(**inp, **generation_kwargs(pol, max_new_tokens=4))
    assert out.shape[1] > inp["input_ids"].shape[1]


def test_qwen2_vl_checkpoint_falls_back_to_image_only_processor(tmp_path):
    """A Qwen2-VL directory with tokenizer + image processor but no loadable processor (AutoProcessor would need
    torchvision's video processor) loads through the image-only fallback; LoRA stays off the vision tower."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from calibrl.tiny import build_image_processor, build_tokenizer

    tok = build_tokenizer()
    ids = {n: tok.convert_tokens_to_ids(n) for n in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vis = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, mlp_ratio=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vis, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    build_image_processor().save_pretrained(tmp_path)
    pol = load_policy(str(tmp_path), lora=True)
    assert type(pol.processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    assert type(pol.model.base_model.model).__name__ == "Qwen2VLForConditionalGeneration"
    names = lora_module_names(pol.model)
    assert len(names) == 2 * 7 and not [n for n in names if "visual" in n]
    inp = dict(pol.processor(text=[_prompt(pol)], images=[[Image.new("RGB", (112, 112))]], return_tensors="pt"))
    with torch.no_grad():
        assert pol.model.generate(**inp, **generation_kwargs(pol, max_new_tokens=3)).shape[1] > inp["input_ids"].shape[1]
