"""calibrl.integrations.trl: CalibRLTrainer on the shipped tiny Qwen2.5-VL (CPU, offline).

One trainer is built per module. On a fixed batch: the advantages are calibrl's (A = r - mean over the group's
rows, reward = calibrl.rewards.score of the decoded completion), the expert log-probs equal a plain teacher-forced
forward of the tokenized solution after the same prompt and image, the loss equals calibrl_loss on the same tensors
(<= 1e-6) and the logged metrics equal calibrl.probes. Then a few real TRL steps run end to end."""
import os
import types

import pytest
import torch

trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":
    pytest.skip(f"written for trl 1.16.0 (private GRPOTrainer hooks), found {trl.__version__}", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calibrl import probes  # noqa: E402
from calibrl.advantage import group_advantages  # noqa: E402
from calibrl.integrations.trl import (PREFIX, CalibRLConfig, CalibRLTrainer, calibrl_reward,  # noqa: E402
                                      probe_values, to_trl_dataset)
from calibrl.losses import calibrl_loss  # noqa: E402
from calibrl.rewards import score  # noqa: E402

G, P, T_MAX = 4, 2, 24


def make_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=P * G, num_generations=G, max_completion_length=T_MAX,
                max_steps=2, learning_rate=1e-3, bf16=False, gradient_checkpointing=False, use_cpu=True,
                report_to="none", logging_steps=1, save_strategy="no", seed=0, top_k=0, shuffle_dataset=False,
                generation_kwargs={"suppress_tokens": []}, dataloader_num_workers=0)
    base.update(kw)
    return CalibRLConfig(**base)


def build_trainer(out, data_n=8, **kw):
    from peft import LoraConfig
    from transformers import AutoProcessor

    import calibrl.tiny as tiny
    from calibrl.models import tiny_path
    from calibrl.tasks import DEFAULT_TASK, make_dataset

    tiny.register_processor()
    proc = AutoProcessor.from_pretrained(str(tiny_path()))
    data = to_trl_dataset(make_dataset(DEFAULT_TASK, data_n, 0))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    torch.manual_seed(0)
    return CalibRLTrainer(model=str(tiny_path()), reward_funcs=calibrl_reward, args=make_args(out, **kw),
                          train_dataset=data, processing_class=proc, peft_config=lora), data, proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    tr, data, proc = build_trainer(tmp_path_factory.mktemp("trl"), grad_split_every=1)
    tr.model.train()
    inputs = [dict(data[i]) for i in range(P) for _ in range(G)]
    torch.manual_seed(1)
    batch = tr._generate_and_score_completions(inputs)
    return types.SimpleNamespace(tr=tr, data=data, proc=proc, inputs=inputs, batch=batch)


