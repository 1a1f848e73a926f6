"""Group (GRPO / Dr. GRPO), RLOO and batch-normalised advantages: hand values + Python loops."""

from __future__ import annotations

import statistics

import pytest
import torch

from posttrain.rl.advantages import (
    batch_normalize,
    group_advantages,
    rloo_advantages,
    zero_variance_groups,
)

F64 = torch.float64
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]], dtype=F64)


def test_group_advantages_hand_values_unbiased_std():
    """Row 0 [1,0,0,1]: mean 0.5, deviations +-0.5, unbiased var = 1/3, std = 0.5773503,
        A = +-0.5 / 0.5773503 = +-0.8660254  (the population std 0.5 would give +-1).
    Row 1 all ones: zero variance -> exactly 0.
    Row 2 [0,0,0,1]: mean 0.25, sum of squares 3(0.0625) + 0.5625 = 0.75, var 0.25, std 0.5,
        A = [-0.5, -0.5, -0.5, 1.5].
    eps = 1e-6 is added to the std; tolerance 1e-5 covers it."""
    adv = group_advantages(REWARDS)
    k = 0.5 / (1.0 / 3.0) ** 0.5
    expected = torch.tensor([[k, -k, -k, k], [0, 0, 0, 0], [-0.5, -0.5, -0.5, 1.5]], dtype=F64)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4, dtype=F64))


def test_group_advantages_dr_grpo_centering_only():
    """scale='none': R - mean. Row 0 -> [0.5, -0.5, -0.5, 0.5]; row 2 -> [-0.25]*3 + [0.75]."""
    adv = group_advantages(REWARDS, scale="none")
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.25, -0.25, -0.25, 0.75]], dtype=F64)
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)


def _loop_group(rewards, scale, eps):
    out = []
    for row in rewards:
        mean = sum(row) / len(row)
        if max(row) == min(row):
            out.append([0.0] * len(row))
        elif scale == "std":
            std = statistics.stdev(row)  # N - 1
            out.append([(r - mean) / (std + eps) for r in row])
        else:
            out.append([r - mean for r in row])
    return out


def _loop_rloo(rewards):
    out = []
    for row in rewards:
        out.append([row[i] - sum(row[j] for j in range(len(row)) if j != i) / (len(row) - 1) for i in range(len(row))])
    return out


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_match_python_loop(scale):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 5, generator=gen, dtype=F64)
    rewards[3] = 0.25  # one flat group
    got = group_advantages(rewards, scale=scale, eps=1e-4)
    want = torch.tensor(_loop_group(rewards.tolist(), scale, 1e-4), dtype=F64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_flat_group_is_exactly_zero_in_fp32():
    """fp32 mean([0.3] * 16) misses 0.3 by ~3e-8 and the std is ~3e-8 too, so the naive
    (r - mean) / (std + 1e-6) gives ~0.03, not 0. The group must give exactly 0."""
    rewards = torch.full((2, 16), 0.3, dtype=torch.float32)
    naive = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-6)
    assert naive.abs().max().item() > 1e-3  # the trap is real on this platform
    assert torch.equal(group_advantages(rewards), torch.zeros_like(rewards))
    assert torch.equal(rloo_advantages(rewards), torch.zeros_like(rewards))


def test_rloo_hand_values_and_loop():
    """Row 0 [1,0,0,1]: for a 1 the others average 1/3 -> 2/3; for a 0 they average 2/3 -> -2/3.
    (= G/(G-1) (r - mean) = 4/3 * 0.5.) Row 2 [0,0,0,1]: zeros get 0 - 1/3, the one gets 1 - 0."""
    adv = rloo_advantages(REWARDS)
    t = 2.0 / 3.0
    expected = torch.tensor([[t, -t, -t, t], [0, 0, 0, 0], [-1 / 3, -1 / 3, -1 / 3, 1.0]], dtype=F64)
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(
        rloo_advantages(rewards), torch.tensor(_loop_rloo(rewards.tolist()), dtype=F64), atol=1e-12, rtol=0
    )


def test_integer_rewards_and_group_size_checks():
    torch.testing.assert_close(
        group_advantages(REWARDS.long(), scale="none"), group_advantages(REWARDS, scale="none").float()
    )
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="G >= 2"):
        rloo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"\(P, G\)"):
        group_advantages(torch.ones(6))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(REWARDS, scale="batch")


def test_zero_variance_groups():
    """Rows: mixed, all 1, mixed, all 0 -> [False, True, False, True]."""
    rewards = torch.cat([REWARDS, torch.zeros(1, 4, dtype=F64)])
    assert zero_variance_groups(rewards).tolist() == [False, True, False, True]


def test_batch_normalize_hand_values():
    """[1,2,3,4]: mean 2.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3, std = 1.2909944,
    A = [-1.5, -0.5, 0.5, 1.5] / 1.2909944 = [-1.1618950, -0.3872983, 0.3872983, 1.1618950]."""
    got = batch_normalize(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64))
    std = (5.0 / 3.0) ** 0.5
    expected = torch.tensor([[-1.5, -0.5], [0.5, 1.5]], dtype=F64) / std
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_batch_normalize_with_mask_matches_loop():
    """Masked (padding) entries hold 1e3 and must not enter mean or std; output 0 there."""
    gen = torch.Generator().manual_seed(2)
    adv = torch.randn(4, 6, generator=gen, dtype=F64)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    adv = torch.where(mask, adv, torch.full_like(adv, 1e3))
    got = batch_normalize(adv, eps=1e-8, mask=mask)

    values = [adv[i, t].item() for i in range(4) for t in range(6) if mask[i, t]]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    for i in range(4):
        for t in range(6):
            want = (adv[i, t].item() - mean) / (std + 1e-8) if mask[i, t] else 0.0
            assert got[i, t].item() == pytest.approx(want, abs=1e-12)


def test_batch_normalize_constant_batch_is_zero():
    assert torch.equal(batch_normalize(torch.full((3, 4), 0.3)), torch.zeros(3, 4))
    assert torch.equal(batch_normalize(torch.ones(2, 2), mask=torch.zeros(2, 2)), torch.zeros(2, 2))


def test_excluded_samples_leave_the_group_baseline_and_get_zero_advantage():
    from posttrain.rl.advantages import group_advantages

    nan = float("nan")
    r = torch.tensor([[1.0, 0.0, nan, 1.0], [0.5, nan, nan, 0.5], [1.0, 0.0, 0.0, 0.0]])
    valid = ~torch.isnan(r)
    for scale in ("std", "none"):
        adv = group_advantages(r, scale=scale, valid_PG=valid)
        # row 0: a slow reference over the valid samples only
        v = torch.tensor([1.0, 0.0, 1.0])
        want = v - v.mean()
        if scale == "std":
            want = want / (v.std() + 1e-6)
        assert torch.allclose(adv[0, [0, 1, 3]], want) and adv[0, 2] == 0
        assert (adv[1] == 0).all()  # the valid rewards are equal: no signal
        assert torch.allclose(adv[2], group_advantages(r[2:], scale=scale)[0])  # nothing excluded: unchanged
        assert not torch.isnan(adv).any()
