"""Group advantages, pass masks and group statistics: hand-computed values and invariants."""
import math

import pytest
import torch

from calibrl.advantage import group_advantages, group_stats, pass_mask


def test_dr_grpo_advantage_is_reward_minus_group_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.1, 0.1])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    torch.testing.assert_close(group_advantages(r, g), torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, -0.5]))


def test_group_scale_uses_bessel_std_plus_eps():
    # verl's known case: [1,0,0,1 | 1,1,0,0] -> +-0.86602 (std = sqrt(1/3) with Bessel)
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = group_advantages(r, g, scale="group", eps=1e-6)
    want = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(a, torch.tensor([want, -want, -want, want, want, want, -want, -want]))
    a4 = group_advantages(r, g, scale="group", eps=1e-4)  # TRL's eps
    assert abs(float(a4[0]) - 0.5 / (math.sqrt(1 / 3) + 1e-4)) < 1e-6


def test_singleton_group_has_mean_zero_std_one():
    r = torch.tensor([0.7, 1.0, 0.0])
    g = torch.tensor([9, 2, 2])
    assert float(group_advantages(r, g)[0]) == pytest.approx(0.7)
    assert float(group_advantages(r, g, scale="group", eps=1e-6)[0]) == pytest.approx(0.7 / (1 + 1e-6))


def test_uniform_group_gives_zero_and_no_nan():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    a = group_advantages(r, g, scale="group")
    assert torch.equal(a, torch.zeros(5))


def test_non_contiguous_group_ids_and_order_do_not_matter():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([7, 3, 7, 3, 7])
    a = group_advantages(r, g)
    torch.testing.assert_close(a, torch.tensor([1 / 3, -0.5, -2 / 3, 0.5, 1 / 3]))
    perm = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(group_advantages(r[perm], g[perm]), a[perm])


def test_off_policy_rows_are_excluded_from_group_statistics():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])  # last row: the expert
    g = torch.tensor([0, 0, 0, 0])
    on = torch.tensor([True, True, True, False])
    a = group_advantages(r, g, on_policy=on)
    torch.testing.assert_close(a, torch.tensor([2 / 3, -1 / 3, -1 / 3, 2 / 3]))


def test_int_rewards_and_dtype_kept():
    a = group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert a.dtype == torch.float32 and a.tolist() == [0.5, -0.5]
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0])).dtype == torch.float64


def test_pass_mask_threshold_is_strict():
    r = torch.tensor([0.0, 0.1, 1.0, 1.1, 0.10001])
    assert pass_mask(r).tolist() == [False, False, True, True, True]
    assert pass_mask(r, threshold=1.0).tolist() == [False, False, False, True, False]


def test_group_stats_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.1, 0.0, 0.1])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    s = group_stats(r, g, pass_mask(r))
    torch.testing.assert_close(s["pass_rate"], torch.tensor([0.5, 0.0, 1.0, 0.0]))
    assert s["uniform"].tolist() == [False, True, True, False]
    assert s["uniform_frac"] == 0.5 and s["all_pass_frac"] == 0.25 and s["all_fail_frac"] == 0.5
    # |A|: group0 0.5,0.5; group1 0,0; group2 0,0; group3 mean 0.2/3 -> |0.1-0.0667|*2 + 0.0667
    g3 = [abs(0.1 - 0.2 / 3), 0.2 / 3, abs(0.1 - 0.2 / 3)]
    assert s["abs_adv_mean"] == pytest.approx((1.0 + sum(g3)) / 9)
    assert all(isinstance(s[k], float) for k in ("uniform_frac", "all_pass_frac", "all_fail_frac", "abs_adv_mean"))


def test_eps_must_be_positive_and_uniform_groups_are_exactly_zero():
    r, gid = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    for eps in (0.0, -1e-6):
        with pytest.raises(ValueError, match=r"^eps: expected a value > 0"):
            group_advantages(r, gid, scale="group", eps=eps)
    # the float64 mean of three 0.1 is 0.10000000000000002: (r - mean) / eps was -1.4e-11 before, not 0
    assert group_advantages(r, gid, scale="group").tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(r, gid, scale="group", eps=1e-300).tolist() == [0.0, 0.0, 0.0]


def test_half_and_grad_rewards_are_upcast_and_detached():
    r = torch.tensor([1.0, 0.0, 0.1], dtype=torch.bfloat16).requires_grad_()
    a = group_advantages(r, torch.zeros(3, dtype=torch.long))
    assert a.dtype == torch.float32 and not a.requires_grad
    torch.testing.assert_close(a, torch.tensor([1.0, 0.0, 0.10009765625]) - (1.10009765625 / 3))
    with pytest.raises(ValueError, match=r"^group_ids: expected device cpu"):
        group_advantages(r, torch.zeros(3, dtype=torch.long, device="meta"))