def test_config_rejects_bad_knobs_and_unsupported_trl_options(tmp_path):
    for kw, name in [(dict(slope=1.5), "slope"), (dict(guide_coef=-1), "guide_coef"), (dict(weight="x"), "weight"),
                     (dict(gap="seq"), "gap"), (dict(loss_agg="mean"), "loss_agg"), (dict(beta=0.04), "beta"),
                     (dict(loss_type="dapo"), "loss_type"), (dict(scale_rewards="batch"), "scale_rewards"),
                     (dict(clip_c=0.5), "clip_c"), (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
                     (dict(max_expert_length=1), "max_expert_length"), (dict(expert_column=""), "expert_column")]:
        with pytest.raises(ValueError, match=name):
            make_args(tmp_path, **kw)
    a = make_args(tmp_path)
    assert (a.slope, a.guide_coef, a.weight, a.gap, a.expert_column, a.scale_rewards, a.clip_c) == \
        (0.5, 0.1, "abs-adv", "token", "solution", "none", 3.0)


def test_advantages_are_calibrl_group_advantages_of_the_verifier_reward(setup):
    b, tok = setup.batch, setup.proc.tokenizer
    texts = tok.batch_decode(torch.where(b["completion_mask"].bool(), b["completion_ids"], tok.pad_token_id),
                             skip_special_tokens=True)
    rewards = torch.tensor([score(t, e["answer"])["reward"] for t, e in zip(texts, setup.inputs)], dtype=torch.float64)
    gids = torch.arange(P * G) // G
    want = group_advantages(rewards, gids)
    torch.testing.assert_close(b["advantages"].double(), want, atol=1e-6, rtol=0)
    by_hand = rewards - rewards.view(P, G).mean(1).repeat_interleave(G)      # A = r - mean, no std
    torch.testing.assert_close(b["advantages"].double(), by_hand, atol=1e-6, rtol=0)
    acc = torch.tensor([score(t, e["answer"])["acc"] == 1.0 for t, e in zip(texts, setup.inputs)])
    assert torch.equal(b["calibrl_passed"].cpu(), acc)


def test_expert_logps_are_a_teacher_forced_pass_of_the_solution_after_the_same_prompt(setup):
    from calibrl.rollout import encode_prompts, sequence_logprobs, tokenize_experts

    tr, b, tok = setup.tr, setup.batch, setup.proc.tokenizer
    pol = types.SimpleNamespace(processor=setup.proc, tokenizer=tok, model=tr.model, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
    ex = [setup.data[i] for i in range(P)]
    e_ids, e_mask = tokenize_experts(pol, [e["solution"] for e in ex], T_MAX)
    enc = encode_prompts(pol, [e["image"] for e in ex], [e["question"] for e in ex])
    with torch.no_grad():
        want, _ = sequence_logprobs(tr.model, enc, e_ids, e_mask, suppress_token_ids=[])
    rows = torch.arange(P) * G                                               # first row of each group
    got, got_mask = b["calibrl_expert_logps"][rows], b["calibrl_expert_mask"][rows]
    assert torch.equal(got_mask.cpu(), e_mask)
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=0)
    for g in range(P):                                                       # every row of a group: its prompt's expert
        assert torch.equal(b["calibrl_expert_logps"][g * G:(g + 1) * G], got[g].expand(G, -1))
    assert not b["calibrl_expert_logps"].requires_grad


def _fixed(setup):
    """The generated batch with fixed advantages, pass labels and perturbed old log-probs (ratios != 1)."""
    tr, b = setup.tr, dict(setup.batch)
    n = b["completion_ids"].shape[0]
    gen = torch.Generator().manual_seed(3)
    b["advantages"] = torch.randn(n, generator=gen)
    b["calibrl_passed"] = torch.arange(n) % 3 == 0
    b["calibrl_mixed"] = torch.arange(n) % 4 != 1
    with torch.no_grad():
        lp, _, _ = tr._get_per_token_logps_and_entropies(
            tr.model, torch.cat([b["prompt_ids"], b["completion_ids"]], 1),
            torch.cat([b["prompt_mask"], b["completion_mask"]], 1), b["completion_ids"].shape[1],
            pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"], num_images=b["num_images"],
            mm_token_type_ids=b.get("mm_token_type_ids"))
    b["old_per_token_logps"] = (lp + 0.3 * torch.randn(lp.shape, generator=gen)).clamp(max=0.0)  # log-probs <= 0
    return b


def test_loss_and_metrics_equal_calibrl_on_the_same_tensors(setup):
    tr, b = setup.tr, _fixed(setup)
    tr._metrics["train"].clear()
    loss = tr.compute_loss(tr.model, b)
    m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    logp, ent, _ = tr._get_per_token_logps_and_entropies(
        tr.model, ids, torch.cat([b["prompt_mask"], b["completion_mask"]], 1), b["completion_ids"].shape[1],
        compute_entropy=True, pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
        num_images=b["num_images"], mm_token_type_ids=b.get("mm_token_type_ids"))
    mask = b["completion_mask"].bool()
    want, info = calibrl_loss(logp, b["old_per_token_logps"], b["calibrl_expert_logps"], b["advantages"], mask,
                              b["calibrl_passed"], expert_mask=b["calibrl_expert_mask"])
    assert abs(float(loss.detach()) - float(want.detach())) <= 1e-6
    assert info["guide_loss"] > 0 and info["clipfrac"] > 0                  # both terms and the clip are exercised
    for k in ("pg_loss", "guide_loss", "loss", "clipfrac", "approx_kl", "dualclip_frac"):
        assert m[PREFIX + k] == pytest.approx(info[k], abs=1e-6), k
    old = b["old_per_token_logps"]
    em = b["calibrl_expert_mask"]
    gate = probes.gate_activation(old, b["calibrl_expert_logps"], mask, b["calibrl_passed"], 0.5,
                                  rows=b["calibrl_mixed"], adv=b["advantages"], expert_mask=em)
    rows = torch.arange(P) * G
    ents = probes.entropy_summary(ent.detach(), mask, b["calibrl_passed"], b["calibrl_expert_entropy"][rows], em[rows])
    gap = probes.expert_gap(old, b["calibrl_expert_logps"], mask, em.sum(1))
    want_m = {**gate, **ents, **gap, "cov_logp_adv": probes.cov_logp_adv(old, b["advantages"], mask)}
    assert probe_values(old, ent.detach(), mask, b["advantages"], b["calibrl_passed"], b["calibrl_mixed"],
                        b["calibrl_group"], b["calibrl_expert_logps"], em, b["calibrl_expert_entropy"], 0.5) == want_m
    for k, v in want_m.items():
        got = m[PREFIX + k]
        assert (v is None and got != got) or got == pytest.approx(v, abs=1e-9), k
    assert m[PREFIX + "grad_norm_pg"] > 0 and m[PREFIX + "grad_norm_guide"] > 0   # split logged (grad_split_every=1)


def test_gradient_is_the_calibrl_loss_gradient(setup):
    tr, b = setup.tr, _fixed(setup)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    got = torch.autograd.grad(tr.compute_loss(tr.model, b), params)
    logp, _, _ = tr._get_per_token_logps_and_entropies(
        tr.model, torch.cat([b["prompt_ids"], b["completion_ids"]], 1),
        torch.cat([b["prompt_mask"], b["completion_mask"]], 1), b["completion_ids"].shape[1],
        pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"], num_images=b["num_images"],
        mm_token_type_ids=b.get("mm_token_type_ids"))
    want, _ = calibrl_loss(logp, b["old_per_token_logps"], b["calibrl_expert_logps"], b["advantages"],
                           b["completion_mask"].bool(), b["calibrl_passed"], expert_mask=b["calibrl_expert_mask"])
    for g, w in zip(got, torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_a_few_trl_steps_end_to_end(setup):
    tr = setup.tr
    before = [p.detach().clone() for p in tr.model.parameters() if p.requires_grad]
    tr._metrics["train"].clear()  # the fixed-batch tests above logged into the same buffers
    tr.train()
    logs = [r for r in tr.state.log_history if "loss" in r and PREFIX + "loss" in r]
    assert len(logs) == 2
    for r in logs:
        for k in ("pg_loss", "guide_loss", "uniform_frac", "entropy_mean", "expert_len_mean", "pass_rate"):
            assert r[PREFIX + k] is not None and r[PREFIX + k] == r[PREFIX + k], k
        assert r["loss"] == pytest.approx(r[PREFIX + "loss"], abs=1e-6)       # TRL's logged loss is calibrl's
    after = [p.detach() for p in tr.model.parameters() if p.requires_grad]
    moved = any(not torch.equal(a, b) for a, b in zip(before, after))
    assert any(r[PREFIX + "nonzero_adv_frac"] > 0 for r in logs)              # seeded: a mixed group occurs
    assert moved


def test_missing_expert_column_and_wrong_args_are_refused(setup, tmp_path):
    tr = setup.tr
    with pytest.raises(ValueError, match="expert column 'solution'"):
        CalibRLTrainer(model=tr.model, reward_funcs=calibrl_reward, args=make_args(tmp_path),
                       train_dataset=setup.data.remove_columns("solution"), processing_class=setup.proc)
    with pytest.raises(ValueError, match="CalibRLConfig"):
        CalibRLTrainer(model=tr.model, reward_funcs=calibrl_reward, args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
                       train_dataset=setup.data, processing_class=setup.proc)
