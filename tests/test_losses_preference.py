"""DPO / cDPO, IPO, SimPO, KTO, ORPO on hand-derived values (sigma = logistic sigmoid)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.preference import (
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    rpo_loss,
    simpo_loss,
)

F64 = torch.float64


def _t(*values, grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- DPO


def test_dpo_hand_value_gradient_and_rewards():
    """pi_c = -10, pi_r = -12, ref_c = ref_r = -11, beta = 0.1.
    Chosen margin pi_c - ref_c = +1, rejected margin pi_r - ref_r = -1, h = 2, beta h = 0.2.
    L = -log sigma(0.2) = softplus(-0.2) = 0.5981389.
    dL/dpi_c = -beta sigma(-beta h) = -0.1 * 0.4501660 = -0.0450166; dL/dpi_r = +0.0450166.
    Rewards: beta * margins = +0.1, -0.1."""
    pc, pr = _t(-10.0, grad=True), _t(-12.0, grad=True)
    terms = dpo_loss(pc, pr, _t(-11.0), _t(-11.0), beta=0.1)
    terms.loss_B.sum().backward()
    assert terms.loss_B.item() == pytest.approx(_softplus(-0.2), abs=1e-12)
    assert pc.grad.item() == pytest.approx(-0.1 * _sigmoid(-0.2), abs=1e-12)
    assert pr.grad.item() == pytest.approx(+0.1 * _sigmoid(-0.2), abs=1e-12)
    assert terms.chosen_rewards_B.item() == pytest.approx(0.1)
    assert terms.rejected_rewards_B.item() == pytest.approx(-0.1)
    assert not terms.chosen_rewards_B.requires_grad


def test_dpo_gradient_weight_property():
    """For any inputs: dL/dpi_c = -beta sigma(beta (rejected margin - chosen margin))
    = -beta sigma(r_hat_r - r_hat_c) with the implicit rewards r_hat; dL/dpi_r = -dL/dpi_c;
    reference log-probs get no gradient."""
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=gen, dtype=F64) * 5 - 20 for _ in range(4))
    pc.requires_grad_(True), pr.requires_grad_(True), rc.requires_grad_(True)
    beta = 0.3
    terms = dpo_loss(pc, pr, rc, rr, beta=beta)
    terms.loss_B.sum().backward()
    weight = torch.sigmoid(terms.rejected_rewards_B - terms.chosen_rewards_B)
    torch.testing.assert_close(pc.grad, -beta * weight)
    torch.testing.assert_close(pr.grad, beta * weight)
    assert rc.grad is None


def test_rpo_adds_the_chosen_token_mean_nll_with_its_gradient():
    """The DPO pair above (beta h = 0.2) with |y_c| = 4 chosen tokens and alpha = 0.5:
    NLL_c = -pi_c / |y_c| = 10 / 4 = 2.5, so L = softplus(-0.2) + 0.5 * 2.5 = 0.5981389 + 1.25.
    dL/dpi_c = -0.1 sigma(-0.2) - 0.5 / 4 = -0.0450166 - 0.125 (the NLL pulls the chosen log-prob UP);
    dL/dpi_r = +0.1 sigma(-0.2), unchanged. The implicit rewards are DPO's."""
    pc, pr = _t(-10.0, grad=True), _t(-12.0, grad=True)
    terms = rpo_loss(pc, pr, _t(-11.0), _t(-11.0), _t(4.0), beta=0.1, alpha=0.5)
    terms.loss_B.sum().backward()
    assert terms.loss_B.item() == pytest.approx(_softplus(-0.2) + 1.25, abs=1e-12)
    assert pc.grad.item() == pytest.approx(-0.1 * _sigmoid(-0.2) - 0.125, abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.1 * _sigmoid(-0.2), abs=1e-12)
    assert (terms.chosen_rewards_B.item(), terms.rejected_rewards_B.item()) == pytest.approx((0.1, -0.1))


def test_rpo_with_alpha_zero_is_dpo_and_the_nll_is_per_pair():
    """alpha = 0 gives DPO exactly; per pair the NLL divides by that pair's own length (a batch of a
    2-token and an 8-token chosen completion: -pi_c / 2 and -pi_c / 8), and the length gets no gradient."""
    gen = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(2, generator=gen, dtype=F64) * 3 - 10 for _ in range(4))
    lens = _t(2.0, 8.0)
    torch.testing.assert_close(
        rpo_loss(pc, pr, rc, rr, lens, beta=0.2, alpha=0.0).loss_B, dpo_loss(pc, pr, rc, rr, beta=0.2).loss_B
    )
    pc.requires_grad_(True)
    rpo_loss(pc, pr, rc, rr, lens, beta=0.2, alpha=1.0).loss_B.sum().backward()
    dpo_grad = -0.2 * torch.sigmoid(-0.2 * ((pc - rc) - (pr - rr))).detach()
    torch.testing.assert_close(pc.grad, dpo_grad - 1.0 / lens)


