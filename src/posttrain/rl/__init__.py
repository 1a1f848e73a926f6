"""Reinforcement-learning pieces that are not losses: advantages, rollout groups, dynamic sampling."""

from posttrain.rl.advantages import (
    batch_normalize,
    group_advantages,
    rloo_advantages,
    zero_variance_groups,
)

__all__ = ["batch_normalize", "group_advantages", "rloo_advantages", "zero_variance_groups"]
