"""The token-exact trajectory of a multi-turn episode: one append-only buffer.

A trajectory is the prompt's tokens, then, turn by turn, the tokens the policy sampled (with the sampler's
log-probs) and the environment's tokens (the chat template's delta: the boundary after the policy's stop
token, tool results, the next generation prompt). Nothing already in the buffer is ever decoded and
re-encoded, so the trainer's forward over ``ids`` sees exactly the context each sampled token was drawn in.

One mask, ``sampled`` (1 only on tokens the policy sampled), is the source of the loss mask, the length
metrics and the log-prob alignment; ``ids``, ``sampled`` and ``logps`` always have the same length (checked on
every append, never padded to fit). Environment tokens carry log-prob 0.0 and sampled 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trajectory:
    ids: list[int]
    sampled: list[int]
    logps: list[float]
    prompt_len: int
    # (start, end) in ``ids`` of each policy turn and each environment delta, in order (for the report)
    spans: list[tuple[str, int, int]] = field(default_factory=list)

    @classmethod
    def start(cls, prompt_ids: list[int]) -> Trajectory:
        n = len(prompt_ids)
        return cls(list(prompt_ids), [0] * n, [0.0] * n, n)

    def append_sampled(self, ids: list[int], logps: list[float] | None) -> None:
        """The tokens the policy sampled this turn, with the sampler's log-probs (None: not asked for; 0.0)."""
        if logps is not None and len(logps) != len(ids):
            raise ValueError(f"trajectory: {len(ids)} sampled tokens but {len(logps)} log-probs")
        self._append("policy", ids, [1] * len(ids), list(logps) if logps is not None else [0.0] * len(ids))

    def append_env(self, ids: list[int]) -> None:
        """Environment tokens (the template's delta): in the context, never in the loss."""
        self._append("env", ids, [0] * len(ids), [0.0] * len(ids))

    def _append(self, kind: str, ids: list[int], sampled: list[int], logps: list[float]) -> None:
        start = len(self.ids)
        self.ids += ids
        self.sampled += sampled
        self.logps += logps
        if not len(self.ids) == len(self.sampled) == len(self.logps):
            raise AssertionError("trajectory buffer lengths diverged")  # a bug here, never data
        if ids:
            self.spans.append((kind, start, len(self.ids)))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.ids[self.prompt_len :]

    @property
    def completion_mask(self) -> list[int]:
        """``sampled`` after the prompt: the loss mask of the completion."""
        return self.sampled[self.prompt_len :]

    @property
    def completion_logps(self) -> list[float]:
        return self.logps[self.prompt_len :]

    @property
    def num_sampled(self) -> int:
        return sum(self.sampled)
