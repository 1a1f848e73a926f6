"""The RLHF pieces on hand-derived vectors: Bradley-Terry, the clipped value loss, per-token rewards
and GAE (checked against an independent slow loop too)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.reward_model import bradley_terry_loss
from posttrain.losses.value import clipped_value_loss, explained_variance
from posttrain.rl.advantages import gae, per_token_rewards

F64 = torch.float64


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_values_and_gradients_by_hand():
    """r_c = [2, 0], r_r = [1, 1], margin = [0.5, 0]: shifted differences [0.5, -1].
    loss = softplus(-shifted) = [log(1 + e^-0.5), log(1 + e)];
    d loss / d r_c = -sigma(-shifted) = [-sigma(-0.5), -sigma(1)], d loss / d r_r = the opposite."""
    rc = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    rr = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    t = bradley_terry_loss(rc, rr, margin_B=torch.tensor([0.5, 0.0]))
    assert t.loss_B.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.e)], abs=1e-12)
    assert t.margin_B.tolist() == [1.0, -1.0] and not t.margin_B.requires_grad
    t.loss_B.sum().backward()
    assert rc.grad.tolist() == pytest.approx([-_sig(-0.5), -_sig(1.0)], abs=1e-12)
    assert rr.grad.tolist() == pytest.approx([_sig(-0.5), _sig(1.0)], abs=1e-12)


def test_bradley_terry_centring_term_by_hand():
    """c = 0.1 adds c (r_c + r_r)^2 = [0.9, 0.1] and 2c (r_c + r_r) = [0.6, 0.2] to both gradients."""
    rc = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    rr = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    t = bradley_terry_loss(rc, rr, center_coef=0.1)
    base = [math.log(1 + math.exp(-1.0)), math.log(1 + math.e)]
    assert t.loss_B.tolist() == pytest.approx([base[0] + 0.9, base[1] + 0.1], abs=1e-12)
    t.loss_B.sum().backward()
    assert rc.grad.tolist() == pytest.approx([-_sig(-1.0) + 0.6, -_sig(1.0) + 0.2], abs=1e-12)
    assert rr.grad.tolist() == pytest.approx([_sig(-1.0) + 0.6, _sig(1.0) + 0.2], abs=1e-12)


def test_bradley_terry_is_finite_far_out():
    t = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))
    assert t.loss_B.item() == pytest.approx(100.0)


def test_clipped_value_loss_by_hand():
    """eps_v = 0.2, V_old = 0.5 so the clip range is [0.3, 0.7].
    V    G    (V-G)^2  clip(V)  (clip-G)^2  loss = max/2  dL/dV        clipped binds
    1.0  1.2  0.04     0.7      0.25        0.125         0 (clipped)   yes
    0.0  1.0  1.00     0.3      0.49        0.5           V-G = -1      no
    2.0  0.0  4.00     0.7      0.49        2.0           V-G = 2       no"""
    v = torch.tensor([[1.0, 0.0, 2.0]], dtype=F64, requires_grad=True)
    old = torch.full((1, 3), 0.5, dtype=F64)
    ret = torch.tensor([[1.2, 1.0, 0.0]], dtype=F64)
    t = clipped_value_loss(v, old, ret, clip=0.2)
    assert t.loss_BT[0].tolist() == pytest.approx([0.125, 0.5, 2.0], abs=1e-12)
    assert t.clipped_BT[0].tolist() == [1.0, 0.0, 0.0]
    t.loss_BT.sum().backward()
    assert v.grad[0].tolist() == pytest.approx([0.0, -1.0, 2.0], abs=1e-12)
    # no clip: plain 1/2 (V - G)^2
    plain = clipped_value_loss(v, old, ret, clip=None).loss_BT[0].tolist()
    assert plain == pytest.approx([0.02, 0.5, 2.0], abs=1e-12)


def test_per_token_rewards_by_hand():
    """beta = 0.5: -beta * KL on every valid token, the score added at the last valid one; an empty
    (masked) row gets nothing."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    r = per_token_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, beta=0.5)
    expected = [[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.allclose(r, torch.tensor(expected), atol=1e-7)


def test_gae_by_hand():
    """r = [0, 0, 1], V = [0.5, 0.2, 0.4], gamma = 1, lam = 0.5:
    t=2: delta = 1 - 0.4 = 0.6                      A = 0.6
    t=1: delta = 0 + 0.4 - 0.2 = 0.2                A = 0.2 + 0.5 * 0.6 = 0.5
    t=0: delta = 0 + 0.2 - 0.5 = -0.3               A = -0.3 + 0.5 * 0.5 = -0.05
    returns = A + V = [0.45, 0.7, 1.0]. The padded 4th position gets 0 and does not bootstrap."""
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=F64)
    v = torch.tensor([[0.5, 0.2, 0.4, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05, 0.5, 0.6, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 1.0, 0.0], abs=1e-12)
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    assert adv[0, :3].tolist() == pytest.approx([0.5, 0.8, 0.6], abs=1e-12)
    assert ret[0, :3].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def _slow_gae(r, v, mask, gamma, lam):
    """One sequence at a time over its valid positions only."""
    adv = torch.zeros_like(r)
    for n in range(r.shape[0]):
        idx = [t for t in range(r.shape[1]) if mask[n, t]]
        a_next = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            v_next = v[n, idx[j + 1]].item() if j + 1 < len(idx) else 0.0
            a_next = r[n, t].item() + gamma * v_next - v[n, t].item() + gamma * lam * a_next
            adv[n, t] = a_next
    return adv, torch.where(mask.bool(), adv + v, torch.zeros_like(adv))


def test_gae_matches_a_slow_loop_with_gaps_and_empty_rows():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(5, 7, generator=g, dtype=F64), torch.randn(5, 7, generator=g, dtype=F64)
    mask = (torch.rand(5, 7, generator=g) > 0.3).long()
    mask[2] = 0
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    adv_ref, ret_ref = _slow_gae(r, v, mask, 0.9, 0.8)
    assert torch.allclose(adv, adv_ref, atol=1e-12) and torch.allclose(ret, ret_ref, atol=1e-12)


def test_explained_variance():
    g = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(g, g, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(g, 2.0), g, mask) == pytest.approx(0.0)
    # V = G - [1, -1, 0]: Var[G - V] = 1, Var[G] = 1 -> 0
    assert explained_variance(g - torch.tensor([[1.0, -1.0, 0.0, 0.0]]), g, mask) == pytest.approx(0.0)
    assert explained_variance(-g, g, mask) == pytest.approx(1 - 4.0)


def test_explained_variance_of_returns_equal_but_for_rounding_is_zero():
    """Every reward the same: the returns are equal up to float32 noise (G = A + V recomputed per token), and
    the ratio of two tiny variances was logged as -6.8e12."""
    values = torch.tensor([[0.31, -0.72, 0.05, 0.9, 1.7, -2.3]], dtype=torch.float32)
    returns = (torch.full_like(values, 0.1) - values) + values  # 0.1 with rounding noise (variance ~2e-15)
    assert returns.double().var() > 0
    assert explained_variance(values, returns, torch.ones_like(values)) == 0.0
