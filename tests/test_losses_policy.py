"""PPO-clip (Clip-Higher, dual clip), GSPO, CISPO and the KL estimators, on hand-derived vectors.

Throughout, old_logps = 0 and logps = log r, so the ratio is r by construction, and
d loss / d logp = r * d loss / d r (because dr/dlogp = r).
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.aggregation import aggregate
from posttrain.losses.kl import kl_estimate
from posttrain.losses.policy import cispo_loss, gspo_loss, ppo_clip_loss

F64 = torch.float64


def _leaf(values):
    return torch.tensor(values, dtype=F64).log().reshape(1, -1).requires_grad_(True)


def _ppo(ratios, advs, **kw):
    logps = _leaf(ratios)
    old = torch.zeros_like(logps)
    adv = torch.tensor(advs, dtype=F64).reshape(1, -1)
    terms = ppo_clip_loss(logps, old, adv, **kw)
    terms.loss_BT.sum().backward()
    return terms, logps.grad[0]


def test_ppo_clip_hand_cases():
    """eps_low = 0.2, eps_high = 0.28, so clip range [0.8, 1.28]. Per token
    L = max(-A r, -A clip(r)); gradient w.r.t. logp is -A r when the unclipped term wins, else 0.

      r     A   -A r    -A clip(r)   L       active     dL/dlogp   flags
      1.1  +1   -1.1    -1.1        -1.1    both(=)    -1.1
      1.5  +1   -1.5    -1.28       -1.28   clipped     0          high
      0.5  +1   -0.5    -0.8        -0.5    unclipped  -0.5       (A>0 below range: not clipped)
      0.5  -1   +0.5    +0.8        +0.8    clipped     0          low
      1.5  -1   +1.5    +1.28       +1.5    unclipped  +1.5       (A<0 above range: not clipped)
      1.3   0    0       0           0                  0
    """
    terms, grad = _ppo([1.1, 1.5, 0.5, 0.5, 1.5, 1.3], [1, 1, 1, -1, -1, 0])
    expected_loss = [-1.1, -1.28, -0.5, 0.8, 1.5, 0.0]
    expected_grad = [-1.1, 0.0, -0.5, 0.0, 1.5, 0.0]
    torch.testing.assert_close(terms.loss_BT[0], torch.tensor(expected_loss, dtype=F64))
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=F64))
    assert terms.clipped_high_BT[0].tolist() == [0, 1, 0, 0, 0, 0]
    assert terms.clipped_low_BT[0].tolist() == [0, 0, 0, 1, 0, 0]
    torch.testing.assert_close(terms.ratio_BT[0], torch.tensor([1.1, 1.5, 0.5, 0.5, 1.5, 1.3], dtype=F64))
    assert not terms.ratio_BT.requires_grad and terms.dual_clipped_BT is None


def test_clip_higher_differs_from_symmetric_where_predicted():
    """r = 1.25, A = +1. Clip-Higher range [0.8, 1.28] contains 1.25: L = -1.25, grad -1.25.
    Symmetric [0.8, 1.2] clips it: L = -1.2, grad 0. For A = -1 and r = 0.7 both ranges share the
    lower bound 0.8, so both give L = 0.8, grad 0 (only the upper bound was decoupled)."""
    hi, hi_grad = _ppo([1.25, 0.7], [1, -1], eps_low=0.2, eps_high=0.28)
    sym, sym_grad = _ppo([1.25, 0.7], [1, -1], eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(hi.loss_BT[0], torch.tensor([-1.25, 0.8], dtype=F64))
    torch.testing.assert_close(sym.loss_BT[0], torch.tensor([-1.2, 0.8], dtype=F64))
    torch.testing.assert_close(hi_grad, torch.tensor([-1.25, 0.0], dtype=F64))
    torch.testing.assert_close(sym_grad, torch.tensor([0.0, 0.0], dtype=F64))
    assert hi.clipped_high_BT[0, 0] == 0 and sym.clipped_high_BT[0, 0] == 1


def test_dual_clip_caps_negative_advantage_loss():
    """c = 3. A = -1, r = 5: plain PPO L = max(5, 1.28) = 5 with grad -A r = 5; dual clip gives
    min(5, -cA = 3) = 3 with grad 0. A = -1, r = 2: min(2, 3) = 2, grad 2 (not capped).
    A = +1, r = 5: dual clip does not apply; L = max(-5, -1.28) = -1.28 (upper clip), grad 0."""
    plain, plain_grad = _ppo([5.0, 2.0, 5.0], [-1, -1, 1])
    dual, dual_grad = _ppo([5.0, 2.0, 5.0], [-1, -1, 1], dual_clip=3.0)
    torch.testing.assert_close(plain.loss_BT[0], torch.tensor([5.0, 2.0, -1.28], dtype=F64))
    torch.testing.assert_close(plain_grad, torch.tensor([5.0, 2.0, 0.0], dtype=F64))
    torch.testing.assert_close(dual.loss_BT[0], torch.tensor([3.0, 2.0, -1.28], dtype=F64))
    torch.testing.assert_close(dual_grad, torch.tensor([0.0, 2.0, 0.0], dtype=F64))
    assert dual.dual_clipped_BT[0].tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), dual_clip=1.0)


def _ppo_scalar_reference(r, a, eps_low, eps_high, c):
    """Textbook objective form, one token at a time: J = min(rA, clip(r)A), dual: max(J, cA)."""
    clipped = min(max(r, 1 - eps_low), 1 + eps_high)
    objective = min(r * a, clipped * a)
    if c is not None and a < 0:
        objective = max(objective, c * a)
    return -objective


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_matches_scalar_reference(dual_clip):
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 16, generator=gen, dtype=F64) * 0.8
    adv = torch.randn(4, 1, generator=gen, dtype=F64)
    terms = ppo_clip_loss(logps, torch.zeros_like(logps), adv, dual_clip=dual_clip)
    for i in range(4):
        for t in range(16):
            want = _ppo_scalar_reference(math.exp(logps[i, t].item()), adv[i, 0].item(), 0.2, 0.28, dual_clip)
            assert terms.loss_BT[i, t].item() == pytest.approx(want, abs=1e-12)


def test_advantages_broadcast_and_shape_check():
    """(B, 1) advantages equal the same values expanded to (B, T); a 1-D tensor is rejected
    because with B == T it would silently broadcast along tokens."""
    logps = torch.randn(3, 3, dtype=F64)
    old = logps + 0.1 * torch.randn(3, 3, dtype=F64)
    adv_B1 = torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64)
    a = ppo_clip_loss(logps, old, adv_B1).loss_BT
    b = ppo_clip_loss(logps, old, adv_B1.expand(3, 3)).loss_BT
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        ppo_clip_loss(logps, old, adv_B1[:, 0])


def test_on_policy_ratio_is_one_and_gradient_is_reinforce():
    """num_iterations = 1: old_logps = logps.detach(), so r = 1 exactly and every loss here has
    d L_t / d logp_t = -A_t (REINFORCE). Holds for PPO, GSPO and CISPO."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5, generator=gen, dtype=F64) - 2.0
    adv_B = torch.tensor([1.5, -0.7, 0.3], dtype=F64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    expected = -adv_B[:, None].expand(3, 5)
    for make in (
        lambda lp: ppo_clip_loss(lp, lp.detach(), adv_B[:, None]),
        lambda lp: ppo_clip_loss(lp, lp.detach(), adv_B[:, None], dual_clip=3.0),
        lambda lp: gspo_loss(lp, lp.detach(), adv_B, mask),
        lambda lp: cispo_loss(lp, lp.detach(), adv_B[:, None]),
    ):
        logps = base.clone().requires_grad_(True)
        terms = make(logps)
        assert torch.equal(terms.ratio_BT, torch.ones_like(base))
        terms.loss_BT.sum().backward()
        torch.testing.assert_close(logps.grad, expected, atol=1e-12, rtol=0)


def test_old_logps_and_advantages_get_no_gradient():
    logps = torch.randn(2, 3, requires_grad=True)
    old = torch.randn(2, 3, requires_grad=True)
    adv = torch.randn(2, 1, requires_grad=True)
    ppo_clip_loss(logps, old, adv).loss_BT.sum().backward()
    assert old.grad is None and adv.grad is None and logps.grad is not None


def test_extreme_log_ratio_is_clamped_finite():
    """log r = 50 would overflow to exp(50) ~ 5e21 (and inf in fp16); it is clamped to 20."""
    logps = torch.tensor([[50.0, -50.0]])
    terms = ppo_clip_loss(logps, torch.zeros_like(logps), torch.tensor([[-1.0, 1.0]]))
    assert torch.isfinite(terms.loss_BT).all()
    assert terms.ratio_BT[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-6)


# ---------------------------------------------------------------- GSPO


def _gspo_inputs():
    """Row 0: log-ratios [0.1, -0.2, 0.4], all valid -> mean 0.1 -> s_0 = e^0.1 = 1.105171.
    Row 1: log-ratios [-0.3, 0.1, 5.0], last token masked -> mean -0.1 -> s_1 = e^-0.1 = 0.904837.
    (The masked 5.0 would change s_1 if it leaked.)"""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.5, -3.0]], dtype=F64)
    log_ratio = torch.tensor([[0.1, -0.2, 0.4], [-0.3, 0.1, 5.0]], dtype=F64)
    logps = (old + log_ratio).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logps, old, mask


