"""Per-token KL(pi_theta || pi_ref) estimators (Schulman, "Approximating KL Divergence", 2020,
joschu.net/blog/kl-approx.html).

Tokens are sampled from pi_theta. With log rho = logp_ref - logp_theta and
KL(pi_theta || pi_ref) = E_{pi_theta}[-log rho]:

====  ===============================  ========  ========  ======================================
kind  per-token value                  unbiased  always    gradient in expectation (fixed sample)
                                                 >= 0
====  ===============================  ========  ========  ======================================
k1    -log rho = logp - logp_ref       yes       no        0 (useless as a loss term; use it in
                                                           the reward, as RLHF-PPO/RLOO do)
k2    (1/2) (log rho)^2                no        yes       grad KL(pi_theta || pi_ref) (reverse)
k3    (rho - 1) - log rho              yes       yes       grad KL(pi_ref || pi_theta) (FORWARD)
====  ===============================  ========  ========  ======================================

k3 is the per-token D_KL of the GRPO paper (Shao et al. 2024, arXiv 2402.03300, Eq. 4). It is
put in the loss as ``beta * aggregate(k3)``; note that its gradient is the forward-KL gradient,
not the reverse-KL one its value estimates.

Numerics for k3: log rho is clamped to [-20, 20] before ``exp`` (verl), k3 is computed as
``expm1(log rho) - log rho`` (oat; avoids cancellation near rho = 1), and the result is clamped to
at most ``k3_max`` (verl's 10; ``None`` disables it). Deviation: where a clamp binds the token
gets zero KL gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]
_LOG_RHO_CLAMP = 20.0


def kl_estimate(
    logps_BT: Tensor,
    ref_logps_BT: Tensor,
    kind: KLKind,
    *,
    k3_max: float | None = 10.0,
) -> Tensor:
    """Per-token KL estimate, (B, T); see the module table. ``ref_logps_BT`` is treated as a
    constant (detached). Values at padded positions are whatever the inputs make them; aggregate
    with a mask."""
    ref = ref_logps_BT.detach()
    if kind == "k1":
        return logps_BT - ref
    if kind == "k2":
        return 0.5 * (logps_BT - ref) ** 2
    if kind == "k3":
        log_rho = (ref - logps_BT).clamp(-_LOG_RHO_CLAMP, _LOG_RHO_CLAMP)
        k3 = torch.expm1(log_rho) - log_rho
        return k3 if k3_max is None else k3.clamp(max=k3_max)
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")
