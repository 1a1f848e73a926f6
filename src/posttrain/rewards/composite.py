"""`build_reward`: several verifiers, weighted, as one batch reward function with per-component scores.

`RewardFunction` is the one place where rewards become numbers to train on, for every recipe that takes
rewards, so it is also where a faulty reward is caught. A component that returns None for a row (TRL's
"does not apply") is left out of that row's weighted sum. A non-finite value (inf, -inf, a NaN returned
as a number) is a verifier fault, and so is a row that no weighted component applies to: under
`non_finite="error"` the call raises `RewardFault` naming the component, the row and the completion;
under `"zero"` the value (or the row's total) is 0, a warning says so and `RewardScores.non_finite`
lists the rows, for a metric. No clamped or NaN value ever reaches training.

A judged reward (judge, rubric) tags each score with a status (base.STATUSES), counted per component in
`RewardScores.status_counts`. Its NaN tagged "judge_failed" (on_failure="exclude": the judge gave no verdict)
is no fault: like "does not apply" it is left out of the row's total, and a row where it hit a weighted
component is listed in `RewardScores.excluded`: its total is not a measure of the completion (finite, the sum
of the other components, 0 when none applies), and the RL round drops the sample from its group's advantages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .base import JUDGE_FAILED, NOT_APPLICABLE, STATUSES, VerifierError, score_all
from .registry import accepts_option, load

log = logging.getLogger("posttrain")

NonFinitePolicy = Literal["error", "zero"]


class RewardFault(VerifierError):
    """A reward was non-finite, or no weighted reward applied to a row (under non_finite="error")."""


@dataclass(frozen=True)
class RewardScores:
    """Rewards for one batch: `total[i]` is the weighted sum over components for completion i;
    `components[key][i]` is each verifier's unweighted score (logged as `reward/<key>`).

    A component may be NaN for a row (a user function returned None: "does not apply"); the total then
    sums the other components. `total` is always finite: `non_finite` lists the rows where a faulty
    value (or a row no weighted component applies to) was scored 0 under the "zero" policy.

    `excluded` lists the rows whose total left out a weighted component's "judge_failed" NaN (a judge gave
    no verdict, under on_failure="exclude"): train on none of them. `status_counts` counts the judged
    rewards' statuses, keyed "<component key>/<status>" (e.g. {"judge/judge_failed": 2}); `row_statuses`
    lists the rows of each (e.g. {"judge/judge_failed": (3, 7)}), for counts per group.
    """

    total: list[float]
    components: dict[str, list[float]]
    non_finite: tuple[int, ...] = ()
    excluded: tuple[int, ...] = ()
    status_counts: dict[str, int] = field(default_factory=dict)
    row_statuses: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardComponent:
    key: str
    name: str
    weight: float
    verifier: Callable[..., float]


def _component_key(name: str, taken: set[str]) -> str:
    base = name.rpartition(":")[2].rpartition(".")[2] if ":" in name else name
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    return key


class RewardFunction:
    """Call with one batch of completions; see `RewardFunction.__call__`. Owns the verifiers' worker pools:
    `close()` (or `with`) stops them. `state_dict()` / `load_state_dict()` carry the state of stateful
    verifiers (e.g. the `random` control's draw counter) through a checkpoint."""

    def __init__(self, components: Sequence[RewardComponent], non_finite: NonFinitePolicy = "error") -> None:
        if not components:
            raise ValueError("a reward needs at least one component")
        if non_finite not in ("error", "zero"):
            raise ValueError(f"non_finite must be 'error' or 'zero', got {non_finite!r}")
        self.components = tuple(components)
        self.non_finite = non_finite

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.components)

    def __call__(
        self,
        completions: Sequence[str],
        prompts: Sequence[Any],
        columns: Mapping[str, Sequence[Any]],
        completion_lengths: Sequence[int] | None = None,
        where: Sequence[str] | None = None,
    ) -> RewardScores:
        """Score `completions` (one per row). `columns` holds the dataset's other columns as lists;
        `completion_lengths` (tokens) feeds the `overlong` term, as does a `completion_length` column;
        `where` (e.g. "train.jsonl:12" per row) names the data row in a fault's message.
        Components run one after another; each slow one (math, code) uses its own process pool."""
        n = len(completions)
        examples = self._rows(n, prompts, columns, completion_lengths)
        components: dict[str, list[float]] = {}
        faults: list[tuple[int, str]] = []  # (row, what was wrong)
        row_statuses: dict[str, list[int]] = {}
        excluded: set[int] = set()
        for component in self.components:
            values = []
            for i, s in enumerate(score_all(component.verifier, completions, examples)):
                v, reason = float(s), getattr(s, "reason", "")
                if reason in STATUSES:
                    row_statuses.setdefault(f"{component.key}/{reason}", []).append(i)
                if math.isnan(v) and reason == JUDGE_FAILED:
                    if component.weight != 0:
                        excluded.add(i)
                elif not math.isfinite(v) and not (math.isnan(v) and reason == NOT_APPLICABLE):
                    faults.append((i, f"reward {component.key!r} returned {v!r}"))
                    v = 0.0  # what "zero" trains on; "error" raises below
                values.append(v)
            components[component.key] = values
        total = []
        for i in range(n):
            terms = [c.weight * components[c.key][i] for c in self.components if c.weight != 0]
            applied = [t for t in terms if not math.isnan(t)]
            if i in excluded and not applied:
                total.append(0.0)  # nothing else applies; the row is excluded, not a fault
                continue
            if terms and not applied:
                faults.append((i, "no weighted reward applies (every one returned None)"))
                total.append(0.0)
                continue
            value = math.fsum(applied) if all(math.isfinite(t) for t in applied) else math.inf
            if not math.isfinite(value):
                faults.append((i, "the weighted sum of the rewards overflows"))
                value = 0.0
            total.append(value)
        if faults:
            self._fault(faults, completions, where)
        return RewardScores(
            total=total,
            components=components,
            non_finite=tuple(sorted({i for i, _ in faults})),
            excluded=tuple(sorted(excluded)),
            status_counts={key: len(rows) for key, rows in row_statuses.items()},
            row_statuses={key: tuple(rows) for key, rows in row_statuses.items()},
        )

    def _fault(self, faults: list[tuple[int, str]], completions: Sequence[str], where: Sequence[str] | None) -> None:
        row, what = faults[0]
        place = f"row {row}" + (f" ({where[row]})" if where is not None else "")
        text = completions[row]
        text = text if len(text) <= 200 else text[:200] + "..."
        more = f" ({len(faults) - 1} more in this batch of {len(completions)})" if len(faults) > 1 else ""
        if self.non_finite == "error":
            raise RewardFault(
                f"{what} for {place}, completion {text!r}{more}. A non-finite reward is a verifier "
                f"fault and is never trained on: fix the reward, or set reward_non_finite=zero to "
                f"score such rewards 0 (counted in the metric reward/non_finite)"
            )
        log.warning("reward_non_finite=zero: %s for %s, completion %r%s; scored 0", what, place, text, more)

    def state_dict(self) -> dict[str, Any]:
        """The state of every stateful component (one with `state_dict()`), by component key."""
        return {
            c.key: c.verifier.state_dict() for c in self.components if callable(getattr(c.verifier, "state_dict", None))
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for c in self.components:
            if callable(getattr(c.verifier, "load_state_dict", None)):
                if c.key not in state:
                    raise ValueError(
                        f"the checkpoint holds no state for the stateful reward {c.key!r}: resuming "
                        f"would not draw the rewards an uninterrupted run draws"
                    )
                c.verifier.load_state_dict(state[c.key])

    @staticmethod
    def _rows(
        n: int, prompts: Sequence[Any], columns: Mapping[str, Sequence[Any]], completion_lengths: Sequence[int] | None
    ) -> list[dict[str, Any]]:
        if len(prompts) != n:
            raise ValueError(f"{n} completions but {len(prompts)} prompts")
        for key, values in columns.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n:
                got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
                raise ValueError(f"column {key!r} must be a list with one value per completion ({n}), got {got}")
        if completion_lengths is not None and len(completion_lengths) != n:
            raise ValueError(f"{n} completions but {len(completion_lengths)} completion_lengths")
        rows = []
        for i in range(n):
            row = {key: values[i] for key, values in columns.items()}
            row["prompt"] = prompts[i]
            if completion_lengths is not None:
                row["completion_length"] = completion_lengths[i]
            rows.append(row)
        return rows

    def close(self) -> None:
        for component in self.components:
            closer = getattr(component.verifier, "close", None)
            if callable(closer):
                closer()

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def component_keys(names: Sequence[str]) -> list[str]:
    """The metric key of each reward component (``reward/<key>/mean``), as ``build_reward`` names them."""
    taken: set[str] = set()
    keys = []
    for name in names:
        keys.append(_component_key(name, taken))
        taken.add(keys[-1])
    return keys


def build_reward(
    specs: Sequence[tuple[str, float, Mapping[str, Any]]], workers: int = 0, non_finite: NonFinitePolicy = "error"
) -> RewardFunction:
    """One reward from `(name, weight, options)` specs, e.g.
    `[("math", 1.0, {}), ("format", 0.1, {}), ("overlong", 1.0, {"max_completion_length": 1024})]`.

    Component keys are the names (the function name for "pkg.module:function"); a repeated name gets
    `_2`, `_3`, ... `workers` (0 = auto) sizes the worker pool of each verifier that has one (math,
    incorrect, code), unless its options set `workers` themselves; auto leaves each verifier's own default
    (math: one process per core, at most 8). `non_finite` is the policy for faulty rewards (module docstring).
    """
    components = []
    for spec in specs:
        if len(spec) != 3:
            raise ValueError(f"a reward spec is (name, weight, options), got {spec!r}")
    keys = component_keys([spec[0] for spec in specs])
    for key, (name, weight, options) in zip(keys, specs):
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"weight of {name!r} is {weight}; a weight must be a finite number")
        opts = dict(options or {})
        if workers > 0 and "workers" not in opts and accepts_option(name, "workers"):
            # workers=0 (auto) passes nothing: each verifier's own default is its auto size.
            opts["workers"] = workers
        components.append(RewardComponent(key=key, name=name, weight=weight, verifier=load(name, **opts)))
    return RewardFunction(components, non_finite)
