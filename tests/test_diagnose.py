"""calibrl.diagnose: one rollout of the tiny model; the verdict follows the measured gate (paper-style expert: the
gate is stuck; policy-style expert: it splits), the predicted step factor equals the library's gradient ratio, the
verifier is pluggable and hub-format data works from the command line."""
import json
import types

import pytest
import torch

import calibrl
from calibrl import diagnosis


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    from calibrl.models import load_policy
    return load_policy("tiny")


@pytest.fixture(scope="module")
def both(policy):
    return {s: calibrl.diagnose(policy=policy, n_prompts=4, group_size=4, style=s, seed=0) for s in ("expert", "policy")}


def test_verdict_follows_the_gate(both):
    exp, pol = both["expert"], both["policy"]
    assert exp["expert_gap_q50"] > 5 and abs(pol["expert_gap_q50"]) < 1
    assert exp["gate_passed_below"] < 0.1 and exp["gate_failed_above"] > 0.9       # stuck
    assert 0.1 < pol["gate_passed_below"] < 0.9 and 0.1 < pol["gate_failed_above"] < 0.9   # splits
    assert exp["verdict"].startswith("the gate will be nearly constant")
    assert "negative-tilted" in exp["verdict"]
    assert pol["verdict"].startswith("the gate splits tokens")
    # stuck gate: passed tokens get 1 + lambda*alpha, failed ones about 1 + lambda (format-bonus rows pull it down)
    assert exp["step_factor_passed"] == pytest.approx(1.05, abs=0.01)
    assert 1.05 < exp["step_factor_failed"] <= 1.1
    for r in both.values():
        assert 0 < r["grad_norm_ratio"] < 0.5 and r["grad_cos_pg_guide"] > 0.5
        assert sum(r["pass_rate_hist"]) == 4 and len(r["expert_gap_by_position"]["q50"]) > 0
        assert "gate_tie_frac" in r and json.dumps(r)


def test_predicted_step_is_the_gradient_ratio():
    """predicted_step's factor is the |A|-weighted mean of d(CalibRL)/d(logp) / d(GRPO)/d(logp) at ratio 1."""
    from calibrl.losses import calibrl_loss, policy_loss
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([1.1, 0.0, 1.0, 0.1, 0.0, 0.0])
    rp = torch.tensor([0, 0, 0, 1, 1, 1])
    from calibrl.advantage import group_advantages
    adv = group_advantages(rewards, rp)
    old = -torch.rand(6, 5, generator=g) * 3
    e = -torch.rand(2, 5, generator=g) * 3
    emask = torch.ones(2, 5, dtype=torch.bool)
    mask = torch.ones(6, 5, dtype=torch.bool)
    b = types.SimpleNamespace(old_logp=old, mask=mask, passed=rewards > 0.1, adv=adv)
    got = diagnosis.predicted_step(b, e[rp], emask[rp], torch.ones(6, dtype=torch.bool), 0.5, 0.1)
    lp = old.clone().requires_grad_()
    gc, = torch.autograd.grad(calibrl_loss(lp, old, e[rp], adv, mask, b.passed, expert_mask=emask[rp])[0], lp)
    gp, = torch.autograd.grad(policy_loss(lp, old, adv, mask)[0], lp)
    ratio, w = gc / gp, adv.abs()[:, None].expand_as(gp)
    for key, sel in (("passed", b.passed), ("failed", ~b.passed)):
        m = sel[:, None].expand_as(gp)
        assert got[f"step_factor_{key}"] == pytest.approx(float((ratio * w)[m].sum() / w[m].sum()), rel=1e-5)


def test_verdict_without_signal_and_bad_reward_spec():
    assert diagnosis.verdict({"gate_passed_below": None, "gate_failed_above": None}, 0.1).startswith("no signal")
    for bad in ("nocolon", "calibrl.rewards:nothing_here", "no_such_module_xyz:f"):
        with pytest.raises(ValueError, match="reward"):
            diagnosis.load_reward(bad)


def test_cli_hub_format_data_and_custom_verifier(tmp_path, monkeypatch, capsys):
    import datasets
    from calibrl.tasks import make_dataset
    ds = make_dataset("biggest_color", 3, seed=5)
    hub = datasets.Dataset.from_dict({"images": [[ex["image"]] for ex in ds], "problem": [ex["question"] for ex in ds],
                                      "answer": [ex["answer"] for ex in ds], "solution": [[ex["solution"]] for ex in ds]})
    hub.to_parquet(str(tmp_path / "hub.parquet"))
    (tmp_path / "my_verifier.py").write_text("def always(completion, answer):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from calibrl.cli import main
    rc = main(["diagnose", "--data", str(tmp_path / "hub.parquet"), "--reward", "my_verifier:always", "--n", "3",
               "--group-size", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "d")])
    assert rc == 0
    r = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert r["n_prompts"] == 3 and r["uniform_frac"] == 1.0 and r["verdict"].startswith("no signal")
    assert r["grad_norm_pg"] is None
    page = (tmp_path / "d" / "diagnose.html").read_text()
    assert page.count('class="plotly-graph-div"') == 4 and "Verdict" in page
    assert "verdict: no signal" in capsys.readouterr().out