def test_cdpo_label_smoothing():
    """Same pair, eps = 0.1: L = 0.9 softplus(-0.2) + 0.1 softplus(0.2) = 0.6181389.
    dL/dpi_c = beta (-(1-eps) sigma(-0.2) + eps sigma(0.2)) = 0.1 (-0.4051494 + 0.0549834)."""
    pc = _t(-10.0, grad=True)
    terms = dpo_loss(pc, _t(-12.0), _t(-11.0), _t(-11.0), beta=0.1, label_smoothing=0.1)
    terms.loss_B.sum().backward()
    assert terms.loss_B.item() == pytest.approx(0.9 * _softplus(-0.2) + 0.1 * _softplus(0.2), abs=1e-12)
    assert pc.grad.item() == pytest.approx(0.1 * (-0.9 * _sigmoid(-0.2) + 0.1 * _sigmoid(0.2)), abs=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, _t(-12.0), _t(-11.0), _t(-11.0), label_smoothing=0.5)


def test_dpo_is_finite_for_huge_margins():
    """beta h = -100 must give 100 (logsigmoid), not inf as log(sigmoid(-100)) in fp32 would."""
    pc = torch.tensor([-1000.0], requires_grad=True)
    terms = dpo_loss(pc, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1)
    terms.loss_B.sum().backward()
    assert terms.loss_B.item() == pytest.approx(100.0, rel=1e-6)
    assert pc.grad.item() == pytest.approx(-0.1, rel=1e-6)


# ---------------------------------------------------------------- IPO


def test_ipo_hand_values():
    """Length-averaged inputs pi_c = -1.0, pi_r = -1.5, ref_c = ref_r = -1.2:
    h = 0.2 - (-0.3) = 0.5. beta = 0.1: target 1/(2 beta) = 5, L = (0.5 - 5)^2 = 20.25,
    dL/dpi_c = 2 (h - 5) = -9. beta = 0.5: target 1, L = 0.25."""
    pc = _t(-1.0, grad=True)
    terms = ipo_loss(pc, _t(-1.5), _t(-1.2), _t(-1.2), beta=0.1)
    terms.loss_B.sum().backward()
    assert terms.loss_B.item() == pytest.approx(20.25, abs=1e-12)
    assert pc.grad.item() == pytest.approx(-9.0, abs=1e-12)
    assert terms.chosen_rewards_B.item() == pytest.approx(0.02)
    assert ipo_loss(_t(-1.0), _t(-1.5), _t(-1.2), _t(-1.2), beta=0.5).loss_B.item() == pytest.approx(0.25)


# ---------------------------------------------------------------- SimPO


def test_simpo_hand_values_gamma_is_the_margin_itself():
    """avg_c = -0.5, avg_r = -1.0, beta = 2:
    gamma = 1:   arg = 2(-0.5) - 2(-1.0) - 1 = 0   -> L = ln 2 = 0.6931472
    gamma = 0.5: arg = 0.5                         -> L = softplus(-0.5) = 0.4740770
    (Had gamma been used as gamma/beta inside beta(...), gamma = 1 would give
    arg = 2 (0.5 - 1) = -1 and L = 1.3132617: the test tells the two apart.)
    dL/d avg_c = -beta sigma(-arg) = -2 * 0.5 = -1 at arg = 0."""
    ac = _t(-0.5, grad=True)
    terms = simpo_loss(ac, _t(-1.0), beta=2.0, gamma=1.0)
    terms.loss_B.sum().backward()
    assert terms.loss_B.item() == pytest.approx(math.log(2.0), abs=1e-12)
    assert ac.grad.item() == pytest.approx(-1.0, abs=1e-12)
    assert simpo_loss(_t(-0.5), _t(-1.0), beta=2.0, gamma=0.5).loss_B.item() == pytest.approx(
        _softplus(-0.5), abs=1e-12
    )
    assert terms.chosen_rewards_B.item() == pytest.approx(-1.0)
    assert terms.rejected_rewards_B.item() == pytest.approx(-2.0)


# ---------------------------------------------------------------- KTO


