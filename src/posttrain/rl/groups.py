"""Rollout records and DAPO's Dynamic Sampling.

A ``Group`` is one prompt with its G scored completions. Dynamic Sampling (DAPO, Yu et al. 2025,
Eq. 11: keep only groups with 0 < #correct < G) generates rounds of groups until the batch holds
``target`` groups whose rewards vary; groups with identical rewards have zero advantage and only
dilute the gradient. verl's recipe raises when ``max_num_gen_batches`` is reached; here the step
goes on with the groups it has, and says so in ``SamplingStats``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Group:
    row: int  # index of the prompt row in the dataset
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[tuple[int, ...], ...]  # G completions, EOS kept
    texts: tuple[str, ...]
    truncated: tuple[bool, ...]
    rewards: tuple[float, ...]  # total (weighted) reward per completion
    components: dict[str, tuple[float, ...]]  # unweighted score per verifier
    non_finite: int = 0  # faulty rewards scored 0 (reward_non_finite: zero)
    # The engine's sampling log-probs per completion token, when it was asked for them (the
    # off-policy correction of losses/importance.py compares them with the trainer's).
    logps: tuple[tuple[float, ...], ...] | None = None
    # Multi-turn episodes (envs/): a completion is everything after the prompt -- the policy's turns and the
    # environment's tokens between them -- and ``sampled_masks`` marks the tokens the policy sampled (1), the
    # only ones that carry loss; ``episodes`` holds each trajectory's summary (turns, stop_reason, tool calls
    # and errors, its segments for the report). None for single-turn groups (every token sampled).
    sampled_masks: tuple[tuple[int, ...], ...] | None = None
    episodes: tuple[dict, ...] | None = None
    # Samples without a reward to train on (a judge that gave no verdict, under on_failure: exclude): left out
    # of the group's baseline, advantage 0, no loss. None: every sample counts.
    excluded: tuple[bool, ...] | None = None
    # Reward statuses counted over the group ("<reward>/<status>": judge_failed, policy_invalid, ...)
    status_counts: dict | None = None

    def sampled_mask(self, i: int) -> tuple[int, ...]:
        """Completion i's loss mask: 1 on the tokens the policy sampled."""
        return self.sampled_masks[i] if self.sampled_masks is not None else (1,) * len(self.completion_ids[i])

    def num_sampled(self, i: int) -> int:
        return sum(self.sampled_masks[i]) if self.sampled_masks is not None else len(self.completion_ids[i])

    @property
    def valid_rewards(self) -> tuple[float, ...]:
        """The rewards of the samples that count (``excluded`` left out)."""
        if self.excluded is None:
            return self.rewards
        return tuple(r for r, x in zip(self.rewards, self.excluded) if not x)

    @property
    def has_variance(self) -> bool:
        valid = self.valid_rewards
        return len(valid) >= 2 and max(valid) - min(valid) > 1e-9


@dataclass(frozen=True)
class SamplingStats:
    rounds: int  # generation rounds this step
    generated_groups: int  # all groups generated
    zero_variance_groups: int  # of those, groups with identical rewards
    kept_groups: int  # groups the step trains on
    bound_reached: bool  # dynamic sampling stopped at max_gen_batches with fewer than the target

    @property
    def zero_variance_frac(self) -> float:
        return self.zero_variance_groups / max(1, self.generated_groups)


def collect_groups(
    generate_round: Callable[[], list[Group]],
    target: int,
    *,
    dynamic: bool,
    max_rounds: int,
    gather: Callable[[tuple], list[tuple]] = lambda x: [x],
    rank: int = 0,
) -> tuple[list[Group], list[Group], SamplingStats]:
    """(groups to train on, every group generated, stats).

    Without ``dynamic``: one round, every group kept. With it: rounds until ``target`` groups with
    reward variance are in hand or ``max_rounds`` is reached (then: whatever was kept, maybe none).

    Data-parallel, each rank generates its share of every round; ``gather`` (``Dist.gather``) gives
    every rank's counts, so the decision to go on is the same on every rank and the ``target`` groups
    kept are the first ones in the global order (round by round, rank by rank) -- the groups one
    process would keep. The stats count all ranks; the returned groups are this rank's.
    """
    if max_rounds < 1:
        raise ValueError("max_rounds must be >= 1")
    kept: list[Group] = []
    generated: list[Group] = []
    rounds = kept_total = generated_total = zero_total = 0
    while True:
        groups = generate_round()
        rounds += 1
        generated.extend(groups)
        new = [g for g in groups if g.has_variance or not dynamic]
        counts = gather((len(new), len(groups), sum(not g.has_variance for g in groups)))
        ahead = kept_total + sum(c[0] for c in counts[:rank])  # kept groups before this rank's in global order
        kept.extend(new[: max(0, target - ahead)])
        kept_total += sum(c[0] for c in counts)
        generated_total += sum(c[1] for c in counts)
        zero_total += sum(c[2] for c in counts)
        if not dynamic or kept_total >= target or rounds >= max_rounds:
            break
    short = dynamic and kept_total < target
    return kept, generated, SamplingStats(rounds, generated_total, zero_total, min(kept_total, target), short)
