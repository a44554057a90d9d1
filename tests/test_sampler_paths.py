"""One sampling distribution on every path: checkpoint generation settings never leak into `generate`, the
sampler's log-probs are always recorded (so the drift check sees an off-policy forward), every EOS id ends a
response (also when one equals the pad id), and both paths agree on the same samples."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_rollout import ASSET, tiny_policy  # noqa: E402

from calibrl.config import TrainConfig  # noqa: E402
from calibrl.rollout import encode_prompts, response_mask, rows_logprobs, sample_groups  # noqa: E402

pytestmark = pytest.mark.skipif(not (ASSET / "config.json").exists(), reason="needs the shipped tiny model")


@pytest.fixture(scope="module")
def examples():
    from calibrl.tasks import DEFAULT_TASK, make_dataset

    ds = make_dataset(DEFAULT_TASK, 3, 0)
    return [ds[i] for i in range(3)]


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def _inputs(policy, examples):
    return encode_prompts(policy, [e["image"] for e in examples], [e["question"] for e in examples])


def _has_repeat(comp, mask):
    return any(len(set(r[m].tolist())) < int(m.sum()) for r, m in zip(comp, mask))


def test_checkpoint_generation_settings_do_not_change_the_plain_sampler(tmp_path, examples):
    from calibrl.models import load_policy
    from calibrl.plain import ignored_generation_settings

    d = tmp_path / "tiny-gc"
    shutil.copytree(ASSET, d)
    gc = json.loads((d / "generation_config.json").read_text())
    # no_repeat_ngram_size=1 would forbid any repeated token in a response; the others reshape the distribution
    gc.update(repetition_penalty=1.3, no_repeat_ngram_size=1, top_k=3, min_p=0.3, typical_p=0.5)
    (d / "generation_config.json").write_text(json.dumps(gc))
    pol = load_policy(str(d))
    assert set(ignored_generation_settings(pol.model)) >= {"repetition_penalty", "no_repeat_ngram_size", "top_k",
                                                           "min_p", "typical_p"}
    inputs = _inputs(pol, examples)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="ignoring the checkpoint's generation settings"):
        s = sample_groups(pol, inputs, 6, max_new_tokens=24, sampler="generate")
    assert pol.model.generation_config.no_repeat_ngram_size == 1  # restored after the call
    assert _has_repeat(s.completion_ids, s.mask)  # the banned repeats happen: the setting was not applied
    rows = torch.arange(3).repeat_interleave(6)
    with torch.no_grad():
        lp, _ = rows_logprobs(pol, inputs, rows, s.completion_ids, s.mask, sampler="generate")
    assert (lp - s.logp)[s.mask].abs().max().item() <= 1e-4
    # the same seed gives the same samples as the model without the injected settings
    clean = tiny_policy()
    torch.manual_seed(0)
    s2 = sample_groups(clean, _inputs(clean, examples), 6, max_new_tokens=24, sampler="generate")
    assert torch.equal(s.completion_ids, s2.completion_ids)


def test_both_sampler_paths_agree_on_the_same_samples(policy, examples):
    inputs = _inputs(policy, examples)
    rows = torch.arange(3).repeat_interleave(4)
    for path in ("generate", "shared-prefix"):
        torch.manual_seed(5)
        s = sample_groups(policy, inputs, 4, max_new_tokens=16, temperature=0.9, sampler=path)
        assert s.path == path
        with torch.no_grad():
            a, ea = rows_logprobs(policy, inputs, rows, s.completion_ids, s.mask, temperature=0.9,
                                  return_entropy=True, sampler="generate")
            b, eb = rows_logprobs(policy, inputs, rows, s.completion_ids, s.mask, temperature=0.9,
                                  return_entropy=True, sampler="shared-prefix")
        m = s.mask
        assert (a - b)[m].abs().max().item() <= 1e-4 and (ea - eb)[m].abs().max().item() <= 1e-4
        assert (a - s.logp)[m].abs().max().item() <= 1e-4 and (ea - s.entropy)[m].abs().max().item() <= 1e-4


def test_every_eos_id_ends_a_response_on_both_paths(policy, examples):
    inputs = _inputs(policy, examples)
    torch.manual_seed(0)
    s = sample_groups(policy, inputs, 4, max_new_tokens=16)
    toks = s.completion_ids[s.mask & (s.completion_ids != policy.eos_token_id)]
    second = int(torch.mode(toks).values)  # a token every response uses: make it a second EOS id
    pol = dataclasses.replace(policy, eos_token_ids=[policy.eos_token_id, second])
    for path in ("shared-prefix", "generate"):
        torch.manual_seed(0)
        s2 = sample_groups(pol, inputs, 4, max_new_tokens=16, sampler=path)
        ends = torch.isin(s2.completion_ids, torch.tensor(pol.eos_token_ids)) & s2.mask
        assert torch.equal(s2.mask, response_mask(s2.completion_ids, pol.eos_token_ids))
        assert (ends.sum(1) <= 1).all() and (s2.mask.sum(1) < s.mask.sum(1)).any()
        last = s2.mask.sum(1) - 1
        ended = ends.any(1)
        assert torch.isin(s2.completion_ids[torch.arange(12), last][ended], torch.tensor(pol.eos_token_ids)).all()


def test_an_eos_id_equal_to_the_pad_id(policy, examples):
    pol = dataclasses.replace(policy, pad_token_id=policy.eos_token_id)
    inputs = _inputs(pol, examples)
    for path in ("shared-prefix", "generate"):
        torch.manual_seed(2)
        s = sample_groups(pol, inputs, 3, max_new_tokens=24, sampler=path)
        ended = (s.completion_ids == pol.eos_token_id).any(1)
        assert ended.any()
        # the mask stops at the first EOS although every pad after it is the same id
        assert torch.equal(s.mask.sum(1)[ended], (s.completion_ids[ended] == pol.eos_token_id).int().argmax(1) + 1)
        with torch.no_grad():
            lp, _ = rows_logprobs(pol, inputs, torch.arange(3).repeat_interleave(3), s.completion_ids, s.mask,
                                  sampler=path)
        assert (lp - s.logp)[s.mask].abs().max().item() <= 1e-4 and torch.all(s.logp[~s.mask] == 0)
    assert torch.equal(response_mask(torch.tensor([[5, 2, 2, 2]]), [2]), torch.tensor([[True, True, False, False]]))


def test_dropped_mm_token_type_ids_are_flagged_by_logp_gap_max(tmp_path, monkeypatch):
    """The plain path records the sampler's own log-probs, so a training forward that drops mm_token_type_ids
    (off-policy for Qwen2.5-VL) shows up in logp_gap_max instead of comparing two teacher-forced passes."""
    from calibrl import plain
    from calibrl.tasks import DEFAULT_TASK, make_dataset
    from calibrl.trainer import Trainer

    data = make_dataset(DEFAULT_TASK, 8, 0)
    kw = dict(mode="grpo", steps=1, prompts_per_step=2, group_size=2, max_new_tokens=8, minibatches=1, eval_every=0,
              sampler="generate", recompute_old_logp=True, threads=1, out=str(tmp_path))
    ok = Trainer(TrainConfig.from_budget("smoke", name="ok", **kw), policy=tiny_policy(lora=True),
                 train_data=data).step()
    assert ok["logp_gap_max"] <= 1e-4 and ok["sampler"] == "generate"
    real = plain.sequence_hidden
    monkeypatch.setattr(plain, "sequence_hidden", lambda model, inputs, *a: real(
        model, {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, *a))
    bad = Trainer(TrainConfig.from_budget("smoke", name="bad", **kw), policy=tiny_policy(lora=True),
                  train_data=data).step()
    assert bad["logp_gap_max"] > 0.1
