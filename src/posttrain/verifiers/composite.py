"""`build_reward`: several verifiers, weighted, as one batch reward function with per-component scores."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import score_all
from .registry import accepts_option, load


@dataclass(frozen=True)
class RewardScores:
    """Rewards for one batch: `total[i]` is the weighted sum over components for completion i;
    `components[key][i]` is each verifier's unweighted score (logged as `reward/<key>`).

    A component may be NaN for a row (a user function returned None: "does not apply"); the total then
    sums the other components, and is NaN only when every weighted component is NaN (TRL's convention).
    """

    total: list[float]
    components: dict[str, list[float]]


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
    `close()` (or `with`) stops them."""

    def __init__(self, components: Sequence[RewardComponent]) -> None:
        if not components:
            raise ValueError("a reward needs at least one component")
        self.components = tuple(components)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.components)

    def __call__(
        self,
        completions: Sequence[str],
        prompts: Sequence[Any],
        columns: Mapping[str, Sequence[Any]],
        completion_lengths: Sequence[int] | None = None,
    ) -> RewardScores:
        """Score `completions` (one per row). `columns` holds the dataset's other columns as lists;
        `completion_lengths` (tokens) feeds the `overlong` term, as does a `completion_length` column.
        Components run one after another; each slow one (math, code) uses its own process pool."""
        n = len(completions)
        examples = self._rows(n, prompts, columns, completion_lengths)
        components: dict[str, list[float]] = {}
        for component in self.components:
            components[component.key] = [float(s) for s in score_all(component.verifier, completions, examples)]
        total = []
        for i in range(n):
            terms = [c.weight * components[c.key][i] for c in self.components if c.weight != 0]
            finite = [t for t in terms if not math.isnan(t)]
            total.append(math.fsum(finite) if finite or not terms else math.nan)
        return RewardScores(total=total, components=components)

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


def build_reward(specs: Sequence[tuple[str, float, Mapping[str, Any]]], workers: int = 0) -> RewardFunction:
    """One reward from `(name, weight, options)` specs, e.g.
    `[("math", 1.0, {}), ("format", 0.1, {}), ("overlong", 1.0, {"max_completion_length": 1024})]`.

    Component keys are the names (the function name for "pkg.module:function"); a repeated name gets
    `_2`, `_3`, ... `workers` (0 = auto) sizes the worker pool of each verifier that has one (math,
    incorrect, code), unless its options set `workers` themselves; auto leaves each verifier's own default
    (math: one process per core, at most 8).
    """
    components = []
    for spec in specs:
        if len(spec) != 3:
            raise ValueError(f"a reward spec is (name, weight, options), got {spec!r}")
    keys = component_keys([spec[0] for spec in specs])
    for key, (name, weight, options) in zip(keys, specs):
        weight = float(weight)
        if math.isnan(weight):
            raise ValueError(f"weight of {name!r} is NaN")
        opts = dict(options or {})
        if workers > 0 and "workers" not in opts and accepts_option(name, "workers"):
            # workers=0 (auto) passes nothing: each verifier's own default is its auto size.
            opts["workers"] = workers
        components.append(RewardComponent(key=key, name=name, weight=weight, verifier=load(name, **opts)))
    return RewardFunction(components)
