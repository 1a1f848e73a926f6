"""Reinforcement-learning pieces that are not losses: advantages, rollout groups, dynamic sampling."""

from posttrain.rl.advantages import (
    batch_normalize,
    gae,
    group_advantages,
    per_token_rewards,
    rloo_advantages,
    zero_variance_groups,
)

__all__ = ["batch_normalize", "gae", "group_advantages", "per_token_rewards", "rloo_advantages",
           "zero_variance_groups"]
