"""Off-policy correction for the rollout/trainer mismatch: truncated and masked importance sampling.

The samples come from the rollout engine, a ~ pi_rollout(theta_old); the trainer scores them with its
own kernels, pi_train(theta_old), which differ numerically (bf16, fused kernels, another attention).
With rho = pi_train(a; theta_old) / pi_rollout(a; theta_old), the PPO-clip gradient under TIS is
(Yao, Liu et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training";
reference/losses.md section 11)

    grad L = -E_{a ~ pi_rollout} [ w(rho) * grad min( r A, clip(r, 1 - eps_low, 1 + eps_high) A ) ]

and the per-token policy loss is multiplied by the weight w. The weight involves only the old and
the rollout log-probs, never theta, so it is a constant: detached here (verl rollout_corr_math.md,
section 3.2.2, explains why a weight with gradient is wrong).

    truncate (TIS):  w = min(rho, C)                                (oat, OpenRLHF "tis", verl)
    mask (MIS):      w = rho * [C_low <= rho <= C]                  (IcePop; OpenRLHF "icepop")

Levels: "token" uses each token's own rho_t = exp(logp_old_t - logp_rollout_t); "sequence" uses the
product over the completion's loss tokens, rho_i = exp(sum_t m_t (logp_old_t - logp_rollout_t)),
broadcast to every token of it (TRL "sequence_truncate" / "sequence_mask", verl "sequence").
Deviation, as everywhere in losses/: log-ratios are clamped to [-20, 20] before exp, so fp32 stays
finite (verl, OpenRLHF). Shapes: B sequences, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.policy import LOG_RATIO_CLAMP

ISMode = Literal["truncate", "mask"]
ISLevel = Literal["token", "sequence"]


@dataclass(frozen=True)
class ISWeights:
    """Detached per-token weights and what they did, all (B, T); 0 at masked positions."""

    weights_BT: Tensor  # the factor multiplied into the per-token policy loss
    ratio_BT: Tensor  # rho at the chosen level, before truncation / masking
    clipped_BT: Tensor  # float 0/1: truncated (rho > C) or masked out (rho outside [C_low, C])


def rollout_is_weights(
    old_logps_BT: Tensor,
    rollout_logps_BT: Tensor,
    mask_BT: Tensor,
    *,
    mode: ISMode = "truncate",
    level: ISLevel = "token",
    cap: float = 2.0,
    cap_low: float = 0.0,
) -> ISWeights:
    """Importance weights pi_train(theta_old) / pi_rollout(theta_old), truncated at ``cap`` (TIS) or
    zeroed outside [``cap_low``, ``cap``] (masked IS), per token or per sequence (module docstring).

    Args:
        old_logps_BT: the trainer's log-probs of the sampled tokens under theta_old.
        rollout_logps_BT: the engine's log-probs of the same tokens (what it sampled from).
        mask_BT: loss mask; also the tokens a sequence-level ratio multiplies over.
        cap: C > 0 (verl's default 2.0; TRL's 3.0). ``cap_low``: mask mode only, C_low < C.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode: expected 'truncate' or 'mask', got {mode!r}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level: expected 'token' or 'sequence', got {level!r}")
    if mode == "mask" and not 0.0 <= cap_low < cap:
        raise ValueError(f"cap_low must be in [0, cap), got {cap_low} (cap {cap})")
    keep_BT = mask_BT.bool()
    zero = torch.zeros_like(old_logps_BT, dtype=torch.float32)
    log_rho_BT = torch.where(keep_BT, (old_logps_BT.detach() - rollout_logps_BT.detach()).float(), zero)
    if level == "sequence":
        log_rho_BT = log_rho_BT.sum(-1, keepdim=True).expand_as(log_rho_BT)
    rho_BT = torch.exp(log_rho_BT.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode == "truncate":
        clipped = rho_BT > cap
        w_BT = rho_BT.clamp(max=cap)
    else:
        clipped = (rho_BT > cap) | (rho_BT < cap_low)
        w_BT = torch.where(clipped, zero, rho_BT)
    m = keep_BT.float()
    return ISWeights(weights_BT=w_BT * m, ratio_BT=rho_BT * m, clipped_BT=clipped.float() * m)


def mismatch_stats(old_logps_BT: Tensor, rollout_logps_BT: Tensor, mask_BT: Tensor) -> dict[str, float]:
    """How far the engine's log-probs are from the trainer's, over the loss tokens:
    mean and max |logp_train - logp_rollout|, and the k3 estimate of KL(pi_rollout || pi_train)
    on the engine's own samples (Schulman's k3, with log r = logp_train - logp_rollout:
    E[r - 1 - log r] >= 0 per token; 0 when the two agree)."""
    keep_BT = mask_BT.bool()
    n = int(keep_BT.sum())
    if n == 0:
        return {"abs_diff_mean": 0.0, "abs_diff_max": 0.0, "k3": 0.0}
    d = (old_logps_BT.detach() - rollout_logps_BT.detach()).double()[keep_BT]
    k3 = torch.expm1(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - d
    return {"abs_diff_mean": d.abs().mean().item(), "abs_diff_max": d.abs().max().item(), "k3": k3.mean().item()}
