"""Learning that holds up: the demo over seeds, on a second task, and with its controls.

    .venv/bin/python benchmarks/learning.py                        # everything below (~1 h on 2 loaded cores)
    .venv/bin/python benchmarks/learning.py --parts seeds          # arithmetic, seeds 0,1,2: the per-seed table
    .venv/bin/python benchmarks/learning.py --parts counting       # the same recipe on the counting task
    .venv/bin/python benchmarks/learning.py --parts evidence       # random-reward control + dynamic-sampling
                                                                   # ablation of the arithmetic seed-0 pipeline

Each part is `posttrain demo` with flags (printed before it runs), so re-running resumes: finished stages
are skipped and the tables are rebuilt from the run directories. At the end the tables are printed as
markdown (per-seed table, DPO before/after, the counting table, control and ablation), ready for
benchmarks/RESULTS.md; `--write FILE` also saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PARTS = ("seeds", "counting", "evidence")


def _demo(args: list[str]) -> None:
    from posttrain.commands.demo import main

    print("$ posttrain demo " + " ".join(args), flush=True)
    if main(args) != 0:
        raise SystemExit(f"posttrain demo {' '.join(args)} failed")


def _pct(ev: dict) -> str:
    lo, hi = ev["greedy_ci"]
    return f"{100 * ev['greedy_accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def dpo_table(root: Path, seeds: list[int]) -> str:
    out = [
        "| seed | SFT | DPO | change | chosen log-prob (first -> last step) | rejected log-prob |",
        "|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        summary = json.loads((root / f"seed{seed}" / "pipeline.json").read_text())
        stages = {e["recipe"]: e for e in summary["stages"]}
        sft, dpo = stages["sft"], stages["preference"]
        m = [json.loads(x) for x in (root / f"seed{seed}" / dpo["dir"] / "metrics.jsonl").read_text().splitlines()]
        out.append(
            f"| {seed} | {_pct(sft['eval'])} | {_pct(dpo['eval'])} | "
            f"{100 * (dpo['eval']['greedy_accuracy'] - sft['eval']['greedy_accuracy']):+.1f} | "
            f"{m[0]['logps/chosen']:.2f} -> {m[-1]['logps/chosen']:.2f} | "
            f"{m[0]['logps/rejected']:.2f} -> {m[-1]['logps/rejected']:.2f} |"
        )
    return "\n".join(out)


def stage_table(pipeline_dir: Path) -> str:
    summary = json.loads((pipeline_dir / "pipeline.json").read_text())
    out = ["| stage | greedy accuracy [95% CI] | pass@4 | majority baseline | time |", "|---|---|---|---|---|"]
    for e in summary["stages"] + summary.get("controls", []):
        ev = e["eval"]
        base = ev.get("majority_baseline")
        out.append(
            f"| {e['name']} | {_pct(ev)} | {100 * ev['pass_at_k']:.1f} | "
            f"{'—' if base is None else f'{100 * base:.1f}'} | {e['seconds']:.0f} s |"
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--root", default="runs/learning", help="run directories go under ROOT/arithmetic, ROOT/counting")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--counting-seeds", default="1")
    p.add_argument("--write", default="", help="also write the markdown here")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    if any(x not in PARTS for x in parts):
        p.error(f"--parts: choose from {', '.join(PARTS)}")
    root = Path(a.root)
    arith, count = root / "arithmetic", root / "counting"
    seeds = [int(s) for s in a.seeds.split(",")]
    if "seeds" in parts:
        _demo(["--seeds", a.seeds, "--output", str(arith)])
    if "counting" in parts:
        _demo(["--task", "counting", "--seeds", a.counting_seeds, "--output", str(count)])
    if "evidence" in parts:
        _demo(["--seed", str(seeds[0]), "--evidence", "--output", str(arith / f"seed{seeds[0]}")])

    from posttrain.pipeline.evidence import evidence_lines

    md = []
    if (arith / "seeds.md").exists():
        md += [
            f"### Arithmetic, seeds {a.seeds} (`posttrain demo --seeds {a.seeds}`)",
            "",
            (arith / "seeds.md").read_text().strip(),
            "",
            "DPO before/after (chosen and rejected log-probs of the training pairs, mean over a step):",
            "",
            dpo_table(arith, seeds),
            "",
        ]
    if (count / "seeds.md").exists():
        md += [
            f"### Counting, seeds {a.counting_seeds} (`posttrain demo --task counting --seeds {a.counting_seeds}`)",
            "",
            (count / "seeds.md").read_text().strip(),
            "",
        ]
        for s in a.counting_seeds.split(","):
            md += [f"seed {s}, every stage:", "", stage_table(count / f"seed{s}"), ""]
    ev_dir = arith / f"seed{seeds[0]}"
    if (ev_dir / "ablations.json").exists():
        summary = json.loads((ev_dir / "pipeline.json").read_text())
        ablation = json.loads((ev_dir / "ablations.json").read_text())[0]
        md += [f"### Controls (`posttrain demo --seed {seeds[0]} --evidence`)", ""]
        md += [f"- {line}" for line in evidence_lines(summary, ablation)] + [""]
    text = "\n".join(md)
    print(text)
    if a.write:
        Path(a.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
