"""Reference solutions of the course exercises, written the way a learner would (plain tensor code, no calibrl
imports), so the checkers' library references test them independently.

A notebook applies these only when the environment asks for it (CALIBRL_SOLUTIONS=1, set by CI): a learner's cell
starts as `None` and the checker then says "skipped". Read them after you have tried.
"""
from __future__ import annotations

import math

import torch


def passed(rewards):
    """00: a response passes when its answer is correct; reward = acc + 0.1*fmt, so reward > 0.1."""
    return rewards > 0.1


def scaled_advantages(rewards, groups):
    """01: (r - group mean) / (group std, Bessel-corrected, + 1e-6)."""
    out = torch.empty_like(rewards)
    for g in groups.unique():
        r = rewards[groups == g]
        out[groups == g] = (r - r.mean()) / (r.std() + 1e-6)
    return out


def clipped_surrogate(logp, old_logp, adv, mask):
    """01: dual-clip PPO loss, eps 0.2, c 3, token-mean over real tokens."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].expand_as(ratio)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    loss = torch.where(a < 0, torch.minimum(loss, -a * 3.0), loss)
    return torch.where(mask, loss, 0.0).sum() / mask.sum()


def gate_weight(logp, expert_logp, passed, slope):
    """02: 1 on the side to correct (passed: logp < e; failed: logp > e), slope otherwise."""
    s = torch.where(passed, 1.0, -1.0)[:, None]
    return torch.where(s * (logp - expert_logp) < 0, 1.0, slope)


def step_factor(logp, expert_logp, adv, passed, slope, guide_coef):
    """02: at ratio 1 CalibRL's gradient on log pi(y_t) is GRPO's times 1 + lambda * w * s * sign(A)
    (= 1 + lambda*w whenever the sign of A agrees with pass/fail; the format bonus can make them disagree)."""
    s = torch.where(passed, 1.0, -1.0)[:, None]
    w = torch.where(s * (logp - expert_logp) < 0, 1.0, slope)
    return 1 + guide_coef * w * s * torch.sign(adv)[:, None]


def aligned_baseline(expert_old_logp, expert_mask, row_prompt, T):
    """03: e_t for every on-policy row: its prompt's expert log-prob at the same index t, 0 past the expert's end."""
    e = torch.where(expert_mask, expert_old_logp, 0.0)
    if e.shape[1] < T:
        e = torch.cat([e, torch.zeros(e.shape[0], T - e.shape[1])], 1)
    return e[:, :T][row_prompt]


def correct_but_unformatted(gold):
    """04: the right answer in <answer> tags, but no <think> block: acc 1, fmt 0."""
    return f"<answer>{gold}</answer>"


def beyond_band(a, b):
    """05: True when the 95% t-interval of the paired differences a[i] - b[i] (same seed i) excludes 0."""
    t975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    d = [x - y for x, y in zip(a, b)]
    n, m = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    half = t975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return m - half > 0 or m + half < 0


def paired_mean(arm, base):
    """06: mean of arm[s] - base[s] over the seeds finished in both."""
    d = [arm[s] - base[s] for s in arm if s in base and arm[s] is not None and base[s] is not None]
    return sum(d) / len(d)


def advantages(rewards, groups):
    """07: A = r - mean reward of the row's group."""
    means = torch.stack([rewards[groups == g].mean() for g in groups])
    return rewards - means


def seq_mean_token_mean(loss_mat, mask):
    """07: mean over each row's real tokens, then mean over rows."""
    m = mask.float()
    return ((loss_mat * m).sum(1) / m.sum(1)).mean()


def guide_loss(logp, expert_logp, adv, mask, passed, slope):
    """07: token-mean of |A| * LeakyReLU(-s (logp - e), slope) over real tokens (before the 0.1 factor)."""
    s = torch.where(passed, 1.0, -1.0)[:, None]
    x = -s * (logp - expert_logp)
    term = adv.abs()[:, None] * torch.where(x >= 0, x, slope * x)
    return torch.where(mask, term, 0.0).sum() / mask.sum()


def gate_failed_below(logp, expert_logp, mask, passed):
    """07: share of failed rows' real tokens with logp < e (the slope side for a failed row)."""
    failed = mask & ~passed[:, None]
    return float(((logp < expert_logp) & failed).sum() / failed.sum())


def extract_last_answer(completion):
    """07: the content of the last <answer>...</answer>, stripped."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end)
    return completion[start + len("<answer>"):end].strip()


def opt_steps(cfg):
    """08: one optimizer step per mini-batch and epoch; gradient accumulation splits a mini-batch, it adds none."""
    return cfg.ppo_epochs * cfg.minibatches


def predicted_step(p, q, slope, guide_coef):
    """09: mean factor 1 + lambda * w with w = 1 on a share p (passed) / q (failed) of tokens and the slope elsewhere."""
    return 1 + guide_coef * (p + (1 - p) * slope), 1 + guide_coef * (q + (1 - q) * slope)
