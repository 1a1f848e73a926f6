"""Policy-gradient losses of the PPO-clip family: PPO / GRPO / DAPO / Dr. GRPO, GSPO, CISPO.

Every function returns PER-TOKEN losses to minimise (``loss_BT``); the recipe reduces them with
``posttrain.losses.aggregation.aggregate``. GRPO, DAPO and Dr. GRPO share ``ppo_clip_loss`` and
differ only in the advantage scaling (``rl.advantages``), the epsilons and the aggregation mode.

Conventions (DESIGN principles 1, 5, 8):

* ``logps_BT``: log pi_theta(y_t | x, y_<t) of the sampled tokens, carries gradient.
* ``old_logps_BT``: the same under the policy that anchors the ratio (pi_old); ``advantages``:
  per-sequence or per-token advantages. Both are treated as constants: they are ``.detach()``-ed
  here, so a caller that forgot ``no_grad`` still gets the paper's gradient.
* r_t = exp(logp_theta - logp_old). The log-ratio is clamped to [-20, 20] before ``exp`` (verl,
  OpenRLHF): exp(20) ~ 4.9e8 keeps fp32 finite. Deviation: a token whose |log-ratio| exceeds 20
  gets zero gradient through the clamp; such a token is far outside any trust region anyway.
* Advantages must be 2-D, (B, 1) or (B, T), so that they broadcast over tokens. A 1-D (B,)
  tensor is rejected because it would broadcast along T, silently, whenever B == T.
* With one update per rollout (``old_logps = logps.detach()``) r = 1 in value and every loss
  here has gradient -A * grad(logp): all clip variants reduce to REINFORCE with advantage A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
# GSPO's sequence log-ratio is capped lower, at 10 (verl ``compute_policy_loss_gspo``).
GSPO_SEQ_LOG_RATIO_MAX = 10.0


@dataclass(frozen=True)
class PolicyLossTerms:
    """Per-token loss and detached diagnostics, all (B, T).

    Indicators are float 0/1 tensors so ``masked_mean`` turns them into fractions directly.
    ``dual_clipped_BT`` is only set by ``ppo_clip_loss`` with ``dual_clip``.
    """

    loss_BT: Tensor
    clipped_low_BT: Tensor
    clipped_high_BT: Tensor
    ratio_BT: Tensor
    dual_clipped_BT: Tensor | None = None


def _advantages_2d(advantages: Tensor, name: str) -> Tensor:
    if advantages.dim() != 2:
        raise ValueError(
            f"{name} must be (B, 1) or (B, T) so it broadcasts over tokens; got shape "
            f"{tuple(advantages.shape)} (use adv_B[:, None])"
        )
    return advantages.detach()


def _check_eps(eps_low: float | None, eps_high: float) -> None:
    if eps_low is not None and not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")


def _log_ratio(logps_BT: Tensor, old_logps_BT: Tensor) -> Tensor:
    return (logps_BT - old_logps_BT.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _clipped_surrogate(ratio_BT: Tensor, adv_BT: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)) = -min(r A, clip(r) A)."""
    unclipped = -adv_BT * ratio_BT
    clipped = -adv_BT * ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    # Inside the clip range both terms are equal with equal gradients; torch.maximum splits the
    # gradient evenly on ties, so the total stays -A * d r.
    return torch.maximum(unclipped, clipped)


def _indicator(cond: Tensor, like: Tensor) -> Tensor:
    return cond.expand_as(like).to(like.dtype).detach()


def ppo_clip_loss(
    logps_BT: Tensor,
    old_logps_BT: Tensor,
    advantages_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
) -> PolicyLossTerms:
    """PPO-clip per-token loss with decoupled epsilons (Clip-Higher) and optional dual clip.

    Schulman et al. 2017 (arXiv 1707.06347) Eq. 7 as a loss, with DAPO's decoupled bounds
    (Yu et al. 2025, arXiv 2503.14476, Eq. 8; paper values eps_low=0.2, eps_high=0.28):

        L_t = max( -A_t r_t , -A_t clip(r_t, 1 - eps_low, 1 + eps_high) )

    Dual clip (Ye et al. 2020, arXiv 1912.09729), constant c > 1, only for A_t < 0, where an
    unbounded r would make -A r unbounded:

        L_t = min( max(-A r, -A clip(r)), -c A )   if A_t < 0;   unchanged if A_t >= 0

    It binds exactly when A < 0 and r > c; the loss is then the constant -cA (zero gradient).
    verl's default c is 3.0; DAPO's 32B script uses 10.0.

    Symmetric PPO is ``eps_high=eps_low``. GRPO = this + ``seq_mean_token_mean`` aggregation;
    DAPO = this (0.2/0.28) + ``token_mean``; Dr. GRPO = this + ``seq_sum_const``.

    Args:
        logps_BT: (B, T) current log-probs (with gradient).
        old_logps_BT: (B, T) anchor log-probs (treated as constants).
        advantages_BT: (B, 1) or (B, T) advantages (treated as constants).

    Returns:
        ``PolicyLossTerms``. ``clipped_low_BT`` = [r < 1 - eps_low and A < 0],
        ``clipped_high_BT`` = [r > 1 + eps_high and A > 0]: exactly the tokens whose clipped term
        is active and whose gradient is therefore zero. ``dual_clipped_BT`` = [A < 0 and r > c].
    """
    _check_eps(eps_low, eps_high)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al.), got {dual_clip}")
    adv = _advantages_2d(advantages_BT, "advantages_BT")

    ratio_BT = torch.exp(_log_ratio(logps_BT, old_logps_BT))
    loss_BT = _clipped_surrogate(ratio_BT, adv, eps_low, eps_high)
    r = ratio_BT.detach()
    dual_BT = None
    if dual_clip is not None:
        loss_BT = torch.where(adv < 0, torch.minimum(loss_BT, -dual_clip * adv), loss_BT)
        dual_BT = _indicator((adv < 0) & (r > dual_clip), loss_BT)
    return PolicyLossTerms(
        loss_BT=loss_BT,
        clipped_low_BT=_indicator((r < 1.0 - eps_low) & (adv < 0), loss_BT),
        clipped_high_BT=_indicator((r > 1.0 + eps_high) & (adv > 0), loss_BT),
        ratio_BT=r.expand_as(loss_BT),
        dual_clipped_BT=dual_BT,
    )


