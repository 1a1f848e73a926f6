"""Truncated / masked importance sampling for the rollout-trainer mismatch (losses/importance.py),
against hand-computed vectors.

Row 0: old = [-1, -2, -0.5, pad], rollout = [-1.5, -1, -0.5, pad], 3 loss tokens:
    log rho_t = [0.5, -1, 0]          rho_t = [e^0.5, e^-1, 1] = [1.648721, 0.367879, 1]
    sequence: log rho = -0.5           rho = e^-0.5 = 0.606531 on every loss token
Row 1: old = [-0.2, -0.2, pad, pad], rollout = [-1.2, -0.7, ...], 2 loss tokens:
    log rho_t = [1, 0.5]              rho_t = [2.718282, 1.648721]
    sequence: log rho = 1.5            rho = e^1.5 = 4.481689
"""

import math

import pytest
import torch

from posttrain.losses.importance import mismatch_stats, rollout_is_weights

OLD = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.2, -0.2, 0.0, 0.0]])
ROLL = torch.tensor([[-1.5, -1.0, -0.5, -3.0], [-1.2, -0.7, -9.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
E = math.e


def _close(a, b):
    assert torch.allclose(a, torch.tensor(b, dtype=a.dtype), atol=1e-6), (a, b)


def test_token_truncate():
    w = rollout_is_weights(OLD, ROLL, MASK, mode="truncate", level="token", cap=2.0)
    _close(w.ratio_BT, [[E**0.5, E**-1, 1.0, 0.0], [E, E**0.5, 0.0, 0.0]])
    _close(w.weights_BT, [[E**0.5, E**-1, 1.0, 0.0], [2.0, E**0.5, 0.0, 0.0]])
    _close(w.clipped_BT, [[0, 0, 0, 0], [1, 0, 0, 0]])
    # A smaller cap truncates row 0's first token as well.
    w = rollout_is_weights(OLD, ROLL, MASK, cap=1.5)
    _close(w.weights_BT, [[1.5, E**-1, 1.0, 0.0], [1.5, 1.5, 0.0, 0.0]])


def test_token_mask():
    w = rollout_is_weights(OLD, ROLL, MASK, mode="mask", level="token", cap=2.0, cap_low=0.5)
    # Kept tokens keep their ratio (IcePop); tokens outside [0.5, 2] get weight 0.
    _close(w.weights_BT, [[E**0.5, 0.0, 1.0, 0.0], [0.0, E**0.5, 0.0, 0.0]])
    _close(w.clipped_BT, [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_sequence_truncate_and_mask():
    w = rollout_is_weights(OLD, ROLL, MASK, mode="truncate", level="sequence", cap=2.0)
    s0 = E**-0.5
    _close(w.ratio_BT, [[s0, s0, s0, 0.0], [E**1.5, E**1.5, 0.0, 0.0]])
    _close(w.weights_BT, [[s0, s0, s0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    _close(w.clipped_BT, [[0, 0, 0, 0], [1, 1, 0, 0]])
    w = rollout_is_weights(OLD, ROLL, MASK, mode="mask", level="sequence", cap=5.0, cap_low=0.7)
    # Row 0's product 0.607 < 0.7: the whole sequence is masked; row 1's 4.48 is kept as is.
    _close(w.weights_BT, [[0.0, 0.0, 0.0, 0.0], [E**1.5, E**1.5, 0.0, 0.0]])
    _close(w.clipped_BT, [[1, 1, 1, 0], [0, 0, 0, 0]])


def test_padding_never_counts():
    """Values at masked positions (here a log-ratio of 6) change nothing, even for sequence level."""
    roll = ROLL.clone()
    roll[0, 3] = -6.0
    for level in ("token", "sequence"):
        a = rollout_is_weights(OLD, ROLL, MASK, level=level)
        b = rollout_is_weights(OLD, roll, MASK, level=level)
        assert torch.equal(a.weights_BT, b.weights_BT)


def test_weights_are_constants():
    old = OLD.clone().requires_grad_(True)
    roll = ROLL.clone().requires_grad_(True)
    w = rollout_is_weights(old, roll, MASK, level="sequence")
    assert not w.weights_BT.requires_grad
    # Multiplied into a loss, the gradient flows only through the loss term, scaled by w.
    logps = OLD.clone().requires_grad_(True)
    (w.weights_BT * logps).sum().backward()
    assert torch.allclose(logps.grad, w.weights_BT)


def test_equal_logprobs_give_weight_one():
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            w = rollout_is_weights(OLD, OLD, MASK, mode=mode, level=level, cap=2.0, cap_low=0.5)
            assert torch.equal(w.weights_BT, MASK)


def test_huge_log_ratio_stays_finite():
    w = rollout_is_weights(
        torch.tensor([[0.0, 0.0]]), torch.tensor([[-80.0, -80.0]]), torch.ones(1, 2), level="sequence", cap=3.0
    )
    _close(w.weights_BT, [[3.0, 3.0]])
    assert torch.isfinite(w.ratio_BT).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="cap"):
        rollout_is_weights(OLD, ROLL, MASK, cap=0.0)
    with pytest.raises(ValueError, match="cap_low"):
        rollout_is_weights(OLD, ROLL, MASK, mode="mask", cap=1.0, cap_low=1.0)
    with pytest.raises(ValueError, match="mode"):
        rollout_is_weights(OLD, ROLL, MASK, mode="clip")


def test_mismatch_stats():
    s = mismatch_stats(OLD[:1], ROLL[:1], MASK[:1])
    # d = [0.5, -1, 0]: mean |d| 0.5, max 1, k3 = mean(e^d - 1 - d) = (0.148721 + 0.367879 + 0) / 3
    assert s["abs_diff_mean"] == pytest.approx(0.5)
    assert s["abs_diff_max"] == pytest.approx(1.0)
    assert s["k3"] == pytest.approx((E**0.5 - 1.5 + E**-1) / 3, abs=1e-7)
    assert mismatch_stats(OLD, ROLL, torch.zeros_like(MASK)) == {"abs_diff_mean": 0.0, "abs_diff_max": 0.0, "k3": 0.0}