def test_gspo_hand_values_unclipped():
    """Wide range [0.8, 1.28]: nothing is clipped. A = (+1, -1).
    Token loss = -A s_i: row 0 -> -1.105171 on each token; row 1 -> +0.904837 on the two valid
    tokens, 0 on the masked one. Token gradient = -A s_i (GSPO-token: d s_it / d logp_it = s_i)."""
    logps, old, mask = _gspo_inputs()
    s0, s1 = math.exp(0.1), math.exp(-0.1)
    terms = gspo_loss(logps, old, torch.tensor([1.0, -1.0], dtype=F64), mask, eps_low=0.2, eps_high=0.28)
    terms.loss_BT.sum().backward()
    expected = torch.tensor([[-s0, -s0, -s0], [s1, s1, 0.0]], dtype=F64)
    torch.testing.assert_close(terms.loss_BT, expected)
    torch.testing.assert_close(logps.grad, expected)
    torch.testing.assert_close(terms.ratio_BT[:, 0], torch.tensor([s0, s1], dtype=F64))


def test_gspo_hand_values_paper_eps_clip_both():
    """Paper eps 3e-4 / 4e-4: range [0.9997, 1.0004]. Row 0: s = 1.105 > 1.0004 with A = +1 ->
    L = -1.0004, grad 0 (clipped high). Row 1: s = 0.905 < 0.9997 with A = -1 -> L = max(0.905,
    0.9997) = 0.9997, grad 0 (clipped low). Whole sequences are clipped, never single tokens."""
    logps, old, mask = _gspo_inputs()
    terms = gspo_loss(logps, old, torch.tensor([1.0, -1.0], dtype=F64), mask)
    terms.loss_BT.sum().backward()
    torch.testing.assert_close(terms.loss_BT, torch.tensor([[-1.0004] * 3, [0.9997, 0.9997, 0.0]], dtype=F64))
    torch.testing.assert_close(logps.grad, torch.zeros_like(logps))
    assert terms.clipped_high_BT.tolist() == [[1, 1, 1], [0, 0, 0]]
    assert terms.clipped_low_BT.tolist() == [[0, 0, 0], [1, 1, 0]]


