"""calibrl.integrations.verl: the tensor glue everywhere; the registered functions in verl 0.9.1's own registries
where verl is importable (its separate venv: `bash benchmarks/verl_plugin.sh`), on verl-shaped batches: uid arrays
with one expert row per group, token_level_rewards with the score on the last response token."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("VERL_USE_EXTERNAL_PLUGINS", "none")
from calibrl.advantage import group_advantages  # noqa: E402
from calibrl.integrations import verl as plug  # noqa: E402
from calibrl.losses import calibrl_loss  # noqa: E402

X = plug.EXPERT_SUFFIX


def batch(seed=0):
    """2 groups of 4 on-policy rows + 1 expert row each (the expert of group b first, rows interleaved)."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array(["b" + X, "a", "a", "b", "a", "b", "a" + X, "b", "a", "b"], dtype=object)
    scores = torch.tensor([1.1, 1.1, 0.0, 0.1, 1.0, 0.0, 1.1, 1.1, 0.1, 1.0], dtype=torch.float64)
    n, t = len(uids), 7
    lens = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lens[:, None]).long()
    tlr = torch.zeros(n, t, dtype=torch.float64).scatter(1, (lens - 1)[:, None], scores[:, None])
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)
    return uids, scores, mask, tlr, old, logp


def test_module_imports_without_verl():
    code = "import sys; sys.modules['verl'] = None; import calibrl.integrations.verl as v; print(v.NAME)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "calibrl"


def test_advantage_excludes_the_expert_row_from_the_group_mean():
    uids, scores, mask, tlr, _, _ = batch()
    adv, ret = plug.compute_calibrl_advantage(tlr, mask, index=uids, config={"norm_adv_by_std_in_grpo": False})
    a = adv[torch.arange(len(uids)), 0]
    mean_a, mean_b = (1.1 + 0.0 + 1.0 + 0.1) / 4, (0.1 + 0.0 + 1.1 + 1.0) / 4      # on-policy rows only
    want = torch.tensor([1.1 - mean_b, 1.1 - mean_a, 0 - mean_a, 0.1 - mean_b, 1.0 - mean_a, 0 - mean_b,
                         1.1 - mean_a, 1.1 - mean_b, 0.1 - mean_a, 1.0 - mean_b], dtype=torch.float64)
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(adv, want[:, None] * mask)
    assert torch.equal(ret, adv)
    gids, is_exp = plug.split_uids(uids)
    scaled, _ = plug.compute_calibrl_advantage(tlr, mask, index=uids, config={"norm_adv_by_std_in_grpo": True})
    torch.testing.assert_close(scaled[:, 0], group_advantages(scores, gids, scale="group", on_policy=~is_exp))
    with pytest.raises(ValueError, match="index"):
        plug.compute_calibrl_advantage(tlr, mask, index=None)


def test_attach_expert_aligns_by_index_and_drops_expert_rows_from_the_loss():
    uids, scores, mask, _, old, _ = batch()
    out = plug.attach_expert(old, mask, scores, uids)
    e = out["calibrl_expert_logp"]
    for r, u in enumerate(uids):
        src = 0 if u.startswith("b") else 6                                   # row of the group's expert
        n = int(mask[src].sum())
        torch.testing.assert_close(e[r, :n], old[src, :n])
        assert torch.all(e[r, n:] == 0)                                       # e_t = 0 past the expert's end
    assert out["calibrl_passed"].tolist() == [False, True, False, False, True, False, False, True, False, True]
    assert out["response_mask"][[0, 6]].sum() == 0 and torch.equal(out["response_mask"][1], mask[1])
    no_exp = plug.attach_expert(old[1:6], mask[1:6], scores[1:6], uids[1:6])   # group a has no expert row here
    assert torch.all(no_exp["calibrl_expert_logp"][[0, 1, 3]] == 0)
    with pytest.raises(ValueError, match="more than one expert"):
        plug.attach_expert(old[:2], mask[:2], scores[:2], np.array(["b" + X, "b" + X], dtype=object))


# ------------------------------------------------------------------------------------------- inside verl
def _verl():
    try:
        from verl.trainer.ppo import core_algos
    except Exception as exc:
        pytest.skip(f"verl not importable ({type(exc).__name__}); run bash benchmarks/verl_plugin.sh")
    plug.register()
    return core_algos


CFG = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}


def test_registered_advantage_estimator_is_calibrls_and_matches_verl_grpo_on_on_policy_rows():
    core = _verl()
    uids, scores, mask, tlr, _, _ = batch()
    fn = core.get_adv_estimator_fn("calibrl")
    assert fn is plug.compute_calibrl_advantage
    on = np.array([not u.endswith(X) for u in uids])
    for by_std in (False, True):
        adv, _ = fn(token_level_rewards=tlr, response_mask=mask, index=uids,
                    config={"norm_adv_by_std_in_grpo": by_std})
        ref, _ = core.compute_grpo_outcome_advantage(tlr[on], mask[on], uids[on], norm_adv_by_std_in_grpo=by_std)
        torch.testing.assert_close(adv[torch.from_numpy(on)], ref, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_registered_policy_loss_returns_calibrls_numbers(seed):
    core = _verl()
    uids, scores, mask, tlr, old, logp = batch(seed)
    adv, _ = core.get_adv_estimator_fn("calibrl")(token_level_rewards=tlr, response_mask=mask, index=uids,
                                                  config={"norm_adv_by_std_in_grpo": False})
    ex = plug.attach_expert(old, mask, scores, uids)
    fn = core.get_policy_loss_fn("calibrl")
    lp = logp.clone().requires_grad_()
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=ex["response_mask"],
                       loss_agg_mode="token-mean", config=CFG, rollout_is_weights=None,
                       expert_log_prob=ex["calibrl_expert_logp"], passed=ex["calibrl_passed"])
    lp2 = logp.clone().requires_grad_()
    want, info = calibrl_loss(lp2, old, ex["calibrl_expert_logp"], adv, ex["response_mask"].bool(),
                              ex["calibrl_passed"], clip_high=0.28)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    assert metrics["actor/guided_loss"] == info["guide_loss"] > 0
    assert metrics["actor/pg_clipfrac"] == info["clipfrac"] and metrics["actor/ppo_kl"] == info["approx_kl"]
    loss.backward()
    want.backward()
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=0, atol=1e-12)


