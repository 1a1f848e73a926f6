"""The demo as evidence: the same pipeline over seeds and tasks, a spurious-reward control and a
dynamic-sampling ablation, each turned into a table that says what was measured.

    posttrain demo --seeds 0,1,2            one pipeline per seed (every stage's train.seed), the per-seed table
    posttrain demo --task counting          the same recipe on the counting task (only the data differ)
    posttrain demo --evidence               + a random-reward control and a dynamic-sampling ablation

The held-out set is the same for every seed (the pipeline's own `seed`, which picks the evaluation rows
and samples, stays 0), so the seeds differ only in what they train on and how.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from posttrain.models.checkpoint import is_complete
from posttrain.pipeline.stages import evaluate_stage_model, plan
from posttrain.recipes import grpo
from posttrain.runtime.files import atomic_write_json
from posttrain.runtime.tracking import read_metrics
from posttrain.tasks.clauses import LABELS as CLAUSE_LABELS
from posttrain.tasks.extraction import FIELDS as EXTRACTION_FIELDS
from posttrain.tasks.extraction import SCHEMA as EXTRACTION_SCHEMA

log = logging.getLogger("posttrain")

# Each stage's data for a task, by role: only these paths change between tasks. "sft" shows the answer
# format on short instances plus exactly four long ones (long_rows): with short ones only, SFT learns to
# stop after the longest chain it saw and RL cannot find the long answers (see README, "Robust gains").
TASK_DATA: dict[str, dict[str, str]] = {
    "arithmetic": {
        "pretrain": "builtin:arithmetic/pretrain?max_terms=5",
        "sft": "builtin:arithmetic?max_terms=5&long_rows=4",
        "rl": "builtin:arithmetic?max_terms=5",
    },
    "counting": {
        "pretrain": "builtin:counting/pretrain?max_len=8",
        "sft": "builtin:counting?max_len=8&long_rows=4",
        "rl": "builtin:counting?max_len=8",
    },
    # A label task: the verifier, its label set and a short answer budget change too (TASK_REWARDS).
    "clauses": {
        "pretrain": "builtin:clauses/pretrain",
        "sft": "builtin:clauses?negated_in_sft=2",
        "rl": "builtin:clauses",
    },
    # A structured-output task: the json verifier with a schema and partial credit per field.
    "extraction": {
        "pretrain": "builtin:extraction/pretrain",
        "sft": "builtin:extraction?months_in_sft=6",
        "rl": "builtin:extraction",
    },
}


@dataclass(frozen=True)
class TaskReward:
    """How a task's answers are checked when not by the demo's math verifier, and the budgets they need."""

    verifier: str
    options: dict
    answer_tokens: int  # max new tokens of an answer (GRPO, make-pairs, evaluation)
    max_length: int  # tokens of prompt + answer (every stage after pretraining)
    rl_steps: int = 0  # GRPO steps; 0 keeps the demo's
    rl_lr: float = 0.0  # GRPO learning rate; 0 keeps the demo's


TASK_REWARDS: dict[str, TaskReward] = {
    # At the demo's lr 3e-4, GRPO from SFT reached 100% at seed 1 (600 steps) but 85% at seeds 2 and 3 (200
    # steps): once most groups are all correct, the negative advantages of " confidentiality" on negated clauses
    # wore its last character down everywhere (" confidentialiti", not a label); lr 1e-4 over 200 steps: 99.5,
    # 99.5 and 97.0% at seeds 1, 2, 3.
    "clauses": TaskReward(
        "label", {"labels": list(CLAUSE_LABELS)}, answer_tokens=16, max_length=112, rl_steps=200, rl_lr=1e-4
    ),
    # 80-token answers make a GRPO step ~3x the arithmetic one; held-out accuracy was 99% at step 100 of 600
    # (dynamic sampling then spends up to 3 rounds a step on groups that vary): 200 steps fit the 12 minutes.
    "extraction": TaskReward(
        "json",
        {"schema": EXTRACTION_SCHEMA, "fields": list(EXTRACTION_FIELDS)},
        answer_tokens=80,
        max_length=176,
        rl_steps=200,
    ),
}


def use_task(data: dict, task: str) -> dict:
    """The demo pipeline (plain data) with every stage's data taken from ``TASK_DATA[task]``."""
    if task not in TASK_DATA:
        raise ValueError(f"unknown demo task {task!r}; choose from {', '.join(TASK_DATA)}")
    paths = TASK_DATA[task]
    data["eval"]["data"] = paths["rl"]
    r = TASK_REWARDS.get(task)
    if r is not None:
        data["eval"].update(verifier=r.verifier, verifier_options=r.options, max_new_tokens=r.answer_tokens)
    for stage in data["stages"]:
        cfg = stage["config"]
        if r is not None and stage["recipe"] != "pretrain":
            cfg["data"]["max_length"] = r.max_length
        if stage["recipe"] in ("pretrain", "sft"):
            cfg["data"]["path"] = paths[stage["recipe"]]
        elif stage["recipe"] in ("grpo", "ppo"):
            cfg["data"]["path"] = paths["rl"]
            if cfg["data"].get("eval_path"):
                cfg["data"]["eval_path"] = paths["rl"]
            if r is not None:
                cfg["rewards"] = [{"name": r.verifier, "options": r.options}]
                cfg["max_completion_length"] = r.answer_tokens
                if r.rl_steps:
                    cfg["train"]["steps"] = r.rl_steps
                    cfg["eval_every"] = min(cfg.get("eval_every", r.rl_steps), r.rl_steps // 2)
                if r.rl_lr:
                    cfg["optim"] = {**cfg.get("optim", {}), "lr": r.rl_lr}
        if stage.get("make_pairs"):
            stage["make_pairs"]["data"] = paths["rl"]
            if r is not None:
                stage["make_pairs"].update(verifier=r.verifier, max_new_tokens=r.answer_tokens)
    return data


def use_seed(data: dict, seed: int) -> dict:
    """Every stage's train.seed (data order, initialization, sampling, the drawn training rows)."""
    for stage in data["stages"]:
        stage["config"].setdefault("train", {})["seed"] = seed
    return data


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers like 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct seeds")
    return seeds


# ---------------------------------------------------------------------------------------------
# Tables


def _stage(summary: dict, recipe: str) -> dict | None:
    found = [e for e in summary["stages"] if e["recipe"] == recipe]
    return found[-1] if found else None


def _before(summary: dict, entry: dict) -> dict | None:
    i = summary["stages"].index(entry)
    return summary["stages"][i - 1] if i > 0 else None


def _pct(ev: dict) -> str:
    lo, hi = ev["greedy_ci"]
    return f"{100 * ev['greedy_accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def seed_row(seed: int, summary: dict) -> dict:
    """One row of the per-seed table: accuracy after SFT, DPO and GRPO, and GRPO's gain over its start."""
    grpo = _stage(summary, "grpo")
    start = _before(summary, grpo) if grpo else None
    sft, dpo = _stage(summary, "sft"), _stage(summary, "preference")
    row = {"seed": seed, "seconds": sum(e.get("seconds", 0.0) for e in summary["stages"])}
    for name, e in (("sft", sft), ("dpo", dpo), ("grpo", grpo)):
        if e is not None:
            row[name] = e["eval"]["greedy_accuracy"]
            row[name + "_ci"] = list(e["eval"]["greedy_ci"])
            row[name + "_text"] = _pct(e["eval"])
    if grpo and start:
        row["grpo_gain"] = grpo["eval"]["greedy_accuracy"] - start["eval"]["greedy_accuracy"]
        # Significant: the two 95% intervals do not overlap.
        row["grpo_significant"] = grpo["eval"]["greedy_ci"][0] > start["eval"]["greedy_ci"][1]
    if sft and dpo:
        row["dpo_gain"] = dpo["eval"]["greedy_accuracy"] - sft["eval"]["greedy_accuracy"]
    base = (grpo or {}).get("eval", {}).get("majority_baseline")
    if base is not None:
        row["majority_baseline"] = base
    return row


def seed_table(rows: list[dict], target: float = 0.15) -> str:
    """A markdown table (the README shows it) with a verdict per seed."""
    out = ["| seed | SFT | DPO (gain) | GRPO | GRPO gain over its start | time |", "|---|---|---|---|---|---|"]
    for r in rows:
        gain = r.get("grpo_gain")
        verdict = (
            ""
            if gain is None
            else (
                f" ({'met' if gain >= target - 1e-9 else 'NOT met'}; "
                f"{'intervals apart' if r.get('grpo_significant') else 'intervals overlap'})"
            )
        )
        dpo = f"{r.get('dpo_text', '—')} ({100 * r['dpo_gain']:+.1f})" if "dpo_gain" in r else r.get("dpo_text", "—")
        out.append(
            f"| {r['seed']} | {r.get('sft_text', '—')} | {dpo} | {r.get('grpo_text', '—')} | "
            f"{'—' if gain is None else f'{100 * gain:+.1f}'}{verdict} | {r['seconds'] / 60:.1f} min |"
        )
    gains = [r["grpo_gain"] for r in rows if "grpo_gain" in r]
    if gains:
        mean = sum(gains) / len(gains)
        apart = all(r.get("grpo_significant") for r in rows if "grpo_gain" in r)
        out.append(
            f"\nGRPO gain: mean {100 * mean:+.1f} points, min {100 * min(gains):+.1f} over {len(gains)} seed(s); "
            f"target >= {100 * target:.0f} on every seed: {'met' if min(gains) >= target - 1e-9 else 'NOT met'}; "
            f"significant (95% intervals apart) on every seed: {'yes' if apart else 'no'}."
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The dynamic-sampling ablation


def generated_tokens(metrics: list[dict], prompts_per_step: int, num_generations: int) -> float:
    """Completion tokens a GRPO run generated: per step, rounds x P x G samples at the step's mean length."""
    return sum(
        m.get("gen_rounds", 1) * prompts_per_step * num_generations * m["completion_len/mean"]
        for m in metrics
        if "completion_len/mean" in m
    )


def ablation_config(grpo_cfg: Any, metrics: list[dict], out_dir: Path) -> Any:
    """Dynamic sampling off at the same generation budget: with it on, a step generates rounds x P groups
    and trains on the P that vary; off, a step generates (and trains on) that many groups at once, so both
    runs spend the same generated tokens per step, over the same steps and learning-rate schedule."""
    rounds = sum(m.get("gen_rounds", 1) for m in metrics) / max(1, len(metrics))
    prompts = max(1, round(rounds * grpo_cfg.prompts_per_step))
    return replace(
        grpo_cfg,
        dynamic_sampling=False,
        prompts_per_step=prompts,
        train=replace(grpo_cfg.train, output_dir=str(out_dir)),
    )


def run_ablation(pipeline_dir: Path, cfg: Any) -> dict:
    """Re-run the pipeline's last GRPO stage with dynamic sampling off at an equal generation budget;
    evaluate it like the stages. Written to ``ablations.json`` (skipped when already complete)."""
    base = next(p for p in reversed(plan(cfg)) if p.recipe == "grpo" and not p.control_of)
    out = pipeline_dir / "controls" / f"{base.name}_no_dynamic_sampling"
    on_metrics = read_metrics(base.dir)
    abl_cfg = ablation_config(base.cfg, on_metrics, out)
    eval_file = out / "eval.json"
    if not (is_complete(out / "final") and eval_file.exists()):
        log.info("ablation: %s with dynamic_sampling off, %d prompts per step", base.name, abl_cfg.prompts_per_step)
        grpo.train(abl_cfg)
        atomic_write_json(eval_file, evaluate_stage_model(str(out / "final"), cfg))
    ev = json.loads(eval_file.read_text())
    on_eval = json.loads((base.dir / "eval.json").read_text())
    result = {
        "name": out.name,
        "of": base.name,
        "dir": str(out.relative_to(pipeline_dir)),
        "what": "dynamic_sampling off, same generated tokens per step",
        "on": {
            "eval": on_eval,
            "dynamic_sampling": True,
            "prompts_per_step": base.cfg.prompts_per_step,
            "generated_tokens": generated_tokens(on_metrics, base.cfg.prompts_per_step, base.cfg.num_generations),
        },
        "off": {
            "eval": ev,
            "dynamic_sampling": False,
            "prompts_per_step": abl_cfg.prompts_per_step,
            "generated_tokens": generated_tokens(read_metrics(out), abl_cfg.prompts_per_step, abl_cfg.num_generations),
        },
    }
    atomic_write_json(pipeline_dir / "ablations.json", [result])
    return result


def evidence_lines(summary: dict, ablation: dict | None) -> list[str]:
    """Control and ablation figures as printable lines."""
    lines = []
    grpo = _stage(summary, "grpo")
    start = _before(summary, grpo) if grpo else None
    for c in summary.get("controls", []):
        if grpo is None:
            continue
        gain = grpo["eval"]["greedy_accuracy"] - c["eval"]["greedy_accuracy"]
        apart = grpo["eval"]["greedy_ci"][0] > c["eval"]["greedy_ci"][1]
        moved = (
            f", the control moved {100 * (c['eval']['greedy_accuracy'] - start['eval']['greedy_accuracy']):+.1f}"
            if start
            else ""
        )
        lines.append(
            f"{grpo['name']} {_pct(grpo['eval'])} vs {c['name']} {_pct(c['eval'])}: real reward over the "
            f"control {100 * gain:+.1f} points{moved} (95% intervals {'apart' if apart else 'overlap'})"
        )
    if ablation:
        on, off = ablation["on"], ablation["off"]
        d = on["eval"]["greedy_accuracy"] - off["eval"]["greedy_accuracy"]
        lines.append(
            f"dynamic sampling on {_pct(on['eval'])} ({on['generated_tokens'] / 1e6:.2f}M generated tokens) vs "
            f"off {_pct(off['eval'])} ({off['generated_tokens'] / 1e6:.2f}M, {off['prompts_per_step']} "
            f"prompts per step): {100 * d:+.1f} points for dynamic sampling"
        )
    return lines