def test_gspo_token_form_equals_sequence_form_with_seq_mean_token_mean():
    """Paper's L_GSPO = -(1/G) sum_i min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean log-ratio),
    differentiated THROUGH the mean, must equal aggregate(gspo loss_BT, seq_mean_token_mean) in
    value and gradient (the stop-gradient construction only re-routes the same gradient)."""
    gen = torch.Generator().manual_seed(7)
    old = torch.randn(6, 8, generator=gen, dtype=F64) - 1.0
    base = old + 0.02 * torch.randn(6, 8, generator=gen, dtype=F64)
    adv = torch.randn(6, generator=gen, dtype=F64)
    mask = torch.ones(6, 8, dtype=torch.bool)
    for i, n in enumerate([8, 3, 5, 1, 7, 2]):
        mask[i, n:] = False
    eps_low, eps_high = 0.01, 0.012  # some sequences clipped, some not

    lp_token = base.clone().requires_grad_(True)
    token_form = aggregate(
        gspo_loss(lp_token, old, adv, mask, eps_low=eps_low, eps_high=eps_high).loss_BT, mask, "seq_mean_token_mean"
    )
    token_form.backward()

    lp_seq = base.clone().requires_grad_(True)
    m = mask.to(F64)
    s = torch.exp(((lp_seq - old) * m).sum(-1) / m.sum(-1))
    seq_form = -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv).mean()
    seq_form.backward()

    clipped = ((s.detach() - 1).abs() > 0.01).sum().item()
    assert 0 < clipped < 6, "test data should mix clipped and unclipped sequences"
    assert token_form.item() == pytest.approx(seq_form.item(), abs=1e-12)
    torch.testing.assert_close(lp_token.grad, lp_seq.grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- CISPO


def test_cispo_hand_values():
    """Relative bounds: eps_high = 4 -> cap 1 + 4 = 5; eps_low None -> no lower bound.
      r    = [0.5, 1.0, 3.0, 7.0],  A = [+1, -1, +2, -1]
      w    = clip(r) = [0.5, 1, 3, 5]
      L    = -w A logp  with logp = log r:  [-0.5 ln 0.5, 0, -6 ln 3, 5 ln 7]
      dL/dlogp = -w A = [-0.5, 1, -6, 5]   (the truncated token r = 7 still gets gradient)
    With eps_low = 0.2 the first weight becomes 0.8: grad -0.8."""
    logps = _leaf([0.5, 1.0, 3.0, 7.0])
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]], dtype=F64)
    terms = cispo_loss(logps, torch.zeros_like(logps), adv, eps_high=4.0)
    terms.loss_BT.sum().backward()
    want_loss = [-0.5 * math.log(0.5), 0.0, -6 * math.log(3.0), 5 * math.log(7.0)]
    torch.testing.assert_close(terms.loss_BT[0], torch.tensor(want_loss, dtype=F64))
    torch.testing.assert_close(logps.grad[0], torch.tensor([-0.5, 1.0, -6.0, 5.0], dtype=F64))
    assert terms.clipped_high_BT[0].tolist() == [0, 0, 0, 1]
    assert terms.clipped_low_BT[0].tolist() == [0, 0, 0, 0]

    logps2 = _leaf([0.5, 1.0, 3.0, 7.0])
    terms2 = cispo_loss(logps2, torch.zeros_like(logps2), adv, eps_high=4.0, eps_low=0.2)
    terms2.loss_BT.sum().backward()
    torch.testing.assert_close(logps2.grad[0], torch.tensor([-0.8, 1.0, -6.0, 5.0], dtype=F64))
    assert terms2.clipped_low_BT[0].tolist() == [1, 0, 0, 0]


