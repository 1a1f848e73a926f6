"""Reinforcement-learning pieces that are not losses: advantages (and, later, dynamic sampling,
overlong shaping, rollout records)."""

from posttrain.rl.advantages import (
    batch_normalize,
    group_advantages,
    rloo_advantages,
    zero_variance_groups,
)

__all__ = ["batch_normalize", "group_advantages", "rloo_advantages", "zero_variance_groups"]
