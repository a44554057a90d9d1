"""Trainer: bit-identical resume, every contract metric every step, equal optimizer steps across modes, skipped
non-finite steps, run-directory safety, and bad inputs rejected before any training."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_rollout import tiny_policy  # noqa: E402

from calibrl.config import TrainConfig  # noqa: E402
from calibrl.history import History  # noqa: E402
from calibrl.trainer import Trainer, train  # noqa: E402

CONTRACT_KEYS = """step mode seed time_s reward_mean acc_mean format_rate response_len_mean expert_len_mean entropy_mean
entropy_passed entropy_failed entropy_expert uniform_frac all_pass_frac all_fail_frac abs_adv_mean gate_passed_below
gate_passed_above gate_failed_above gate_failed_below gate_weight_mean expert_gap_q10 expert_gap_q50 expert_gap_q90
expert_past_end_frac cov_logp_adv pg_loss guide_loss loss clipfrac approx_kl grad_norm grad_norm_pg grad_norm_guide
grad_cos_pg_guide kl_to_start logp_gap_max skipped lr opt_steps""".split()
EVAL_KEYS = ["eval_greedy_acc", "eval_pass_at_k", "eval_format_rate"]


@pytest.fixture(scope="module")
def data():
    from calibrl.tasks import DEFAULT_TASK, make_dataset

    return make_dataset(DEFAULT_TASK, 16, 0), make_dataset(DEFAULT_TASK, 2, 99)


def cfg_for(tmp_path, mode="grpo", **kw):
    base = dict(mode=mode, steps=2, prompts_per_step=2, group_size=3, max_new_tokens=8, minibatches=2,
                eval_every=0, samples_per_step=1, out=str(tmp_path), name=f"{mode}-run",
                threads=1)  # robust timing when another job shares the 2 cores
    base.update(kw)
    return TrainConfig.from_budget("smoke", **base)


def _lora_trainable(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def test_resume_is_bit_identical(tmp_path, data):
    train_ds, eval_ds = data
    # an entropy bonus gives a non-zero gradient even when no sample earns reward, so the test can fail
    kw = dict(steps=6, eval_every=3, eval_n=2, pass_k=2, entropy_coef=0.05, lr=1e-2)
    straight = train(cfg_for(tmp_path, name="straight", **kw), policy=tiny_policy(lora=True), train_data=train_ds,
                     eval_data=eval_ds)
    train(cfg_for(tmp_path, name="split", **{**kw, "steps": 3}), policy=tiny_policy(lora=True), train_data=train_ds,
          eval_data=eval_ds)
    tr = Trainer(cfg_for(tmp_path, name="split", **kw), policy=tiny_policy(lora=True), train_data=train_ds,
                 eval_data=eval_ds, resume=True)
    assert tr.step_num == 3
    resumed = tr.run()
    a = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in straight.rows]  # timings vary
    b = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in History.load(tmp_path / "split").rows]
    assert len(a) == len(b) == 6 and len(resumed.rows) == 6
    assert a == b
    assert all(r["grad_norm"] > 0 for r in straight.rows)  # the weights did move
    assert [("eval_greedy_acc" in r) for r in a] == [False, False, True, False, False, True]
    sa = History.load(tmp_path / "straight").samples()
    sb = History.load(tmp_path / "split").samples()
    assert sa == sb and len(sa) == 6


def test_every_contract_metric_every_step(tmp_path, data):
    train_ds, eval_ds = data
    seen = []
    hist = train(cfg_for(tmp_path, "calibrl", eval_every=2, eval_n=2, pass_k=2), policy=tiny_policy(lora=True),
                 train_data=train_ds, eval_data=eval_ds, on_step=seen.append)
    assert [r["step"] for r in seen] == [1, 2]
    for r in hist.rows:
        assert set(CONTRACT_KEYS) <= set(r), sorted(set(CONTRACT_KEYS) - set(r))
        assert r["mode"] == "calibrl" and r["opt_steps"] == 2 and r["skipped"] == 0
        assert r["logp_gap_max"] <= 1e-4  # the training forward equals the sampler before the first update
        assert r["kl_to_start"] is not None and r["kl_to_start"] >= 0
        for v in r.values():
            assert not (isinstance(v, float) and v != v)  # never NaN
    assert set(EVAL_KEYS) <= set(hist.rows[1]) and not set(EVAL_KEYS) & set(hist.rows[0])
    assert hist.rows[0]["kl_to_start"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: the start policy itself
    run = tmp_path / "calibrl-run"
    for f in ("config.json", "history.jsonl", "samples.jsonl", "eval.jsonl", "checkpoint/state.pt"):
        assert (run / f).exists(), f
    df = History.load(run).to_pandas()
    assert list(df["step"]) == [1, 2] and "entropy_mean" in df
    assert json.loads((run / "config.json").read_text())["loss"]["mode"] == "calibrl"
    s = History.load(run).samples()[0]
    assert len(s["tokens"]) == len(s["entropy"]) == len(s["logp"]) and isinstance(s["passed"], bool)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "dapo", "calibrl", "luffy", "rlplus"])
def test_same_optimizer_steps_in_every_mode(tmp_path, data, mode):
    train_ds, _ = data
    hist = train(cfg_for(tmp_path, mode, steps=1, prompts_per_step=4, group_size=2, max_new_tokens=6, ppo_epochs=2,
                         minibatches=2, grad_accum=2, kl_every=0), policy=tiny_policy(lora=True), train_data=train_ds)
    assert hist.rows[0]["opt_steps"] == 4  # ppo_epochs x minibatches, whatever the mode


def test_non_finite_loss_skips_the_step(tmp_path, data, monkeypatch):
    from calibrl import losses

    train_ds, _ = data
    real = losses.policy_loss_kernel  # the micro-batch loop's (unchecked) loss

    def nan_loss(*a, **k):
        loss, info = real(*a, **k)
        return loss * float("nan"), info

    monkeypatch.setattr(losses, "policy_loss_kernel", nan_loss)
    policy = tiny_policy(lora=True)
    before = _lora_trainable(policy)
    hist = train(cfg_for(tmp_path, steps=1), policy=policy, train_data=train_ds)
    r = hist.rows[0]
    assert r["skipped"] == 1 and r["opt_steps"] == 0 and r["grad_norm"] is None
    after = _lora_trainable(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_existing_run_dir_is_refused(tmp_path, data):
    train_ds, _ = data
    cfg = cfg_for(tmp_path, steps=1)
    train(cfg, policy=tiny_policy(lora=True), train_data=train_ds)
    with pytest.raises(ValueError, match="already exists"):
        train(cfg, policy=tiny_policy(lora=True), train_data=train_ds)
    hist = train(cfg, policy=tiny_policy(lora=True), train_data=train_ds, overwrite=True)
    assert len(hist.rows) == 1
    with pytest.raises(ValueError, match=r"config differs.*group_size"):
        Trainer(cfg_for(tmp_path, steps=2, group_size=2), policy=tiny_policy(lora=True), train_data=train_ds,
                resume=True)


def test_bad_inputs_before_any_training(tmp_path, data):
    train_ds, _ = data
    pol = tiny_policy(lora=True)
    with pytest.raises(ValueError, match=r"'calibrl'.*'solution'|'solution'.*'calibrl'"):
        Trainer(cfg_for(tmp_path, "calibrl"), policy=pol, train_data=train_ds.remove_columns("solution"))
    with pytest.raises(ValueError, match="train_data.*non-empty"):
        Trainer(cfg_for(tmp_path), policy=pol, train_data=train_ds.select([]))
    with pytest.raises(ValueError, match="group_size"):
        cfg_for(tmp_path, group_size=1)
    with pytest.raises(ValueError, match="mode"):
        cfg_for(tmp_path, mode="ppo")
    no_proc = SimpleNamespace(**{k: getattr(pol, k) for k in ("model", "tokenizer", "suppress_token_ids",
                                                               "eos_token_id", "pad_token_id", "is_lora")},
                              processor=None)
    with pytest.raises(ValueError, match="processor"):
        Trainer(cfg_for(tmp_path), policy=no_proc, train_data=train_ds)
    assert not any(tmp_path.iterdir())  # nothing was written
    # GRPO does not need experts: it trains without the column (gate probes become null)
    hist = train(cfg_for(tmp_path, steps=1), policy=pol, train_data=train_ds.remove_columns("solution"))
    assert hist.rows[0]["gate_passed_below"] is None and hist.rows[0]["entropy_expert"] is None


def test_prompt_order_depends_only_on_seed_and_step(tmp_path, data):
    train_ds, _ = data
    pol = tiny_policy(lora=True)
    a = Trainer(cfg_for(tmp_path, name="a"), policy=pol, train_data=train_ds)
    b = Trainer(cfg_for(tmp_path, "calibrl", name="b"), policy=pol, train_data=train_ds)
    c = Trainer(cfg_for(tmp_path, name="c", seed=1), policy=pol, train_data=train_ds)
    order = [a.prompt_indices(s) for s in range(1, 9)]  # 8 steps x 2 prompts = one pass over 16 prompts
    assert order == [b.prompt_indices(s) for s in range(1, 9)]
    assert order != [c.prompt_indices(s) for s in range(1, 9)]
    assert sorted(i for o in order for i in o) == list(range(16))



def test_expert_style_picks_the_solutions_the_expert_modes_see(tmp_path):
    from calibrl.tasks import DEFAULT_TASK, make_dataset

    with pytest.raises(ValueError, match="expert_style"):
        cfg_for(tmp_path, "calibrl", expert_style="gpt4o")
    pol = tiny_policy(lora=True)
    tr = Trainer(cfg_for(tmp_path, "calibrl", expert_style="policy", train_size=4), policy=pol)
    short = make_dataset(DEFAULT_TASK, 4, 0, style="policy")["solution"]
    long = make_dataset(DEFAULT_TASK, 4, 0, style="expert")["solution"]
    assert tr.train_data["solution"] == short and short != long
    assert json.loads((tr.run_dir / "config.json").read_text())["expert_style"] == "policy"


# ------------------------------------------------------------- micro-batches, expert horizon, faults, columns
def _grads_of_first_step(tr):
    """Run one RL step, capturing the gradient of every optimizer step."""
    seen = []
    real = tr.optimizer.step

    def step(*a, **k):
        seen.append([p.grad.detach().clone() for p in tr.params])
        return real(*a, **k)

    tr.optimizer.step = step
    tr.step()
    return seen


def test_odd_grad_accum_splits_whole_prompts_and_mini_batch_norm_matches_one_pass(tmp_path, data):
    train_ds, _ = data
    # an entropy bonus gives a non-zero gradient even when no sample earns reward
    kw = dict(mode="grpo", steps=1, prompts_per_step=6, group_size=2, minibatches=2, lr=1e-2, entropy_coef=0.05)
    with pytest.raises(ValueError, match="grad_accum"):  # micro-batches are whole prompts: at most 3 here
        cfg_for(tmp_path, grad_accum=4, **kw)
    grads = {}
    for name, extra in {"one": dict(grad_accum=1), "mini": dict(grad_accum=2, loss_norm="mini-batch"),
                        "micro": dict(grad_accum=2, loss_norm="micro-batch")}.items():
        torch.manual_seed(0)
        tr = Trainer(cfg_for(tmp_path, name=name, **kw, **extra), policy=tiny_policy(lora=True), train_data=train_ds)
        seen = []
        real_loss = tr._loss

        def spy(lp, b, rows, *a, _real=real_loss, **kw):
            if not kw.get("checked"):  # not the once-per-step validation over every row
                seen.append(sorted(set((rows // 2).tolist())))  # prompts of the micro-batch
            return _real(lp, b, rows, *a, **kw)

        tr._loss = spy
        grads[name] = _grads_of_first_step(tr)[0]
        if name != "one":
            assert sorted(len(p) for p in seen[:2]) == [1, 2]  # 3 prompts -> micro-batches of 2 and 1 prompts
    scale = max(g.abs().max().item() for g in grads["one"])
    assert scale > 0
    diff = lambda a, b: max((x - y).abs().max().item() for x, y in zip(grads[a], grads[b]))
    assert diff("one", "mini") <= 1e-5 * scale  # verl 0.9.1-style global normalisation = one pass
    assert diff("one", "micro") > 1e-4 * scale  # per-micro-batch token-mean differs when the sizes differ


def test_expert_rows_are_cut_to_the_on_policy_horizon(tmp_path, data, monkeypatch):
    from calibrl import losses

    train_ds, _ = data
    widths = []
    real = losses.luffy_loss

    def spy(lp, old, adv, mask, e_lp, e_adv, e_mask, **kw):
        widths.append(int(e_mask.sum(1).max()))
        return real(lp, old, adv, mask, e_lp, e_adv, e_mask, **kw)

    monkeypatch.setattr(losses, "luffy_loss", spy)
    for horizon in ("on-policy", "full"):
        widths.clear()
        tr = Trainer(cfg_for(tmp_path, "luffy", name=f"h-{horizon}", steps=1, expert_horizon=horizon),
                     policy=tiny_policy(lora=True), train_data=train_ds)
        row = tr.step()
        assert widths
        if horizon == "on-policy":
            assert max(widths) <= 8  # max_new_tokens
        else:
            assert max(widths) > 8 and max(widths) == int(row["expert_len_mean"] > 8) * max(widths)


def test_non_finite_log_probs_skip_the_step_and_too_many_stop_the_run(tmp_path, data):
    from calibrl.trainer import TooManySkips

    train_ds, _ = data
    tr = Trainer(cfg_for(tmp_path, "calibrl", steps=4, max_consecutive_skips=3), policy=tiny_policy(lora=True),
                 train_data=train_ds)
    real = tr._forward
    calls = {"n": 0}

    def nan_once(b, rows, e_rows):
        lp, ent, e_lp = real(b, rows, e_rows)
        calls["n"] += 1
        return (lp * float("nan") if calls["n"] == 1 else lp), ent, e_lp

    tr._forward = nan_once
    row = tr.step()  # no ValueError from inside the loss: the step is skipped and logged
    assert row["skipped"] == 1 and row["skipped_steps"] == 1 and row["skip_reason"] == "non-finite log-prob"
    assert row["opt_steps"] == 1
    tr._forward = lambda b, rows, e_rows: tuple(None if x is None else x * float("nan") for x in real(b, rows, e_rows))
    row = tr.step()
    assert row["skipped_steps"] == 2 and row["opt_steps"] == 0 and row["consecutive_skips"] == 2
    with pytest.raises(TooManySkips, match="4 consecutive optimizer steps skipped"):
        tr.step()
    rows = History.load(tmp_path / "calibrl-run").rows
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["consecutive_skips"] == 4


def test_batch_validated_once_then_kernels_and_nan_old_logp_skips(tmp_path, data, monkeypatch):
    """The checked loss runs once per RL step over every row; micro-batches call the unchecked kernel. A rollout
    whose own old log-probs are NaN skips the step (logged) instead of crashing in validation."""
    from calibrl import losses

    train_ds, _ = data
    calls = {"checked": 0, "kernel": 0}
    checked, kernel = losses.calibrl_loss, losses.calibrl_loss_kernel
    monkeypatch.setattr(losses, "calibrl_loss", lambda *a, **k: (calls.__setitem__("checked", calls["checked"] + 1),
                                                                  checked(*a, **k))[1])
    monkeypatch.setattr(losses, "calibrl_loss_kernel", lambda *a, **k: (calls.__setitem__("kernel", calls["kernel"] + 1),
                                                                         kernel(*a, **k))[1])
    tr = Trainer(cfg_for(tmp_path, "calibrl", steps=2, prompts_per_step=4, grad_accum=2), policy=tiny_policy(lora=True),
                 train_data=train_ds)
    row = tr.step()
    # the checked call runs the kernel once itself; then one kernel call per micro-batch (2 per optimizer step)
    assert calls["checked"] == 1 and calls["kernel"] == 1 + tr.cfg.opt_steps_per_rl_step * 2 and row["opt_steps"] == 2
    import calibrl.trainer as trainer_mod

    orig = trainer_mod.with_advantages

    def nan_old(b, *a, **k):
        out = orig(b, *a, **k)
        out.old_logp[0, 0] = float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "with_advantages", nan_old)
    row = tr.step()
    assert row["skip_reason"] == "non-finite old log-prob" and row["opt_steps"] == 0, row["skip_reason"]


def test_phase_split_and_entropy_at_both_temperatures(tmp_path, data):
    train_ds, _ = data
    r1 = Trainer(cfg_for(tmp_path, "calibrl", name="t1", steps=1), policy=tiny_policy(lora=True),
                 train_data=train_ds).step()
    for k in ("generate_s", "old_logp_s", "ref_logp_s", "reward_s", "update_s", "probes_s", "eval_s", "time_s"):
        assert isinstance(r1[k], float) and r1[k] >= 0, k
    assert r1["temperature"] == 1.0
    for k in ("mean", "passed", "failed", "expert"):
        assert r1[f"entropy_t1_{k}"] == r1[f"entropy_{k}"]
    r7 = Trainer(cfg_for(tmp_path, "calibrl", name="t07", steps=1, temperature=0.7), policy=tiny_policy(lora=True),
                 train_data=train_ds).step()
    assert r7["temperature"] == 0.7
    assert r7["entropy_t1_mean"] > r7["entropy_mean"] and r7["entropy_t1_expert"] > r7["entropy_expert"]
