"""Presets and budgets: what the tiny model presets learn, in how long, on a built-in task.

    .venv/bin/python benchmarks/presets.py --preset tiny --budget demo      # the demo as shipped (~10 min)
    .venv/bin/python benchmarks/presets.py --preset small --budget short    # another preset, a shorter budget
    .venv/bin/python benchmarks/presets.py --table runs/presets/*           # the markdown table of finished runs

Each run is the pipeline `posttrain demo --task TASK` runs (pretrain -> SFT -> DPO -> GRPO), with the
pretraining stage's model preset swapped (`tiny`, `small`, `medium`: models/tiny.py) and, with
`--budget short`, fewer steps: pretrain 1000 (of 4000), SFT 300 (of 600), no DPO stage, GRPO 50 (of the
task's 200 or 600), greedy evaluation only. The pipeline is written to OUTPUT/pipeline.yaml and run as
`posttrain pipeline OUTPUT/pipeline.yaml` (printed before it runs; re-running resumes). The table reads
each run's pipeline.json: held-out greedy accuracy after SFT and after GRPO, and the wall time of all stages
(training, making pairs and the evaluation after each stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

PRESETS = ("tiny", "small", "medium")
SHORT = {"pretrain": 1000, "sft": 300, "grpo": 50}  # steps of each stage in the short budget


def pipeline_data(task: str, preset: str, budget: str, output: str) -> dict:
    """The demo's pipeline for ``task`` (plain data, as `posttrain demo --task` builds it) with the
    pretraining stage's preset and, for the short budget, the steps of SHORT and no DPO stage."""
    from posttrain.commands.demo import demo_config
    from posttrain.pipeline.evidence import use_task

    data = use_task(demo_config(False, output), task)
    stages = {s["name"]: s for s in data["stages"]}
    stages["pretrain"]["config"]["model"] = preset
    if budget == "short":
        data["stages"] = [s for s in data["stages"] if s["recipe"] != "preference"]
        data["eval"]["k"] = 0
        for name, steps in SHORT.items():
            stages[name]["config"]["train"]["steps"] = steps
        grpo = stages["grpo"]["config"]
        grpo.update(eval_every=0, eval_k=0)  # its own held-out check once, at the end, greedy only
        grpo["train"]["save_every"] = SHORT["grpo"]
    return data


class _PlainDumper(yaml.SafeDumper):
    """Writes a value used twice (the verifier options) twice, not as a YAML anchor and alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def parameters(preset: str) -> int:
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    return sum(p.numel() for p in build_tiny_model(preset, build_tokenizer("char")).parameters())


def _pct(ev: dict) -> str:
    lo, hi = ev["greedy_ci"]
    return f"{100 * ev['greedy_accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(dirs: list[Path]) -> str:
    out = [
        "| preset | parameters | task | steps (pretrain / SFT / DPO / GRPO) | time | SFT held-out | GRPO held-out |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in dirs:
        meta = json.loads((d / "preset.json").read_text())
        summary = json.loads((d / "pipeline.json").read_text())
        by_recipe = {e["recipe"]: e for e in summary["stages"]}
        steps = {s["recipe"]: s["config"]["train"]["steps"] for s in summary["config"]["stages"]}
        budget = " / ".join(str(steps.get(r, "-")) for r in ("pretrain", "sft", "preference", "grpo"))
        minutes = sum(e["seconds"] for e in summary["stages"]) / 60
        sft, grpo = by_recipe.get("sft"), by_recipe.get("grpo")
        out.append(
            f"| {meta['preset']} | {meta['parameters'] / 1e6:.2f}M | {meta['task']} | {budget} | {minutes:.1f} min | "
            f"{_pct(sft['eval']) if sft else '-'} | {_pct(grpo['eval']) if grpo else '-'} |"
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="extraction", help="a built-in demo task (posttrain demo --task)")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--budget", default="demo", choices=("demo", "short"))
    p.add_argument("--output", default="", help="pipeline directory (default runs/presets/TASK-PRESET-BUDGET)")
    p.add_argument("--table", nargs="*", default=None, help="print the table of these finished run directories")
    a = p.parse_args(argv)
    if a.table is not None:
        print(table([Path(d) for d in a.table]))
        return 0
    out = Path(a.output or f"runs/presets/{a.task}-{a.preset}-{a.budget}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(
        yaml.safe_dump(pipeline_data(a.task, a.preset, a.budget, str(out)), sort_keys=False)
    )
    meta = {"task": a.task, "preset": a.preset, "budget": a.budget, "parameters": parameters(a.preset)}
    (out / "preset.json").write_text(json.dumps(meta) + "\n")
    print(f"$ posttrain pipeline {out / 'pipeline.yaml'}", flush=True)

    from posttrain.commands.main import main as posttrain

    code = posttrain(["pipeline", str(out / "pipeline.yaml")])
    if code == 0:
        print(table([out]))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
