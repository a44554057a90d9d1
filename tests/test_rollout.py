"""Rollout: the training forward reproduces the sampler's log-probs (prototype-findings.md §6), pads after EOS never
become NaN, expert rows are laid out as the official code does."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from calibrl.config import TrainConfig
from calibrl.rollout import (collect_rollout, encode_prompts, response_mask, sample_groups, select_rows,
                             sequence_logprobs, token_logprobs, tokenize_experts)

ASSET = Path(__file__).resolve().parents[1] / "calibrl" / "assets" / "tiny-qwen2.5-vl"


def tiny_policy(lora: bool = False, seed: int = 0):
    """The shipped tiny model when present, else the random-init one with the same architecture (LoRA optional)."""
    from calibrl.trainer import lora_config

    torch.manual_seed(seed)
    cfg = lora_config(TrainConfig()) if lora else None
    if (ASSET / "config.json").exists():
        from calibrl.models import load_policy

        return load_policy("tiny", lora=cfg)
    from calibrl.models import policy_from_model
    from calibrl.tiny import build_tiny_random

    model, proc = build_tiny_random(0)
    if lora:
        from peft import get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, cfg)
    return policy_from_model(model.eval(), proc, name="tiny-random")


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.fixture(scope="module")
def examples():
    from calibrl.tasks import DEFAULT_TASK, make_dataset

    ds = make_dataset(DEFAULT_TASK, 3, 0)
    return [ds[i] for i in range(3)]


@pytest.fixture(scope="module")
def sampled(policy, examples):
    torch.manual_seed(0)
    inputs = encode_prompts(policy, [e["image"] for e in examples], [e["question"] for e in examples])
    rows = select_rows(inputs, torch.arange(3).repeat_interleave(4))
    s = sample_groups(policy, inputs, 4, max_new_tokens=16, temperature=1.0, sampler="generate")
    return rows, s.completion_ids, s.mask, s


def _gap(policy, rows, comp, mask, s, temperature=1.0):
    ref = s.logp  # recorded by the sampler while decoding
    with torch.no_grad():
        lp, _ = sequence_logprobs(policy.model, rows, comp, mask, suppress_token_ids=policy.suppress_token_ids,
                                  temperature=temperature, fill_token_id=policy.eos_token_id)
    return (lp - ref)[mask].abs().max().item()


def test_training_forward_reproduces_sampler(policy, sampled):
    rows, comp, mask, s = sampled
    assert mask.sum() > 0 and comp.shape == mask.shape == s.logp.shape
    assert _gap(policy, rows, comp, mask, s) <= 1e-4


def test_entropy_matches_sampler_distribution(policy, sampled):
    rows, comp, mask, s = sampled
    ent_ref = s.entropy
    with torch.no_grad():
        _, ent = sequence_logprobs(policy.model, rows, comp, mask, suppress_token_ids=policy.suppress_token_ids,
                                   return_entropy=True)
    assert (ent - ent_ref).abs().max().item() <= 1e-4
    assert torch.all(ent[~mask] == 0) and torch.all(ent[mask] > 0)


def test_dropping_mm_token_type_ids_breaks_reproduction(policy, sampled):
    rows, comp, mask, s = sampled
    assert "mm_token_type_ids" in rows  # the processor returns it; the forward must extend it over the completion
    broken = {k: v for k, v in rows.items() if k != "mm_token_type_ids"}
    assert _gap(policy, broken, comp, mask, s) > 1e-3


def test_temperature_is_applied_like_the_sampler(policy, examples):
    inputs = encode_prompts(policy, [e["image"] for e in examples], [e["question"] for e in examples])
    rows = select_rows(inputs, torch.arange(3).repeat_interleave(4))
    torch.manual_seed(1)
    s = sample_groups(policy, inputs, 4, max_new_tokens=16, temperature=0.7, sampler="generate")
    comp, mask = s.completion_ids, s.mask
    assert _gap(policy, rows, comp, mask, s, temperature=0.7) <= 1e-4
    assert _gap(policy, rows, comp, mask, s, temperature=1.0) > 1e-3


def test_pads_after_eos_are_nan_free_with_grad(policy, sampled):
    rows, comp, mask, _ = sampled
    comp = comp.clone()
    comp[:, 3] = policy.eos_token_id  # every row ends at index 3, then pads that are suppressed ids (-inf log-prob)
    comp[:, 4:] = policy.suppress_token_ids[0]  # e.g. <|image_pad|>: must neither reach the model nor give NaN
    m = response_mask(comp, policy.eos_token_id)
    assert m.sum(1).tolist() == [4] * comp.shape[0]
    lp, ent = sequence_logprobs(policy.model, rows, comp, m, suppress_token_ids=policy.suppress_token_ids,
                                return_entropy=True, fill_token_id=policy.eos_token_id)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert torch.all(lp[:, 4:] == 0) and torch.all(lp[:, :4] < 0)
    (lp.sum() + ent.sum()).backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    policy.model.zero_grad(set_to_none=True)


def test_token_logprobs_masks_suppressed_ids_to_zero_probability():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    lp, ent = token_logprobs(logits, torch.tensor([[1]]), torch.tensor([[True]]), suppress_token_ids=[0, 3],
                             return_entropy=True)
    assert lp.item() == pytest.approx(-torch.log(torch.tensor(2.0)).item())  # 2 tokens left, uniform
    assert ent.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    lp, _ = token_logprobs(logits, torch.tensor([[0]]), torch.tensor([[False]]), suppress_token_ids=[0])
    assert lp.item() == 0.0  # a masked suppressed target gives 0, not -inf
    with pytest.raises(ValueError, match="logits/targets/mask"):
        token_logprobs(logits, torch.tensor([[0, 1]]), torch.tensor([[True, True]]), suppress_token_ids=[])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.tensor([[1]]), torch.tensor([[True]]), suppress_token_ids=[], temperature=0)


def test_response_mask_stops_at_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert response_mask(ids, 2).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_select_rows_regathers_pixels(policy, examples):
    inputs = encode_prompts(policy, [e["image"] for e in examples], [e["question"] for e in examples])
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    chunks = inputs["pixel_values"].split(sizes)
    sel = select_rows(inputs, [2, 0, 2])
    assert torch.equal(sel["pixel_values"], torch.cat([chunks[2], chunks[0], chunks[2]]))
    assert torch.equal(sel["input_ids"], inputs["input_ids"][[2, 0, 2]])
    with pytest.raises(ValueError, match="rows"):
        select_rows(inputs, [3])


def test_collect_rollout_layout(policy, examples):
    cfg = TrainConfig.from_budget("smoke", mode="calibrl", group_size=3, max_new_tokens=8, max_expert_tokens=12)
    torch.manual_seed(1)
    b = collect_rollout(policy, examples, cfg, prompt_ids=[10, 11, 12])
    n = 3 * 3
    assert b.completion_ids.shape[0] == n and b.row_prompt.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for x in (b.old_logp, b.entropy, b.expert_logp, b.mask):
        assert x.shape == b.completion_ids.shape
    assert torch.all(b.old_logp[~b.mask] == 0) and torch.isfinite(b.old_logp).all()
    # expert rows: no chat template, EOS appended (kept under truncation), right-padded
    ids, m = tokenize_experts(policy, [e["solution"] for e in examples], 12)
    assert torch.equal(ids, b.expert_ids) and torch.equal(m, b.expert_mask)
    lengths = m.sum(1)
    for i in range(3):
        assert b.expert_ids[i, lengths[i] - 1].item() == policy.eos_token_id
    # expert log-probs aligned by index to on-policy rows, 0 past the expert's end
    t = b.completion_ids.shape[1]
    for r in range(n):
        e = b.expert_old_logp[b.row_prompt[r]]
        le = int(lengths[b.row_prompt[r]])
        assert torch.equal(b.expert_logp[r, : min(t, le)], e[: min(t, le)])
        assert torch.all(b.expert_logp[r, le:] == 0)
    # group advantages over on-policy rows: zero mean per group
    for g in range(3):
        assert abs(b.adv[b.row_prompt == g].sum().item()) < 1e-5
    # expert old log-probs equal a separate teacher-forced pass of the expert rows
    with torch.no_grad():
        lp, _ = sequence_logprobs(policy.model, select_rows(b.prompt_inputs, [0, 1, 2]), b.expert_ids, b.expert_mask,
                                  suppress_token_ids=policy.suppress_token_ids)
    assert (lp - b.expert_old_logp).abs().max().item() <= 1e-5


def test_recompute_old_logp_agrees_with_sampler(policy, examples):
    cfg = TrainConfig.from_budget("smoke", mode="grpo", group_size=2, max_new_tokens=8, recompute_old_logp=True)
    torch.manual_seed(2)
    b = collect_rollout(policy, examples, cfg, prompt_ids=[0, 1, 2])
    torch.manual_seed(2)
    cfg2 = TrainConfig.from_budget("smoke", mode="grpo", group_size=2, max_new_tokens=8)
    b2 = collect_rollout(policy, examples, cfg2, prompt_ids=[0, 1, 2])
    assert torch.equal(b.completion_ids, b2.completion_ids)
    assert (b.old_logp - b2.old_logp).abs().max().item() <= 1e-4
    assert (b.expert_old_logp - b2.expert_old_logp).abs().max().item() <= 1e-4


def test_encode_prompts_rejects_a_tokenizer_only_policy(policy):
    bad = SimpleNamespace(model=policy.model, processor=policy.tokenizer, tokenizer=policy.tokenizer)
    with pytest.raises(ValueError, match="processor"):
        encode_prompts(bad, [None], ["q"])
    with pytest.raises(ValueError, match="images/questions"):
        encode_prompts(policy, [], [])


# ------------------------------------------------------------------ shared-prompt fast path (calibrl.prefix)
def test_shared_prompt_sampler_matches_plain_forward(policy, examples):
    from calibrl import prefix

    inputs = encode_prompts(policy, [e["image"] for e in examples], [e["question"] for e in examples])
    assert prefix.supported(policy.model, inputs)
    torch.manual_seed(3)
    comp, mask, s_lp, s_ent, _ = prefix.sample_shared(
        policy.model, inputs, 4, max_new_tokens=12, eos_token_ids=policy.eos_token_ids,
        pad_token_id=policy.pad_token_id, suppress_token_ids=policy.suppress_token_ids, temperature=0.8)
    assert comp.shape == mask.shape == s_lp.shape == s_ent.shape and comp.shape[0] == 12
    assert not torch.isin(comp[mask], torch.tensor(policy.suppress_token_ids)).any()
    rows = torch.arange(3).repeat_interleave(4)
    with torch.no_grad():
        lp, ent = sequence_logprobs(policy.model, select_rows(inputs, rows), comp, mask, temperature=0.8,
                                    suppress_token_ids=policy.suppress_token_ids, return_entropy=True)
    assert (lp - s_lp)[mask].abs().max().item() <= 1e-4
    assert (ent - s_ent)[mask].abs().max().item() <= 1e-4
    assert torch.all(s_lp[~mask] == 0)


def test_shared_prompt_forward_equals_plain_forward_with_gradients(examples):
    from calibrl import prefix
    from calibrl.rollout import rows_logprobs

    pol = tiny_policy(lora=True)
    with torch.no_grad():  # a non-zero adapter, so the prompt's K/V depend on the trained weights
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    inputs = encode_prompts(pol, [e["image"] for e in examples], [e["question"] for e in examples])
    torch.manual_seed(4)
    comp, mask, _, _, _ = prefix.sample_shared(pol.model, inputs, 2, max_new_tokens=10, eos_token_ids=pol.eos_token_ids,
                                            pad_token_id=pol.pad_token_id, suppress_token_ids=pol.suppress_token_ids)
    rows = torch.tensor([4, 0, 5, 1]) // 2  # an arbitrary subset and order of rows, as a micro-batch has
    comp, mask = comp[[4, 0, 5, 1]], mask[[4, 0, 5, 1]]
    grads = []
    for fast in (False, True):
        pol.model.zero_grad(set_to_none=True)
        if fast:
            lp, _ = rows_logprobs(pol, inputs, rows, comp, mask)
        else:
            lp, _ = sequence_logprobs(pol.model, select_rows(inputs, rows), comp, mask,
                                      suppress_token_ids=pol.suppress_token_ids, fill_token_id=pol.eos_token_id)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in pol.model.named_parameters() if p.grad is not None})
        if not fast:
            plain_lp = lp.detach()
    assert (lp.detach() - plain_lp).abs().max().item() <= 1e-4
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    scale = max(g.abs().max().item() for g in grads[0].values())
    assert scale > 0
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-4 * scale