def gspo_loss(
    logps_BT: Tensor,
    old_logps_BT: Tensor,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> PolicyLossTerms:
    """GSPO per-token loss in the GSPO-token form (Zheng et al. 2025, arXiv 2507.18071).

    Sequence-level importance ratio, length-normalised over the loss mask:

        s_i = exp( (1/|y_i|) sum_t m_it (logp_theta - logp_old)_it )

    GSPO-token ratio (the paper's token-level variant):
    s_it = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)], built in log space as
    ``logp - sg(logp) + sg(log s_i)``. Its value is s_i and its gradient is s_i * grad(logp_it).
    Per token:

        L_it = max( -A_it s_it , -A_it clip(s_it, 1 - eps_low, 1 + eps_high) )

    With ``seq_mean_token_mean`` aggregation and a per-sequence A_i this equals the paper's
    L_GSPO = -(1/G) sum_i min(s_i A_i, clip(s_i) A_i) in value AND gradient, since
    grad s_i = s_i (1/|y_i|) sum_t grad logp_it. Use that mode (verl forces it). Paper epsilons:
    3e-4 / 4e-4. When the sequence is clipped, every token of it gets zero gradient.

    Deviation: the detached log s_i is clamped to [-20, 10] (verl caps it at 10) before ``exp``.

    Args:
        advantages_B: (B,) per-sequence advantages, or (B, T) token-level ones.
        mask_BT: (B, T) loss mask; also defines |y_i|. ``loss_BT`` is 0 at masked positions.
    """
    _check_eps(eps_low, eps_high)
    keep_BT = mask_BT.bool()
    adv = advantages_B[:, None] if advantages_B.dim() == 1 else advantages_B
    adv = _advantages_2d(adv, "advantages_B")

    zero = torch.zeros_like(logps_BT)
    logps_kept_BT = torch.where(keep_BT, logps_BT, zero)
    log_ratio_BT = torch.where(keep_BT, logps_BT.detach() - old_logps_BT.detach(), zero)
    len_B = keep_BT.sum(dim=-1).clamp(min=1).to(logps_BT.dtype)
    seq_log_ratio_B = (log_ratio_BT.sum(dim=-1) / len_B).clamp(-LOG_RATIO_CLAMP, GSPO_SEQ_LOG_RATIO_MAX)

    log_s_BT = logps_kept_BT - logps_kept_BT.detach() + seq_log_ratio_B[:, None]
    s_BT = torch.exp(log_s_BT)
    loss_BT = torch.where(keep_BT, _clipped_surrogate(s_BT, adv, eps_low, eps_high), zero)
    s = s_BT.detach()
    return PolicyLossTerms(
        loss_BT=loss_BT,
        clipped_low_BT=_indicator(keep_BT & (s < 1.0 - eps_low) & (adv < 0), loss_BT),
        clipped_high_BT=_indicator(keep_BT & (s > 1.0 + eps_high) & (adv > 0), loss_BT),
        ratio_BT=s,
    )


def cispo_loss(
    logps_BT: Tensor,
    old_logps_BT: Tensor,
    advantages_BT: Tensor,
    *,
    eps_high: float = 4.0,
    eps_low: float | None = None,
) -> PolicyLossTerms:
    """CISPO per-token loss (MiniMax-M1, arXiv 2506.13585, the CISPO objective).

        w_t = sg( clip(r_t, 1 - eps_low, 1 + eps_high) ),   L_t = -w_t * A_t * logp_theta(t)

    The IS weight, not the token, is clipped, so every token keeps a REINFORCE gradient
    -w_t A_t grad(logp_t); the loss VALUE is not a surrogate objective, only its gradient means
    something. Paper aggregation: ``token_mean``.

    Choice: epsilons are RELATIVE to 1 (verl), as in ``ppo_clip_loss``; TRL instead caps r at an
    absolute value (recommended 5.0, after ScaleRL). Default ``eps_high=4.0`` reproduces that
    absolute cap of 5.0 (the MiniMax-M1 value is unverified). ``eps_low=None`` = no lower bound,
    as in the paper, which sets eps_low large and tunes only eps_high.

    Returns:
        ``PolicyLossTerms`` whose indicators mark truncated weights, for either sign of A
        (the token still gets a gradient): [r > 1 + eps_high], [r < 1 - eps_low].
    """
    _check_eps(eps_low, eps_high)
    adv = _advantages_2d(advantages_BT, "advantages_BT")
    r = torch.exp(_log_ratio(logps_BT, old_logps_BT)).detach()
    lower = 0.0 if eps_low is None else 1.0 - eps_low
    weight_BT = r.clamp(lower, 1.0 + eps_high)
    loss_BT = -weight_BT * adv * logps_BT
    low = (r < lower) if eps_low is not None else torch.zeros_like(r, dtype=torch.bool)
    return PolicyLossTerms(
        loss_BT=loss_BT,
        clipped_low_BT=_indicator(low, loss_BT),
        clipped_high_BT=_indicator(r > 1.0 + eps_high, loss_BT),
        ratio_BT=r.expand_as(loss_BT),
    )
