"""Preference-optimisation losses: DPO (+ conservative DPO, + RPO's NLL term), IPO, SimPO, KTO, ORPO.

All functions return per-example losses ``loss_B`` to MINIMISE (the recipe takes the mean) and
detached implicit rewards for logging. Inputs are per-sequence completion log-probs, (B,):

* ``*_B`` without a suffix: SUMMED over the completion's loss-masked tokens (DPO, KTO);
* ``*_avg_B``: length-AVERAGED, sum / |y| (SimPO, ORPO, and IPO as explained there).

Reference log-probs are treated as constants (detached here). Every log sigma(x) is computed as
``F.logsigmoid(x)``, never ``log(sigmoid(x))``: DPO with beta*h = -100 gives 100, not inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PairwiseLossTerms:
    """Per-pair loss and detached implicit rewards (chosen - rejected = the reward margin)."""

    loss_B: Tensor
    chosen_rewards_B: Tensor
    rejected_rewards_B: Tensor


@dataclass(frozen=True)
class KTOLossTerms:
    """Per-example loss; ``rewards_B`` = beta (logp - logp_ref), detached; ``desirable_B`` copied
    through so metrics can split the rewards by label."""

    loss_B: Tensor
    rewards_B: Tensor
    desirable_B: Tensor


@dataclass(frozen=True)
class ORPOLossTerms:
    """Per-pair ORPO loss; metrics detached. Rewards follow TRL: lam * average log-prob."""

    loss_B: Tensor
    chosen_rewards_B: Tensor
    rejected_rewards_B: Tensor
    log_odds_ratio_B: Tensor
    odds_ratio_loss_B: Tensor


def dpo_loss(
    pol_chosen_B: Tensor,
    pol_rejected_B: Tensor,
    ref_chosen_B: Tensor,
    ref_rejected_B: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairwiseLossTerms:
    """Sigmoid DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), with conservative DPO.

    With summed log-probs and h = (pi_c - ref_c) - (pi_r - ref_r):

        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    eps = ``label_smoothing`` is the assumed label-flip rate of cDPO (Mitchell, "A note on DPO
    with noisy preferences"); eps = 0 is plain DPO. Gradient (eps = 0):
    dL/d pi_c = -beta sigma(-beta h) = -dL/d pi_r, i.e. the update is weighted by how much the
    implicit reward model mis-orders the pair. Implicit rewards: beta (pi - ref), detached.
    ``reference_free`` DPO is obtained by passing zeros as the reference log-probs.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio_B = pol_chosen_B - ref_chosen_B.detach()
    rejected_logratio_B = pol_rejected_B - ref_rejected_B.detach()
    logits_B = beta * (chosen_logratio_B - rejected_logratio_B)
    loss_B = -(1.0 - label_smoothing) * F.logsigmoid(logits_B)
    if label_smoothing > 0.0:
        loss_B = loss_B - label_smoothing * F.logsigmoid(-logits_B)
    return PairwiseLossTerms(
        loss_B=loss_B,
        chosen_rewards_B=(beta * chosen_logratio_B).detach(),
        rejected_rewards_B=(beta * rejected_logratio_B).detach(),
    )


def rpo_loss(
    pol_chosen_B: Tensor,
    pol_rejected_B: Tensor,
    ref_chosen_B: Tensor,
    ref_rejected_B: Tensor,
    chosen_len_B: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> PairwiseLossTerms:
    """DPO plus an NLL term on the chosen completion (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", arXiv 2404.19733, Eq. 1; TRL's ``rpo_alpha``):

        L = L_DPO(h) + alpha * NLL_c,     NLL_c = -pi_c / |y_c|

    with summed log-probs in the DPO term (as ``dpo_loss``) and the chosen completion's token-mean
    negative log-likelihood. Why: DPO only moves the margin h, and on reasoning pairs it does so by
    lowering BOTH completions (the chosen answers' likelihood falls); the NLL term holds the chosen
    ones up. Gradient: dL/dpi_c = -beta sigma(-beta h) - alpha / |y_c|, dL/dpi_r = beta sigma(-beta h).
    Deviation: the paper normalizes the NLL by |x + y_c| (prompt included); like TRL we divide by the
    completion's tokens, the ones the NLL is summed over. Rewards are DPO's implicit rewards.
    """
    terms = dpo_loss(
        pol_chosen_B, pol_rejected_B, ref_chosen_B, ref_rejected_B, beta=beta, label_smoothing=label_smoothing
    )
    nll_B = -pol_chosen_B / chosen_len_B
    return PairwiseLossTerms(
        loss_B=terms.loss_B + alpha * nll_B,
        chosen_rewards_B=terms.chosen_rewards_B,
        rejected_rewards_B=terms.rejected_rewards_B,
    )


def ipo_loss(
    pol_chosen_avg_B: Tensor,
    pol_rejected_avg_B: Tensor,
    ref_chosen_avg_B: Tensor,
    ref_rejected_avg_B: Tensor,
    *,
    beta: float = 0.1,
) -> PairwiseLossTerms:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), tau = ``beta``:

        L = ( h - 1/(2 beta) )^2,   h = (pi_c - ref_c) - (pi_r - ref_r)

    Normalisation choice: pass LENGTH-AVERAGED log-probs (sum / |y|, for policy and reference),
    as TRL and HALOs do. TRL reports that the IPO authors confirmed this per-token form is the
    one behind the paper's results, and it keeps the target margin 1/(2 beta) meaningful
    independent of completion length (with sums, h grows with |y| and 1/(2 beta) = 5 at
    beta = 0.1 is a very different target for 10- and 1000-token answers). Passing summed
    log-probs instead gives Eq. 17 literally. Implicit rewards: beta (pi_avg - ref_avg).
    """
    if beta <= 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratio_B = pol_chosen_avg_B - ref_chosen_avg_B.detach()
    rejected_logratio_B = pol_rejected_avg_B - ref_rejected_avg_B.detach()
    h_B = chosen_logratio_B - rejected_logratio_B
    return PairwiseLossTerms(
        loss_B=(h_B - 1.0 / (2.0 * beta)) ** 2,
        chosen_rewards_B=(beta * chosen_logratio_B).detach(),
        rejected_rewards_B=(beta * rejected_logratio_B).detach(),
    )


def simpo_loss(
    pol_chosen_avg_B: Tensor,
    pol_rejected_avg_B: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> PairwiseLossTerms:
    """SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734), reference-free:

        L = -log sigma( beta * avg_c - beta * avg_r - gamma )

    ``gamma`` is the paper's target reward margin gamma itself (as TRL's ``simpo_gamma``), in
    reward units. The SimPO repo instead takes ``gamma_beta_ratio`` = gamma / beta and computes
    -log sigma(beta (avg_c - avg_r - gamma_beta_ratio)), the same value: convert with
    gamma = gamma_beta_ratio * beta. The defaults beta = 2.0, gamma = 1.0 are the repo's
    Llama3-Base setting (gamma/beta = 0.5). Implicit rewards: beta * avg logp, detached.
    """
    chosen_rewards_B = beta * pol_chosen_avg_B
    rejected_rewards_B = beta * pol_rejected_avg_B
    return PairwiseLossTerms(
        loss_B=-F.logsigmoid(chosen_rewards_B - rejected_rewards_B - gamma),
        chosen_rewards_B=chosen_rewards_B.detach(),
        rejected_rewards_B=rejected_rewards_B.detach(),
    )


def kto_kl_estimate(pol_mismatched_logps_B: Tensor, ref_mismatched_logps_B: Tensor) -> Tensor:
    """KTO reference point z_ref (Ethayarajh et al. 2024, arXiv 2402.01306):

        z_ref = max(0, mean_j [ log pi_theta(y'_j | x_j) - log pi_ref(y'_j | x_j) ])

    over MISMATCHED pairs (x_j, y'_j), e.g. each prompt paired with another example's completion
    (TRL rotates completions by one). Summed log-probs. Detached (it is a baseline, not a
    target) and clamped at 0 (a KL cannot be negative). Data-parallel: the mean must be over the
    whole global batch, so gather the log-probs (or sum and count) across ranks first.
    """
    diff_B = (pol_mismatched_logps_B - ref_mismatched_logps_B).detach()
    return diff_B.mean().clamp(min=0.0)


def kto_loss(
    pol_logps_B: Tensor,
    ref_logps_B: Tensor,
    desirable_B: Tensor,
    kl_ref: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossTerms:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306), unpaired binary feedback:

        r = pi - ref (summed log-probs),   z = kl_ref (from ``kto_kl_estimate``)
        L = lambda_D (1 - sigma(beta (r - z)))   if y desirable
        L = lambda_U (1 - sigma(beta (z - r)))   if y undesirable

    1 - sigma(x) is computed as sigma(-x) (no cancellation when sigma(x) ~ 1). ``kl_ref`` is
    detached and clamped at 0 again here (idempotent), so z never carries gradient. TRL suggests
    weights with lambda_D n_D / (lambda_U n_U) in [1, 4/3] for imbalanced data.
    """
    desirable = desirable_B.bool()
    z = torch.as_tensor(kl_ref, dtype=pol_logps_B.dtype, device=pol_logps_B.device)
    z = z.detach().clamp(min=0.0)
    logratio_B = pol_logps_B - ref_logps_B.detach()
    loss_B = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (logratio_B - z)),
        undesirable_weight * torch.sigmoid(-beta * (z - logratio_B)),
    )
    return KTOLossTerms(loss_B=loss_B, rewards_B=(beta * logratio_B).detach(), desirable_B=desirable)


