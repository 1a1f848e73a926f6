"""Reinforcement-learning pieces that are not losses: advantages (group, RLOO, GAE), rollout groups and
dynamic sampling (``groups``), the rollout round GRPO and PPO share (``rollouts``), the diagnostics and their
warnings (``diagnostics``) and the watch that wires them into a run (``watch``).

May import: run, evaluation, rollout, rewards and everything below; never recipes, pipeline or commands.
"""

from posttrain.rl.advantages import (
    batch_normalize,
    gae,
    group_advantages,
    per_token_rewards,
    rloo_advantages,
    zero_variance_groups,
)

__all__ = ["batch_normalize", "gae", "group_advantages", "per_token_rewards", "rloo_advantages", "zero_variance_groups"]