# ---------------------------------------------------------------- KL estimators


def test_kl_hand_values_and_gradients():
    """log rho = ref - logp.
    Token 1: logp = -1.0, ref = -1.5 -> log rho = -0.5.
        k1 = 0.5, k2 = 0.125, k3 = e^-0.5 + 0.5 - 1 = 0.1065307
        d/dlogp: k1 -> 1, k2 -> logp - ref = 0.5, k3 -> 1 - rho = 1 - e^-0.5 = 0.3934693
    Token 2: logp = -2.0, ref = -1.0 -> log rho = 1.
        k1 = -1 (negative!), k2 = 0.5, k3 = e - 2 = 0.7182818
        d/dlogp: k1 -> 1, k2 -> -1, k3 -> 1 - e = -1.7182818
    Token 3: logp = ref -> all zero."""
    want = {
        "k1": ([0.5, -1.0, 0.0], [1.0, 1.0, 1.0]),
        "k2": ([0.125, 0.5, 0.0], [0.5, -1.0, 0.0]),
        "k3": ([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0], [1 - math.exp(-0.5), 1 - math.e, 0.0]),
    }
    ref = torch.tensor([[-1.5, -1.0, -0.3]], dtype=F64)
    for kind, (values, grads) in want.items():
        logps = torch.tensor([[-1.0, -2.0, -0.3]], dtype=F64, requires_grad=True)
        k = kl_estimate(logps, ref, kind)
        k.sum().backward()
        torch.testing.assert_close(k[0], torch.tensor(values, dtype=F64))
        torch.testing.assert_close(logps.grad[0], torch.tensor(grads, dtype=F64))