_LN_HALF = -math.log(2.0)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, accurate everywhere (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(a)) for a > -ln 2, log1p(-exp(a)) below. Input must
    already be strictly negative."""
    return torch.where(
        a > _LN_HALF,
        torch.log(-torch.expm1(a)),
        torch.log1p(-torch.exp(a.clamp(max=_LN_HALF))),
    )


def orpo_loss(
    pol_chosen_avg_B: Tensor,
    pol_rejected_avg_B: Tensor,
    chosen_nll_B: Tensor,
    *,
    lam: float = 0.1,
) -> ORPOLossTerms:
    """ORPO (Hong et al. 2024, arXiv 2403.07691), reference-free SFT + odds ratio.

    With a = average token log-prob (so P = exp(a)) and odds = P / (1 - P):

        log odds(a) = a - log(1 - exp(a))
        L_OR  = -log sigma( log odds(a_c) - log odds(a_r) )
        L     = NLL(y_c) + lam * L_OR

    ``chosen_nll_B`` is the SFT term of the chosen completion (token-mean cross-entropy in the
    reference code). log(1 - exp(a)) uses the stable two-branch ``log1mexp`` (as TRL does):
    log1p(-exp(a)) alone loses all precision as a -> 0- (P -> 1). Deviations: half-precision
    inputs are upcast to fp32 (TRL computes this loss in fp32), and a is clamped to at most
    -tiny (smallest normal float) so an average log-prob that rounded to exactly 0 gives a huge
    but finite log-odds rather than inf/NaN; the clamp zeroes the gradient only at exactly 0.
    """
    dtype = torch.promote_types(pol_chosen_avg_B.dtype, torch.float32)
    a_c = pol_chosen_avg_B.to(dtype)
    a_r = pol_rejected_avg_B.to(dtype)
    neg_tiny = -torch.finfo(dtype).tiny
    a_c, a_r = a_c.clamp(max=neg_tiny), a_r.clamp(max=neg_tiny)
    log_odds_ratio_B = (a_c - _log1mexp(a_c)) - (a_r - _log1mexp(a_r))
    or_loss_B = -F.logsigmoid(log_odds_ratio_B)
    return ORPOLossTerms(
        loss_B=chosen_nll_B.to(dtype) + lam * or_loss_B,
        chosen_rewards_B=(lam * a_c).detach(),
        rejected_rewards_B=(lam * a_r).detach(),
        log_odds_ratio_B=log_odds_ratio_B.detach(),
        odds_ratio_loss_B=or_loss_B.detach(),
    )
