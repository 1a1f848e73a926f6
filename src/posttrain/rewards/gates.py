"""Gates: programmatic verifiers a completion must pass before a judge counts (a judge's or a rubric's
``gates`` option). Hard constraints -- a JSON schema, a label set, a format -- stay programs: a completion that
fails one scores 0.0 with reason "gated" and costs no judge call, so a policy cannot talk its way past them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Example, is_correct, score_all
from .registry import check, load


def check_gates(gates: Any, field: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) per gate, each checked by the registry (known name, known options) without building it."""
    if isinstance(gates, (str, Mapping)) or not isinstance(gates, Sequence):
        raise ValueError(f"{field} option gates must be a list of {{name, options}}, got {gates!r}")
    out = []
    for i, g in enumerate(gates):
        if not isinstance(g, Mapping) or not isinstance(g.get("name"), str) or set(g) - {"name", "options"}:
            raise ValueError(f"{field} option gates[{i}] must be a mapping {{name, options}}, got {g!r}")
        options = dict(g.get("options") or {})
        check(g["name"], **options)
        out.append((g["name"], options))
    return out


class Gates:
    def __init__(self, specs: Sequence[tuple[str, dict[str, Any]]]):
        self.specs = list(specs)
        self.verifiers = [load(name, **options) for name, options in self.specs]

    def __bool__(self) -> bool:
        return bool(self.verifiers)

    def passes(self, texts: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        """Does each completion pass every gate (a NaN "does not apply" is not a pass)?"""
        ok = [True] * len(texts)
        for gate in self.verifiers:
            for i, s in enumerate(score_all(gate, texts, examples)):
                ok[i] = ok[i] and not math.isnan(float(s)) and is_correct(s)
        return ok

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n, "options": o} for n, o in self.specs]

    def close(self) -> None:
        for gate in self.verifiers:
            closer = getattr(gate, "close", None)
            if callable(closer):
                closer()