def test_policy_term_equals_verl_vanilla_when_the_guidance_is_off():
    core = _verl()
    uids, scores, mask, tlr, old, logp = batch(3)
    adv, _ = plug.compute_calibrl_advantage(tlr, mask, index=uids)
    ex = plug.attach_expert(old, mask, scores, uids)
    plug.register(guide_coef=0.0)
    try:
        ours, _ = core.get_policy_loss_fn("calibrl")(old, logp, adv, ex["response_mask"], "token-mean", CFG, None,
                                                    expert_log_prob=ex["calibrl_expert_logp"],
                                                    passed=ex["calibrl_passed"])
    finally:
        plug.register(guide_coef=0.1)
    theirs, *_ = core.compute_policy_loss(old, logp, adv, ex["response_mask"], cliprange=0.2, cliprange_low=0.2,
                                          cliprange_high=0.28, clip_ratio_c=3.0, loss_agg_mode="token-mean")
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_registered_loss_without_the_batch_fields_says_how_to_install_them():
    core = _verl()
    _, _, mask, _, old, logp = batch()
    with pytest.raises(ValueError, match="calibrl_ppo_loss"):
        core.get_policy_loss_fn("calibrl")(old, logp, torch.zeros_like(old), mask, "token-mean", CFG, None)
    with pytest.raises(ValueError, match="settings"):
        plug.register(alpha=0.3)


def test_calibrl_ppo_loss_is_verls_ppo_loss_with_the_calibrl_fields():
    """The actor loss for set_loss_fn, on a verl TensorDict (left-padded prompts, flat no-padding log-probs) with a
    real ActorConfig(policy_loss.loss_mode="calibrl"): verl's ppo_loss runs and returns calibrl_loss's value."""
    _verl()
    try:
        from tensordict import TensorDict
        from verl.workers.config.actor import ActorConfig, PolicyLossConfig
        import verl.workers.utils.losses  # noqa: F401
    except Exception as exc:
        pytest.skip(f"verl.workers.utils.losses not importable ({type(exc).__name__}: {exc})")
    uids, scores, mask, tlr, old, logp = batch(4)
    n, t = mask.shape
    adv, _ = plug.compute_calibrl_advantage(tlr, mask, index=uids)
    ex = plug.attach_expert(old, mask, scores, uids)
    p_len, r_len, width = torch.tensor([1, 2, 3, 3, 2, 1, 3, 2, 1, 3]), mask.sum(1), 3
    attn = torch.zeros(n, width + t, dtype=torch.long)
    flat = []
    for i in range(n):                                   # verl's layout: logp of response token j at prompt_len+j-1
        attn[i, width - p_len[i]:width] = 1
        attn[i, width:width + r_len[i]] = 1
        seq = torch.zeros(int(p_len[i] + r_len[i]), dtype=torch.float64)
        seq[int(p_len[i]) - 1:int(p_len[i] + r_len[i]) - 1] = logp[i, :r_len[i]]
        flat.append(seq)
    flat = torch.cat(flat).requires_grad_()
    td = TensorDict({"prompts": torch.zeros(n, width, dtype=torch.long), "responses": torch.zeros(n, t, dtype=torch.long),
                     "attention_mask": attn, "response_mask": ex["response_mask"], "old_log_probs": old,
                     "advantages": adv, "calibrl_expert_logp": ex["calibrl_expert_logp"],
                     "calibrl_passed": ex["calibrl_passed"]}, batch_size=[n])
    for k, v in (("dp_size", 1), ("batch_num_tokens", None), ("global_batch_size", None)):
        td.set_non_tensor(k, v)
    cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1, clip_ratio=0.2,
                      clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode="token-mean",
                      use_dynamic_bsz=False, rollout_n=1, policy_loss=PolicyLossConfig(loss_mode="calibrl"))
    loss, metrics = plug.calibrl_ppo_loss(cfg, {"log_probs": flat}, td)
    lp = logp.clone().requires_grad_()
    want, info = calibrl_loss(lp, old, ex["calibrl_expert_logp"], adv, ex["response_mask"].bool(),
                              ex["calibrl_passed"], clip_high=0.28)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    assert float(metrics["actor/guided_loss"].values[0]) == pytest.approx(info["guide_loss"], abs=1e-12)  # verl Metric
    loss.backward()
    want.backward()
    got = torch.stack([flat.grad[sum(p_len[:i] + r_len[:i]) + p_len[i] - 1 + j] if j < r_len[i] else
                       flat.new_zeros(()) for i in range(n) for j in range(t)]).view(n, t)
    torch.testing.assert_close(got, lp.grad, rtol=0, atol=1e-12)
