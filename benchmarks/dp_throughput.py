"""Data-parallel throughput: the same recipe and global batch on 1 process and on N processes (torchrun,
gloo on CPU / NCCL on GPU), steady-state steps/s and the ratio.

    .venv/bin/python benchmarks/dp_throughput.py                      # sft and grpo, small preset, 1 vs 2
    .venv/bin/python benchmarks/dp_throughput.py --recipes grpo --nproc 2 --steps 12

Each run is a fresh process group; the step time is the median of the recipe's own ``step_time`` after the
first (warm-up) steps. On the 2-core development machine two processes share the two cores with each
other (and with anything else running), so expect well under 2x; the figure is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

COMMON = ["train.progress=false", "optim.lr=1e-4", "optim.schedule=constant", "train.resume=never"]
RECIPES = {
    # global batch: micro_batch_size x grad_accum x world = 32 sequences
    "sft": lambda world, steps: [
        "sft",
        *COMMON,
        "data.path=builtin:arithmetic",
        "data.num_examples=2000",
        "data.max_length=64",
        "train.micro_batch_size=16",
        f"train.grad_accum={2 // world}",
        f"train.steps={steps}",
        "data.eval_fraction=0",
    ],
    # P x G = 8 x 8 per step, whole groups split over the ranks
    "grpo": lambda world, steps: [
        "grpo",
        *COMMON,
        "data.path=builtin:arithmetic",
        "data.num_examples=2000",
        "data.max_length=96",
        "rewards=[bench_common:digit_reward]",
        "prompts_per_step=8",
        "num_generations=8",
        "max_completion_length=32",
        "train.micro_batch_size=64",
        "samples_every=0",
        f"train.steps={steps}",
    ],
}


def run(recipe: str, nproc: int, steps: int, preset: str, out: Path, threads: int) -> dict:
    args = [*RECIPES[recipe](nproc, steps), f"model={preset}", f"train.output_dir={out}", f"train.threads={threads}"]
    cmd = (
        [sys.executable, "-m", "posttrain", *args]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "posttrain",
            *args,
        ]
    )
    t0 = time.time()
    proc = subprocess.run(cmd, env=bc.child_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{recipe} x{nproc} failed:\n{proc.stderr[-3000:]}")
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in m[2:]] or [r["step_time"] for r in m]
    return {"recipe": recipe, "nproc": nproc, "step_time_s": statistics.median(times), "wall_s": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="sft,grpo")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dp_") as d:
        for recipe in a.recipes.split(","):
            one = run(recipe, 1, a.steps, a.preset, Path(d) / f"{recipe}-1", a.threads)
            many = run(recipe, a.nproc, a.steps, a.preset, Path(d) / f"{recipe}-{a.nproc}", a.threads)
            rows.append((recipe, one, many))
    print(f"{bc.machine()}; load {bc.load_average()}; preset {a.preset}; {a.threads} thread(s) per process\n")
    print(f"| recipe | 1 process s/step | {a.nproc} processes s/step | speed-up |")
    print("|---|---|---|---|")
    for recipe, one, many in rows:
        print(
            f"| {recipe} | {one['step_time_s']:.3f} | {many['step_time_s']:.3f} | "
            f"x{one['step_time_s'] / many['step_time_s']:.2f} |"
        )
    if a.json:
        bc.write_json(a.json, {"rows": [{"one": o, "many": m} for _, o, m in rows], "machine": bc.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
