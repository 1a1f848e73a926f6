"""`env_reward`: a multi-turn episode's own reward, as a verifier.

An environment may reward its episodes itself (a game won, a task the environment can check); the RL round
hands each completion's summed step rewards to the rewards as the column ``env_reward`` (None when the
environment gave none) beside ``stop_reason``. This verifier reads it, so an environment's reward is weighted,
logged and audited like any other reward (``rewards: [{name: env_reward}]``; weight 0 logs it only).
"""

from __future__ import annotations

import math
from typing import Any


class EnvReward:
    """The episode's environment reward (``none``, the score of an episode the environment never rewarded:
    0.0 by default)."""

    def __init__(self, none: float = 0.0):
        if not math.isfinite(none):
            raise ValueError(f"env_reward: none must be finite, got {none!r}")
        self.none = float(none)

    def __call__(self, completion: str, env_reward: float | None = None, **example: Any) -> float:
        return self.none if env_reward is None else float(env_reward)
