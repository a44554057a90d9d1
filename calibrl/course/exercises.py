"""The exercises of the course: for each, fresh random inputs, the library's reference answer and a hint.

Every exercise is a function the learner writes; the checker (calibrl.course.check) calls it on inputs drawn here
from a seed it does not show, so a memorised constant or a number read off one batch cannot pass, and compares with
the library (calibrl.advantage, calibrl.losses, calibrl.probes, calibrl.rewards, calibrl.report), never with the
solutions module. Inputs are drawn so that each typical mistake (wrong sign, off-by-one, forgotten mask or |A|, the
complement, the format-bonus edge case) changes the answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

REWARD_VALUES = (0.0, 0.1, 1.0, 1.1)  # acc + 0.1 * fmt


@dataclass(frozen=True)
class Exercise:
    """One checked exercise. draw(rng) -> positional arguments; reference(*args) -> the library's answer;
    kind: how answers compare ("tensor", "scalar", "bool", "int", "str" or "predicate": reference returns True
    when the learner's output is acceptable); hint: what to look at, never the answer."""

    name: str
    title: str
    signature: str
    hint: str
    draw: Callable[[random.Random], tuple]
    reference: Callable[..., Any]
    kind: str
    trials: int = 6


def _gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(63))


def _groups(rng: random.Random, edge_case: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards in {0, 0.1, 1, 1.1} for 3-5 groups of 3-8 rows: at least one mixed group, and (edge_case) one
    all-fail group with mixed formatting (its formatted row has A > 0 though it failed)."""
    sizes = [rng.randint(3, 8) for _ in range(rng.randint(3, 5))]
    rewards = []
    for i, n in enumerate(sizes):
        if i == 0:
            r = [rng.choice((1.0, 1.1)) for _ in range(n - 1)] + [rng.choice((0.0, 0.1))]
        elif i == 1 and edge_case:
            r = [0.1] + [0.0] * (n - 1)
        elif i == 2:  # a uniform group: A = 0 there (std 0: scaling needs its eps)
            r = [rng.choice(REWARD_VALUES)] * n
        else:
            r = [rng.choice(REWARD_VALUES) for _ in range(n)]
        rng.shuffle(r)
        rewards += r
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.tensor(rewards, dtype=torch.float64), groups  # float64: a uniform group's mean is exact


def _batch(rng: random.Random, *, pads: bool = True, spread: float = 1.0) -> dict[str, torch.Tensor]:
    g = _gen(rng)
    rewards, groups = _groups(rng)
    from calibrl.advantage import group_advantages

    rewards = rewards.float()

    b, t = rewards.shape[0], rng.randint(4, 9)
    old = -torch.rand(b, t, generator=g) * 3
    logp = -(old + spread * 0.5 * torch.randn(b, t, generator=g)).abs()   # log-probs <= 0 (> 0 is rejected)
    # the expert sits below the policy on most tokens (as with an off-policy expert), not at a 50/50 split
    expert = -(logp - torch.randn(b, t, generator=g).abs() * 2 + (torch.rand(b, t, generator=g) < 0.25) * 3.0).abs()
    mask = torch.ones(b, t, dtype=torch.bool)
    if pads:
        lens = torch.randint(1, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lens[:, None]
        logp = torch.where(mask, logp, -50.0)      # junk at pads: a forgotten mask shows
    return {"rewards": rewards, "groups": groups, "adv": group_advantages(rewards, groups), "passed": rewards > 0.1,
            "logp": logp, "old_logp": old, "expert_logp": expert, "mask": mask}


# ------------------------------------------------------------------------------------------------ references
def _ref_step_factor(logp, expert_logp, adv, passed, slope, guide_coef):
    from calibrl.losses import calibrl_loss, policy_loss

    lp = logp.clone().requires_grad_()
    mask = torch.ones_like(lp, dtype=torch.bool)
    g_cal, = torch.autograd.grad(calibrl_loss(lp, logp, expert_logp, adv, mask, passed, slope=slope,
                                              guide_coef=guide_coef)[0], lp)
    g_pg, = torch.autograd.grad(policy_loss(lp, logp, adv, mask)[0], lp)
    ok = g_pg.abs() > 0
    return torch.where(ok, g_cal / torch.where(ok, g_pg, 1.0), float("nan"))  # NaN: A = 0, no gradient to scale


def _ref_aligned(expert_old_logp, expert_mask, row_prompt, T):
    from calibrl.losses import expert_baseline

    return expert_baseline(expert_old_logp, T, expert_mask)[row_prompt]


def _ref_band(a, b):
    from calibrl.stats import paired_diff

    d = paired_diff(dict(enumerate(a)), dict(enumerate(b)))
    return d["lo"] > 0 or d["hi"] < 0


def _ref_paired_mean(arm, base):
    from calibrl.stats import paired_diff

    return torch.tensor(paired_diff(arm, base)["mean"], dtype=torch.float64)


def _draw_seed_dicts(rng: random.Random):
    """Per-seed values {seed: value or None} of an arm and the baseline whose finished seeds only partly overlap
    (a partial sweep), with a shared seed effect: the paired mean differs from the difference of the two means."""
    seeds = list(range(rng.randint(6, 10)))
    effect = {s: rng.gauss(0.4, 0.15) for s in seeds}
    delta = rng.uniform(0.03, 0.1) * rng.choice((-1, 1))
    arm = {s: effect[s] + delta + rng.gauss(0, 0.01) for s in seeds if rng.random() < 0.8}
    base = {s: effect[s] + rng.gauss(0, 0.01) for s in seeds if rng.random() < 0.8}
    for d in (arm, base):  # an unfinished seed
        d[seeds[-1] + 1 + len(d) % 2] = None
    common = set(arm) & set(base)
    if len([s for s in common if arm[s] is not None and base[s] is not None]) < 2 or set(arm) == set(base):
        return _draw_seed_dicts(rng)
    return arm, base


def _ref_unformatted(gold):
    from calibrl.rewards import score

    return lambda got: isinstance(got, str) and (lambda s: s["acc"] == 1.0 and s["fmt"] == 0.0)(score(got, gold))


# ------------------------------------------------------------------------------------------------ draws
def _draw_seed_sets(rng: random.Random):
    """Per-seed values of two arms (same seeds, same order) in one of three cases chosen at random: the paired
    difference's 95% t-interval excludes 0 while the two arms' own intervals overlap (seed-to-seed variation shared
    by both arms); both exclude; neither. Never close to a boundary."""
    from calibrl.stats import mean_ci

    case = rng.choice(("paired-only", "both", "neither"))
    for _ in range(10_000):
        n = rng.randint(3, 6)
        seed_sd, noise = rng.uniform(0.0, 0.1), rng.uniform(0.003, 0.03)
        delta = rng.choice((-1, 1)) * rng.uniform(0.0, 8.0) * noise
        base = [rng.gauss(0.35, seed_sd) for _ in range(n)]
        a = [x + rng.gauss(0, noise) for x in base]
        b = [x + delta + rng.gauss(0, noise) for x in base]
        d, ca, cb = mean_ci([x - y for x, y in zip(a, b)]), mean_ci(a), mean_ci(b)
        paired = abs(d["mean"]) - d["half"]
        unpaired = abs(ca["mean"] - cb["mean"]) - (ca["half"] + cb["half"])
        if abs(paired) < 0.05 * d["half"] or abs(unpaired) < 0.05 * (ca["half"] + cb["half"]):
            continue  # never near a boundary
        got = ("both" if unpaired > 0 else "paired-only") if paired > 0 else "neither"
        if got == case:
            return a, b
    return a, b


def _draw_aligned(rng: random.Random):
    g = _gen(rng)
    p, gsize, te, t = rng.randint(2, 4), rng.randint(2, 5), rng.randint(3, 9), rng.randint(3, 9)
    lens = torch.randint(1, te + 1, (p,), generator=g)
    emask = torch.arange(te)[None, :] < lens[:, None]
    e = torch.where(emask, -torch.rand(p, te, generator=g) * 8 - 0.1, -20.0)  # pads hold junk
    return e, emask, torch.arange(p).repeat_interleave(gsize), t


def _draw_cfg(rng: random.Random):
    from calibrl.config import TrainConfig

    minibatches, grad_accum = rng.choice((1, 2, 4)), rng.choice((2, 3, 4))
    # whole-prompt micro-batches: each mini-batch holds at least grad_accum prompts
    return (TrainConfig.from_budget("smoke", prompts_per_step=minibatches * grad_accum * rng.choice((1, 2)),
                                    ppo_epochs=rng.randint(1, 3), minibatches=minibatches, grad_accum=grad_accum),)


def _draw_completion(rng: random.Random):
    words = ["red", "green", "blue", "yellow", "3", "7", "purple"]
    parts = []
    for _ in range(rng.randint(1, 3)):
        parts.append(rng.choice(["<think> maybe <answer>{}</answer> </think>", "<answer> {} </answer>",
                                 "<answer>{}</answer> then", "so <answer>  {}</answer>"]).format(rng.choice(words)))
    parts.append(f"<answer> {rng.choice(words)} </answer>" + rng.choice(["", " done", "."]))
    return ("".join(parts),)


def _b(rng, *keys, **kw):
    d = _batch(rng, **kw)
    return tuple(d[k] for k in keys)


def _ref_loss(logp, old_logp, adv, mask):
    from calibrl.losses import policy_loss

    return float(policy_loss(logp, old_logp, adv, mask)[0])


def _ref_guide(logp, expert_logp, adv, mask, passed, slope):
    from calibrl.losses import calibrl_loss

    return float(calibrl_loss(logp, logp, expert_logp, adv, mask, passed, slope=slope)[1]["guide_loss"])


def _ref_failed_below(logp, expert_logp, mask, passed):
    from calibrl.probes import gate_activation

    return gate_activation(logp, expert_logp, mask, passed)["gate_failed_below"]


def _ref_gate(logp, expert_logp, passed, slope):
    from calibrl.figures import gate_weights

    return torch.as_tensor(gate_weights(logp, expert_logp, passed, slope), dtype=torch.float32)


def _ref_group_adv(scale):
    def ref(rewards, groups):
        from calibrl.advantage import group_advantages

        return group_advantages(rewards, groups, scale=scale)
    return ref


def _ref_agg(loss_mat, mask):
    from calibrl.losses import aggregate

    return float(aggregate(loss_mat, mask, "seq-mean-token-mean"))


def _ref_extract(completion):
    from calibrl.rewards import extract_answer

    return extract_answer(completion)


def _ref_opt_steps(cfg):
    return cfg.opt_steps_per_rl_step


_SLOPE = lambda rng: rng.choice((0.2, 0.3, 0.5, 0.7, 0.8))


def _all() -> list[Exercise]:
    return [
        Exercise("00.passed", "Exercise 00: passed responses", "passed(rewards[N]) -> bool[N]",
                 "reward = acc + 0.1 * fmt takes the values 0, 0.1, 1.0 and 1.1; which of them mean a correct "
                 "answer (a correct answer with a broken format still passed)?",
                 lambda rng: (_groups(rng)[0],), lambda r: r > 0.1, "tensor"),
        Exercise("01.scaled_advantages", "Exercise 01: std-scaled group advantages",
                 "scaled_advantages(rewards[N], groups[N]) -> [N]",
                 "per group: subtract that group's mean, divide by that group's Bessel-corrected std (torch's "
                 "default, n - 1) plus 1e-6; rows of other groups must not enter",
                 lambda rng: _groups(rng), _ref_group_adv("group"), "tensor"),
        Exercise("01.clipped_surrogate", "Exercise 01b: the clipped surrogate",
                 "clipped_surrogate(logp[B,T], old_logp[B,T], adv[B], mask[B,T]) -> scalar",
                 "per token max(-A r, -A clip(r, 0.8, 1.2)); where A < 0 also min(., -3 A); then the mean over "
                 "real tokens only (padding holds junk log-probs)",
                 lambda rng: _b(rng, "logp", "old_logp", "adv", "mask", spread=2.0), _ref_loss, "scalar"),
        Exercise("02.gate_weight", "Exercise 02: gate weights", "gate_weight(logp, expert_logp, passed, slope) -> [B,T]",
                 "weight 1 on the side that still needs correcting: a passed row's token below the expert, a failed "
                 "row's token above it; the slope elsewhere. Use s = +1 / -1 by row",
                 lambda rng: _b(rng, "logp", "expert_logp", "passed", pads=False) + (_SLOPE(rng),), _ref_gate, "tensor"),
        Exercise("02.step_factor", "Exercise 02b: CalibRL = GRPO rescaled per token",
                 "step_factor(logp, expert_logp, adv, passed, slope, guide_coef) -> [B,T]",
                 "at ratio 1 the policy term's gradient on log pi is -A/N and the guidance term's is "
                 "-lambda s |A| w / N; divide one by the other. Look at rows where the sign of A is not s (an "
                 "all-fail group with mixed formatting)",
                 lambda rng: _b(rng, "logp", "expert_logp", "adv", "passed", pads=False) + (_SLOPE(rng),
                                                                                           rng.choice((0.1, 0.3, 0.5))),
                 _ref_step_factor, "tensor"),
        Exercise("03.aligned_baseline", "Exercise 03: the expert baseline e_t, aligned by index",
                 "aligned_baseline(expert_old_logp[P,Te], expert_mask[P,Te], row_prompt[N], T) -> [N,T]",
                 "row r compares with its prompt's expert (row_prompt[r]) at the same position t, with no shift; "
                 "past the expert's end (mask False, or t >= Te) the baseline is 0",
                 _draw_aligned, _ref_aligned, "tensor"),
        Exercise("04.correct_but_unformatted", "Exercise 04: correct but not well formatted",
                 "correct_but_unformatted(gold: str) -> str",
                 "the verifier reads the last <answer>...</answer>; the format needs <think>...</think> first",
                 lambda rng: (rng.choice(["red", "green", "blue", "yellow", "4", "12", "triangle"]),),
                 _ref_unformatted, "predicate"),
        Exercise("05.beyond_band", "Exercise 05: outside the seed band?",
                 "beyond_band(a: list, b: list) -> bool  (a[i], b[i]: the two arms' values at seed i)",
                 "pair the arms by seed (same seed = same prompts and start), take the differences a[i] - b[i] and "
                 "their 95% t-interval (mean +- t(n-1) * sd / sqrt(n), sd with n - 1; calibrl.stats.mean_ci): "
                 "is 0 outside it? Which mean is larger is not the question",
                 _draw_seed_sets, _ref_band, "bool", trials=18),
        Exercise("06.paired_mean", "Exercise 06: the paired difference of a partial sweep",
                 "paired_mean(arm: dict, base: dict) -> float  ({seed: value, or None for an unfinished run})",
                 "pair by seed: only seeds finished (not None) in BOTH arms count; average arm[s] - base[s] over them "
                 "(calibrl.stats.paired_diff). The difference of the two arms' own means mixes different seeds",
                 _draw_seed_dicts, _ref_paired_mean, "scalar"),
        Exercise("07.advantages", "Exercise 07.1: group advantages", "advantages(rewards[N], groups[N]) -> [N]",
                 "A = r - the mean reward of the row's own group (sum / group size), no std scaling",
                 lambda rng: _groups(rng), _ref_group_adv("none"), "tensor"),
        Exercise("07.seq_mean_token_mean", "Exercise 07.2: seq-mean-token-mean",
                 "seq_mean_token_mean(loss_mat[B,T], mask[B,T]) -> scalar",
                 "average each row over its real tokens only, then average the rows",
                 lambda rng: _draw_agg(rng), _ref_agg, "scalar"),
        Exercise("07.guide_loss", "Exercise 07.3: the guidance loss",
                 "guide_loss(logp, expert_logp, adv, mask, passed, slope) -> scalar",
                 "token-mean over real tokens of |A| * LeakyReLU(-s (logp - e), slope), s = +1 passed / -1 failed; "
                 "before the 0.1 factor",
                 lambda rng: _b(rng, "logp", "expert_logp", "adv", "mask", "passed") + (_SLOPE(rng),), _ref_guide,
                 "scalar"),
        Exercise("07.gate_failed_below", "Exercise 07.4: a gate fraction",
                 "gate_failed_below(logp, expert_logp, mask, passed) -> float",
                 "among failed rows' real tokens only (padding and passed rows do not count), the share with logp below e",
                 lambda rng: _b(rng, "logp", "expert_logp", "mask", "passed"), _ref_failed_below, "scalar"),
        Exercise("07.extract_answer", "Exercise 07.5: what the verifier extracts", "extract_last_answer(text) -> str",
                 "the last closed <answer>...</answer> wins, wherever it is; strip the spaces",
                 _draw_completion, _ref_extract, "str"),
        Exercise("08.opt_steps", "Exercise 08: optimizer steps per RL step", "opt_steps(cfg: TrainConfig) -> int",
                 "one optimizer step per mini-batch per PPO epoch; gradient accumulation splits a mini-batch into "
                 "micro-batches without adding optimizer steps", _draw_cfg, _ref_opt_steps, "int"),
        Exercise("09.predicted_step", "Exercise 09: the step CalibRL adds", "predicted_step(p, q, slope, guide_coef) -> "
                 "(passed_factor, failed_factor)",
                 "p: share of passed tokens on the weight-1 side, q: the same for failed tokens; the others get the "
                 "slope. Each token's gradient is GRPO's times 1 + lambda * w: average w over the two sides",
                 lambda rng: (rng.uniform(0, 1), rng.uniform(0, 1), _SLOPE(rng), rng.choice((0.1, 0.3, 0.5))),
                 lambda p, q, a, c: torch.tensor([1 + c * (p + (1 - p) * a), 1 + c * (q + (1 - q) * a)]), "tensor"),
    ]


def _draw_agg(rng: random.Random):
    mask = _b(rng, "mask")[0]
    return torch.randn(mask.shape, generator=_gen(rng)), mask


EXERCISES: dict[str, Exercise] = {e.name: e for e in _all()}
"""Every checked exercise by name ("<notebook>.<what>")."""