def test_kl_exact_expectations_bias_and_gradients():
    """Exact expectations over a 5-way categorical pi = softmax(z) (no sampling):
    E_pi[k1] = E_pi[k3] = KL(pi || ref) (unbiased); E_pi[k2] != KL (biased), all k2, k3 >= 0.
    Gradients with the sample held fixed, sum_y sg(pi(y)) grad_z k(y):
    k1 -> 0, k2 -> grad KL(pi || ref) (reverse), k3 -> grad KL(ref || pi) (forward)."""
    z0 = torch.tensor([0.3, -1.0, 2.0, 0.0, -0.5], dtype=F64)
    ref_logp = torch.log_softmax(torch.tensor([1.0, 0.2, -0.4, 0.5, 0.0], dtype=F64), -1)

    def expected_grad(kind):
        z = z0.clone().requires_grad_(True)
        logp = torch.log_softmax(z, -1)
        k = kl_estimate(logp[None], ref_logp[None], kind)[0]
        (logp.exp().detach() * k).sum().backward()
        return (logp.exp().detach() * k).sum().item(), z.grad

    def kl_grad(reverse):
        z = z0.clone().requires_grad_(True)
        logp = torch.log_softmax(z, -1)
        kl = (logp.exp() * (logp - ref_logp)).sum() if reverse else (ref_logp.exp() * (ref_logp - logp)).sum()
        kl.backward()
        return kl.item(), z.grad

    reverse_kl, reverse_grad = kl_grad(True)
    _, forward_grad = kl_grad(False)
    e1, g1 = expected_grad("k1")
    e2, g2 = expected_grad("k2")
    e3, g3 = expected_grad("k3")
    assert e1 == pytest.approx(reverse_kl, abs=1e-12)
    assert e3 == pytest.approx(reverse_kl, abs=1e-12)
    assert abs(e2 - reverse_kl) > 1e-3
    torch.testing.assert_close(g1, torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(g2, reverse_grad)
    torch.testing.assert_close(g3, forward_grad)


def test_kl_k3_clamps_and_unknown_kind():
    """logp = -30, ref = 0: log rho = 30 -> clamped to 20 -> expm1(20) - 20 ~ 4.85e8 -> capped at
    k3_max = 10; without the cap it is finite (exp(30) is never formed)."""
    logps, ref = torch.tensor([[-30.0]]), torch.tensor([[0.0]])
    assert kl_estimate(logps, ref, "k3").item() == 10.0
    uncapped = kl_estimate(logps, ref, "k3", k3_max=None).item()
    assert uncapped == pytest.approx(math.expm1(20.0) - 20.0, rel=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        kl_estimate(logps, ref, "k4")
