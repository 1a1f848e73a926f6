"""The critic's loss for PPO with a value model (RLHF): the clipped value loss.

    L^V_t = 1/2 max( (V_t - G_t)^2 , (clip(V_t, V_old,t - eps_v, V_old,t + eps_v) - G_t)^2 )

(the form TRL, verl and OpenRLHF share; Schulman et al.'s PPO implementations). ``G`` are the GAE
returns and ``V_old`` the critic's values at rollout time: both are constants (detached here).
Clipping keeps the critic from moving its estimate more than eps_v per rollout batch, as the policy
ratio clip does for the policy. ``eps_v = None`` (or 0 <) gives the plain 1/2 (V - G)^2.

Per-token losses are returned; the recipe reduces them with ``losses.aggregation.aggregate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ValueLossTerms:
    """Per-token value loss, (B, T), and a detached 0/1 indicator of the tokens where the clipped
    term is strictly larger (it binds, and the token's gradient is that of the clipped value: zero
    when the clip is active)."""

    loss_BT: Tensor
    clipped_BT: Tensor


def clipped_value_loss(
    values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, *, clip: float | None = 0.2
) -> ValueLossTerms:
    """See the module docstring. ``values_BT`` carries gradient; the other two are constants."""
    old, ret = old_values_BT.detach(), returns_BT.detach()
    unclipped = (values_BT - ret) ** 2
    if clip is None or clip <= 0:
        return ValueLossTerms(0.5 * unclipped, torch.zeros_like(unclipped).detach())
    v_clipped = old + (values_BT - old).clamp(-clip, clip)
    clipped = (v_clipped - ret) ** 2
    return ValueLossTerms(0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values_BT.dtype).detach())


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[G - V] / Var[G] over the mask's positions: 1 = the critic predicts the returns, 0 = no
    better than their mean, < 0 = worse. 0 when the returns do not vary (nothing to explain), rounding
    included: returns that are equal but for float32 noise (every reward the same, G = A + V recomputed
    per token) have a variance of ~1e-15, which made the ratio -6.8e12 in a logged step."""
    keep = mask.bool()
    g, v = returns[keep].double(), values[keep].double()
    if g.numel() < 2:
        return 0.0
    var_g = g.var()
    if var_g <= 1e-10 * (1.0 + float(g.abs().max()) ** 2):
        return 0.0
    return float(1.0 - (g - v).var() / var_g)
