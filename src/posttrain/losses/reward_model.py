"""The reward model's loss: Bradley-Terry on preference pairs (Christiano et al. 2017; Ouyang et al.
2022, InstructGPT Eq. 1), with Llama 2's margin and an optional reward-centring term.

    loss_i = -log sigma( r_c,i - r_r,i - m_i )  +  c * (r_c,i + r_r,i)^2

* ``r_c``, ``r_r``: the scalar rewards of the chosen and the rejected completion (the model's head on
  the last non-pad token).
* ``m``: an optional per-pair margin (Touvron et al. 2023, Llama 2 §3.2.2): a pair marked "much
  better" must win by at least m. Subtracted inside the sigmoid, as TRL's RewardTrainer does.
* ``c``: ``center_coef`` (Eisenstein et al. 2023, "Helping or Herding?"; TRL's
  ``center_rewards_coefficient``): Bradley-Terry only sees differences, so the rewards' level is free;
  this term pins their mean near 0, which makes scores comparable across models and steps.
  TRL adds ``c * mean((r_c + r_r)^2)`` to the mean loss; per pair as here, the mean is the same.

``log sigma`` is ``F.logsigmoid`` (a margin of -100 gives a loss of 100, not inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class BradleyTerryTerms:
    loss_B: Tensor  # per pair, to minimise (the recipe takes the mean over the step's pairs)
    margin_B: Tensor  # r_c - r_r, detached (for metrics: accuracy = margin > 0)


def bradley_terry_loss(
    chosen_B: Tensor, rejected_B: Tensor, *, margin_B: Tensor | None = None, center_coef: float = 0.0
) -> BradleyTerryTerms:
    diff_B = chosen_B - rejected_B
    shifted = diff_B if margin_B is None else diff_B - margin_B.to(diff_B.dtype)
    loss_B = -F.logsigmoid(shifted)
    if center_coef:
        loss_B = loss_B + center_coef * (chosen_B + rejected_B) ** 2
    return BradleyTerryTerms(loss_B, diff_B.detach())
