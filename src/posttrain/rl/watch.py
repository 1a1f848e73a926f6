"""The diagnostics wired into an RL run: per-step metrics, warnings, stop_on and keep_best.

``rl/diagnostics.py`` holds the pure metric functions and the ``Monitor``; this is the glue a recipe
(GRPO, PPO) calls in its loop, so the run directory gets the same files whichever recipe wrote it:

    warnings.jsonl   one line per warning (kind, step, cause, suggestion), also logged as a WARNING
    best/            with keep_best: the model with the best held-out greedy accuracy so far
    best.json        its step and accuracy

The recipe's config needs ``rewards`` (the first defines correctness), ``diagnostics``, ``stop_on``,
``keep_best``, ``eval_k``, ``max_completion_length`` and ``temperature`` (RLConfig, shared by GRPOConfig and PPOConfig).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from posttrain.evaluation import evaluate
from posttrain.rewards import extract_answer, is_correct, load
from posttrain.rewards.extract import gold_answer
from posttrain.rewards.registry import AnswerReader, per_text
from posttrain.rl.diagnostics import Alert, Monitor, canonical_answer, rollout_diagnostics
from posttrain.runtime.files import atomic_write_json, keep_steps_upto

log = logging.getLogger("posttrain")


class RunWatch:
    """Diagnostics of one RL run. ``metrics(groups)`` each step; ``check(step, metrics)`` before the
    step is logged (returns True when a warning in ``stop_on`` fired); ``evaluated(...)`` after a
    held-out evaluation (keep_best)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Any,
        rows: list[dict],
        start: int = 0,
        state: dict | None = None,
        writes: bool = True,
        reader: AnswerReader | None = None,
    ):
        """``writes``: this process writes warnings.jsonl and best/ (under torchrun, rank 0; every rank
        watches the same gathered metrics, so all take the same decisions). ``reader``: the ``AnswerReader`` of
        the reward that defines correctness (``Rollouts.reader``), so the diversity metrics and the collapse
        warning read a bare label, a JSON object or a program's outputs as that verifier does; default: boxed
        answers and the ``answer`` / ``label`` column."""
        self.dir, self.cfg, self.rows, self.writes = Path(run_dir), cfg, rows, writes
        self.monitor = Monitor(cfg.diagnostics)
        self.best: dict | None = None
        answers, self._gold = reader or (None, gold_answer)
        self._answers = answers or per_text(canonical_answer(extract_answer))
        self._is_correct = is_correct
        if state:
            self.monitor.load_state_dict(state.get("monitor", {}))
            self.best = state.get("best")
        if not writes:
            return
        if start:  # resumed: the steps after the checkpoint run again and warn again
            keep_steps_upto(self.dir / "warnings.jsonl", start)
        else:
            (self.dir / "warnings.jsonl").unlink(missing_ok=True)

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict(), "best": self.best}

    def metrics(self, groups: list) -> dict[str, float]:
        return rollout_diagnostics(
            groups,
            lambda texts, rows: self._answers(texts, [self.rows[i] for i in rows]),
            lambda i: self._gold(self.rows[i]),
            self._is_correct,
        )

    def check(self, step: int, metrics: dict) -> bool:
        """Turn the step's metrics into warnings: logged, appended to warnings.jsonl, flagged in the
        metrics as warning/<kind> = 1. True when one of them is in ``stop_on``."""
        alerts = self.monitor.observe(step, metrics)
        for a in alerts:
            metrics[f"warning/{a.kind}"] = 1.0
            if self.writes:
                log.warning("%s", a)
                with open(self.dir / "warnings.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(a.to_json()) + "\n")
        stop = [a for a in alerts if a.kind in self.cfg.stop_on]
        if stop and self.writes:
            log.warning("stopping at step %d: %s is in stop_on", step, stop[0].kind)
        return bool(stop)

    def evaluated(self, step: int, accuracy: float, export) -> None:
        """keep_best: export the model as best/ (``export(name)``, e.g. ``loop.export``: under torchrun every
        rank calls it, rank 0 writes) when its held-out accuracy beats every earlier one."""
        if not self.cfg.keep_best or (self.best is not None and accuracy <= self.best["eval_accuracy"]):
            return
        export("best")
        self.best = {"step": step, "eval_accuracy": accuracy}
        if not self.writes:
            return
        atomic_write_json(self.dir / "best.json", self.best)
        log.info(
            "keep_best: step %d has the best held-out accuracy so far (%.1f%%); exported to %s",
            step,
            100 * accuracy,
            self.dir / "best",
        )


def held_out_metrics(model, tokenizer, rows: list[dict], cfg: Any, engine=None, runner=None) -> dict[str, float]:
    """Greedy accuracy on the held-out rows and, with ``eval_k``, pass@k at the sampling temperature:
    a pass@k that falls to the greedy figure means the policy no longer explores (the gap is logged)."""
    first = cfg.rewards[0]
    check = load(first.name, **first.options)
    try:
        s = evaluate(
            model,
            tokenizer,
            rows,
            check,
            k=cfg.eval_k,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_completion_length,
            keep_samples=0,
            engine=engine,
            runner=runner,
        )
    finally:
        getattr(check, "close", lambda: None)()  # its worker processes (math) go now, not when collected
    out = {"eval_accuracy": s.greedy_accuracy}
    if s.majority_baseline is not None:
        out["eval_majority_baseline"] = s.majority_baseline
    if s.pass_at_k is not None:
        out.update({"eval_pass_at_k": s.pass_at_k, "eval_pass_gap": s.pass_at_k - s.greedy_accuracy})
    return out


def read_warnings(run_dir: str | Path) -> list[Alert]:
    path = Path(run_dir) / "warnings.jsonl"
    if not path.exists():
        return []
    return [Alert(**json.loads(ln)) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
