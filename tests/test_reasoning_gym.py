"""External check: our verifier agrees with reasoning-gym's own score_answer on the rg_geometry family."""
import random
import re

import pytest

rg = pytest.importorskip("reasoning_gym")

from calibrl.rewards import accuracy_reward, format_reward  # noqa: E402
from calibrl.tasks import make_dataset, sample  # noqa: E402
from calibrl.tasks.rg_geometry import rg_entry, rg_score  # noqa: E402

N, SEED = 300, 7


def _variants(answer: str, rng: random.Random) -> list[str]:
    """The gold answer, formatting variants, and wrong answers (perturbed numbers, truncations, garbage)."""
    nums = re.findall(r"-?\d+\.\d+", answer)
    last = nums[-1]
    out = [answer, answer.replace("°", ""), f" {answer} ", answer.replace(", ", ","), answer.replace(last, last + "0"),
           "0", "", "abc", answer.replace("(", "").replace(")", ""), answer.replace("°", " °")]
    for delta in (0.001, 0.003, 0.004, 0.006, 0.01, 0.1, 1.0, -0.002, -0.01, -1.0):
        k = rng.randrange(len(nums))
        new = f"{float(nums[k]) + delta:.4f}"
        out.append(answer.replace(nums[k], new, 1))
    out.append(answer.replace(nums[0], nums[0][:-1], 1))  # one decimal fewer
    return out


def test_rg_geometry_examples_are_deterministic_and_expert_solutions_verify():
    ds = make_dataset("rg_geometry", 12, SEED)
    assert ds[:6]["question"] == make_dataset("rg_geometry", 6, SEED)["question"]
    assert ds[0]["question"] != make_dataset("rg_geometry", 1, SEED + 1)[0]["question"]
    for style in ("expert", "policy"):
        for e in make_dataset("rg_geometry", 12, SEED, style=style):
            assert accuracy_reward(e["solution"], e["answer"]) == 1.0
            assert format_reward(e["solution"]) == 1.0
            assert e["image"].size == (112, 112)
    ex = sample("rg_geometry", 3, SEED)
    assert ex["answer"] == rg_entry(3, SEED)["answer"]
    assert all(f"{v}=" in ex["question"] for v in "ABC") and ex["question"].endswith("</answer>.")


def test_verifier_agrees_with_reasoning_gym_score_answer():
    rng = random.Random(0)
    agree = total = wrong_seen = 0
    disagreements = []
    for i in range(N):
        entry = rg_entry(i, SEED)
        gold = entry["answer"]
        for v in _variants(gold, rng):
            ours = accuracy_reward(f"<think> x </think><answer>{v}</answer>", gold) == 1.0
            theirs = rg_score(v, i, SEED, entry) == 1.0
            total += 1
            wrong_seen += not theirs
            if ours == theirs:
                agree += 1
            else:
                disagreements.append((i, gold, v, ours, theirs))
    rate = agree / total
    print(f"agreement {agree}/{total} = {rate:.4f}; first disagreements: {disagreements[:5]}")
    assert total >= 20 * N and wrong_seen > total / 3  # a few hundred items, many wrong answers among the variants
    assert rate >= 0.99, disagreements[:10]