def test_kto_hand_values_both_labels_and_weights():
    """pi = -10, ref = -12 -> r = 2; z = 0.5; beta = 0.1 -> beta (r - z) = 0.15.
    desirable:   L = lambda_D (1 - sigma(0.15))  = lambda_D sigma(-0.15) = lambda_D * 0.4625702
    undesirable: L = lambda_U (1 - sigma(-0.15)) = lambda_U sigma(0.15)  = lambda_U * 0.5374298
    With lambda_D = 2, lambda_U = 0.5: [0.9251404, 0.2687149].
    dL/dpi (desirable) = -lambda_D beta sigma(0.15) sigma(-0.15)."""
    pol = _t(-10.0, -10.0, grad=True)
    terms = kto_loss(
        pol,
        _t(-12.0, -12.0),
        torch.tensor([True, False]),
        torch.tensor(0.5),
        beta=0.1,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    terms.loss_B.sum().backward()
    torch.testing.assert_close(terms.loss_B, _t(2 * _sigmoid(-0.15), 0.5 * _sigmoid(0.15)))
    s = _sigmoid(0.15) * _sigmoid(-0.15)
    torch.testing.assert_close(pol.grad, _t(-2 * 0.1 * s, 0.5 * 0.1 * s))
    torch.testing.assert_close(terms.rewards_B, _t(0.2, 0.2))
    assert terms.desirable_B.tolist() == [True, False]


def test_kto_kl_ref_is_clamped_at_zero_and_detached():
    """kl_ref = -3 acts as 0: desirable L = sigma(-beta r) = sigma(-0.2) = 0.4501660.
    A kl_ref that requires grad receives none."""
    kl_ref = torch.tensor(-3.0, dtype=F64, requires_grad=True)
    pol = _t(-10.0, grad=True)
    terms = kto_loss(pol, _t(-12.0), torch.tensor([True]), kl_ref, beta=0.1)
    terms.loss_B.sum().backward()
    assert terms.loss_B.item() == pytest.approx(_sigmoid(-0.2), abs=1e-12)
    assert kl_ref.grad is None


def test_kto_kl_estimate():
    """mean(pol - ref) over mismatched pairs, clamped at 0, detached:
    diffs [1, 0, -1] -> 0; [-1, -2] -> -1.5 -> 0; [2, 1] -> 1.5."""
    assert kto_kl_estimate(_t(-5.0, -6.0, -7.0), _t(-6.0, -6.0, -6.0)).item() == 0.0
    assert kto_kl_estimate(_t(-7.0, -8.0), _t(-6.0, -6.0)).item() == 0.0
    pol = _t(-4.0, -5.0, grad=True)
    z = kto_kl_estimate(pol, _t(-6.0, -6.0))
    assert z.item() == pytest.approx(1.5) and not z.requires_grad and z.dim() == 0


# ---------------------------------------------------------------- ORPO


def test_orpo_hand_value():
    """a_c = ln 0.5 -> P = 0.5, odds 1, log odds 0; a_r = ln 0.2 -> odds 0.25, log odds ln 0.25.
    log odds ratio = ln 4 = 1.3862944; L_OR = softplus(-ln 4) = ln(1 + 1/4) = ln 1.25 = 0.2231436.
    nll = 2, lam = 0.1: L = 2 + 0.1 * 0.2231436 = 2.0223144.
    dL/d a_c = -lam sigma(-ln 4) d(log odds)/da = -0.1 * 0.2 * 1/(1 - P_c) = -0.1 * 0.2 * 2 = -0.04."""
    ac = _t(math.log(0.5), grad=True)
    terms = orpo_loss(ac, _t(math.log(0.2)), _t(2.0), lam=0.1)
    terms.loss_B.sum().backward()
    assert terms.log_odds_ratio_B.item() == pytest.approx(math.log(4.0), abs=1e-12)
    assert terms.odds_ratio_loss_B.item() == pytest.approx(math.log(1.25), abs=1e-12)
    assert terms.loss_B.item() == pytest.approx(2.0 + 0.1 * math.log(1.25), abs=1e-12)
    assert ac.grad.item() == pytest.approx(-0.04, abs=1e-12)
    assert terms.chosen_rewards_B.item() == pytest.approx(0.1 * math.log(0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_orpo_finite_near_zero_and_very_negative(dtype):
    """a = -1e-8 (P ~ 1 - 1e-8): log odds = a - log(-expm1(a)) ~ -log(1e-8) = 18.420681.
    In fp32 the naive log1p(-exp(a)) gives log1p(-1) = -inf here. a = -1e4: log odds = a.
    a = 0 exactly (rounded average) is clamped to -tiny: huge but finite. Loss and gradients
    must be finite in every case."""
    cases = [(-1e-8, math.log(0.5)), (math.log(0.5), -1e-8), (-1.0, -1e4), (-1e4, -1e-8), (0.0, -1.0)]
    for a_c, a_r in cases:
        ac = torch.tensor([a_c], dtype=dtype, requires_grad=True)
        ar = torch.tensor([a_r], dtype=dtype, requires_grad=True)
        terms = orpo_loss(ac, ar, torch.tensor([1.0], dtype=dtype), lam=0.1)
        terms.loss_B.sum().backward()
        assert torch.isfinite(terms.loss_B).all() and torch.isfinite(ac.grad).all() and torch.isfinite(ar.grad).all()
        assert terms.loss_B.dtype in (torch.float32, torch.float64)
    if dtype != torch.bfloat16:  # bf16 cannot represent -1e-8 next to ln 0.5 precisely enough
        terms = orpo_loss(
            torch.tensor([-1e-8], dtype=dtype),
            torch.tensor([math.log(0.5)], dtype=dtype),
            torch.tensor([0.0], dtype=dtype),
        )
        assert terms.log_odds_ratio_B.item() == pytest.approx(-1e-8 - math.log(1e-8), rel=1e-5)
        terms = orpo_loss(
            torch.tensor([-1.0], dtype=dtype), torch.tensor([-1e4], dtype=dtype), torch.tensor([0.0], dtype=dtype)
        )
        want = (-1.0 - math.log(-math.expm1(-1.0))) - (-1e4)
        assert terms.log_odds_ratio_B.item() == pytest.approx(want, rel=1e-6)
