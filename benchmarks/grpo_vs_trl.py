"""posttrain's GRPO recipe vs TRL's GRPOTrainer: steps/s, generated tokens/s, peak memory.

Run (2-core CPU defaults, ~2-3 minutes):
    .venv/bin/python benchmarks/grpo_vs_trl.py
With vLLM generating (an environment that has it, e.g. `make install-vllm` + `pip install trl`):
    .venv-vllm/bin/python benchmarks/grpo_vs_trl.py --engine native,vllm --trl-engine generate,vllm
GPU, ~0.5B Qwen2 shape with a real-size vocabulary:
    .venv/bin/python benchmarks/grpo_vs_trl.py --preset qwen2-0.5b --arch qwen2 --vocab-size 151936 \\
        --device cuda --dtype bfloat16 --prompts 16 --generations 8 --max-completion-length 256

Same work on both sides, per optimizer step:
  - the same model directory (weights, config, tokenizer), built once from posttrain.models.tiny;
  - the same prompts in the same order (builtin arithmetic task rows, no shuffling);
  - P prompts x G samples generated once on the training device, temperature 1, top-p 1, up to
    max_completion_length new tokens, stop at EOS: by posttrain's native KV-cache engine or TRL's
    transformers `generate` by default; with `--engine vllm` / `--trl-engine vllm` by a colocated
    vLLM (posttrain `rollout_engine=vllm`; TRL `use_vllm=True, vllm_mode="colocate"`), which then
    gets the updated weights after every step;
  - the same cheap reward (bench_common.digit_reward, a pure-Python digit fraction: the verifier is
    not what is measured);
  - one forward + backward over all P*G sequences and one AdamW step: DAPO loss -- token-level
    aggregation over the step (TRL loss_type="dapo"; posttrain aggregation=token_mean), clip
    eps_low 0.2 / eps_high 0.28 (TRL epsilon / epsilon_high), beta 0 (no reference model), one
    update per generation (mu = 1: TRL num_iterations=1, posttrain num_iterations=1), so neither
    makes an old-log-prob pass. Group-std advantages on both sides.
  TRL batching: per_device_train_batch_size = P*G, gradient_accumulation_steps = 1,
  steps_per_generation = 1, hence generation_batch_size = P*G: every optimizer step generates its own
  P*G completions exactly once, like posttrain (TRL would otherwise generate one batch for
  steps_per_generation optimizer steps). gradient_checkpointing is off on both (TRL's default is on).

Measurement: each run is a fresh subprocess (clean peak-memory high-water mark, no shared caches);
runs alternate posttrain / TRL for --rounds rounds (order swapped every round), and the summary gives
medians. Steady-state time = wall clock from the end of step --warmup to the end of the last step
(so it includes every per-step overhead -- logging, reward, collation -- but not model loading or
the final save). Generated tokens = completion tokens including EOS, as each trainer produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

TARGET_SPEEDUP = 2.0
TARGET_MEMORY = 0.8


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="posttrain.models.tiny preset (tiny|small|medium|qwen2-0.5b)")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="pad the char tokenizer's vocab to this size (0: ~105 tokens; Qwen2 has 151936)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", "-P", type=int, default=8, help="P: prompts per step")
    ap.add_argument("--generations", "-G", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    ap.add_argument("--rounds", type=int, default=5, help="runs per trainer (alternating)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, the same for both (0: torch's default). 1 by default: on a shared 2-core "
        "machine two spinning OpenMP threads per process made steps 5-50x slower and erratic",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra posttrain GRPO config override (repeatable), e.g. padding_free=false",
    )
    ap.add_argument("--only", choices=["posttrain", "trl"], help="run one side only")
    ap.add_argument(
        "--engine",
        default="native",
        help="posttrain's rollout engine(s), comma-separated: native, vllm (each a side of its own)",
    )
    ap.add_argument(
        "--trl-engine",
        default="generate",
        help="TRL's generation, comma-separated: generate (transformers), vllm (use_vllm colocate)",
    )
    ap.add_argument("--json", help="write all runs and the summary here")
    ap.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Workers: one run of one trainer, in its own process.


def _uses_vllm(a) -> bool:
    return "vllm" in a.engine.split(",") + a.trl_engine.split(",")


def _import_everything(a):
    """Every worker imports the same modules before the memory baseline, so baselines are equal
    (vllm too when any side of the comparison uses it)."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from posttrain.recipes import grpo  # noqa: F401

    if _uses_vllm(a):
        import vllm  # noqa: F401


def run_posttrain(a, run_dir: Path) -> dict:
    from posttrain.recipes import grpo
    from posttrain.runtime.tracking import read_metrics

    cfg = bc.grpo_bench_config(a, a.model_dir, run_dir)
    if a.engine == "vllm":
        from dataclasses import replace

        cfg = replace(cfg, rollout_engine="vllm")
    grpo.train(cfg)
    m = read_metrics(run_dir)
    timed = m[a.warmup :]
    seconds = m[-1]["wall_time"] - m[a.warmup - 1]["wall_time"] if a.warmup else m[-1]["wall_time"]
    seqs = a.prompts * a.generations
    tokens = sum(r["completion_len/mean"] * seqs for r in timed)
    split = {k: sum(r[f"time/{k}"] for r in timed) / len(timed) for k in ("generate", "reward", "logps", "update")}
    return {
        "seconds": seconds,
        "tokens": tokens,
        "split": split,
        "reward": sum(r["reward/mean"] for r in timed) / len(timed),
    }


def run_trl(a, run_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models.loading import load_tokenizer
    from posttrain.tasks import get_task

    total = a.warmup + a.steps
    rows = get_task("arithmetic").rows(a.prompts * total)
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    counted = {"tokens": [], "rewards": []}

    def digit_reward(completions, completion_ids, **kwargs):
        counted["tokens"].append(sum(len(c) for c in completion_ids))
        out = bc.digit_reward(completions)
        counted["rewards"].append(sum(out) / len(out))
        return out

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            bc.sync(a.device)
            self.ends.append(time.perf_counter())

    cuda = a.device.startswith("cuda")
    bf16 = a.dtype == "bfloat16"
    args = GRPOConfig(
        **bc.trl_dapo_args(
            output_dir=str(run_dir),
            max_steps=total,
            per_device_train_batch_size=a.prompts * a.generations,
            num_generations=a.generations,
            max_completion_length=a.max_completion_length,
            learning_rate=a.lr,
            bf16=bf16,
            fp16=False,
            use_cpu=not cuda,
            seed=a.seed,
            model_init_kwargs={"dtype": getattr(torch, a.dtype)},
            **({"use_vllm": True, "vllm_mode": "colocate"} if a.trl_engine == "vllm" else {"use_vllm": False}),
        )
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=a.model_dir,
        reward_funcs=digit_reward,
        args=args,
        train_dataset=data,
        processing_class=load_tokenizer(a.model_dir),
        callbacks=[clock],
    )
    trainer.train()
    ends = clock.ends
    seconds = ends[-1] - ends[a.warmup - 1] if a.warmup else None
    return {
        "seconds": seconds,
        "tokens": sum(counted["tokens"][a.warmup :]),
        "reward": sum(counted["rewards"][a.warmup :]) / a.steps,
    }


def worker(a) -> None:
    bc.set_threads(a.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if _uses_vllm(a):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process, so RSS counts it
    _import_everything(a)
    mem = bc.PeakMemory(a.device)
    mem.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        res = (run_posttrain if a.worker == "posttrain" else run_trl)(a, Path(d) / "run")
    import posttrain

    res.update(
        mem.stop(),
        total_seconds=time.perf_counter() - t0,
        trainer=a.worker,
        side=_label(a.worker, a.engine if a.worker == "posttrain" else a.trl_engine),
        posttrain_src=str(Path(posttrain.__file__).parent),
    )
    bc.write_json(a.out, res)


# ----------------------------------------------------------------------------------------------
# Driver: alternate fresh-process runs, summarize medians.


def _label(trainer: str, engine: str) -> str:
    return trainer if engine in ("native", "generate") else f"{trainer}+{engine}"


def sides_of(a) -> list[tuple[str, str]]:
    """(trainer, engine) for every side of the comparison, in run order."""
    out = [("posttrain", e) for e in a.engine.split(",")] + [("trl", e) for e in a.trl_engine.split(",")]
    bad = [e for t, e in out if e not in (("native", "vllm") if t == "posttrain" else ("generate", "vllm"))]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}: --engine takes native,vllm; --trl-engine generate,vllm")
    return [s for s in out if not a.only or s[0] == a.only]


def spawn(a, side: tuple[str, str], model_dir: Path, out: Path) -> dict:
    which, engine = side
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        which,
        "--model-dir",
        str(model_dir),
        "--out",
        str(out),
        "--engine",
        engine if which == "posttrain" else a.engine,
        "--trl-engine",
        engine if which == "trl" else a.trl_engine,
    ]
    for k in (
        "preset",
        "arch",
        "device",
        "dtype",
        "prompts",
        "generations",
        "max_completion_length",
        "steps",
        "warmup",
        "lr",
        "threads",
        "seed",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    for kv in a.set:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, env=bc.child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{which} run failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def summarize(a, runs: list[dict]) -> dict:
    seqs = a.prompts * a.generations
    out = {}
    for which in dict.fromkeys(r["side"] for r in runs):
        rs = [r for r in runs if r["side"] == which]
        if not rs:
            continue
        out[which] = {
            "steps_per_s": bc.median([a.steps / r["seconds"] for r in rs]),
            "tokens_per_s": bc.median([r["tokens"] / r["seconds"] for r in rs]),
            "seqs_per_s": bc.median([a.steps * seqs / r["seconds"] for r in rs]),
            "peak_mem_mb": bc.median([r["delta_bytes"] / 2**20 for r in rs]),
            "all_steps_per_s": [round(a.steps / r["seconds"], 4) for r in rs],
            "all_peak_mem_mb": [round(r["delta_bytes"] / 2**20, 1) for r in rs],
            "mean_completion_len": bc.median([r["tokens"] / (a.steps * seqs) for r in rs]),
        }
        if rs[0]["trainer"] == "posttrain":
            out[which]["split_s"] = {k: bc.median([r["split"][k] for r in rs]) for k in rs[0]["split"]}
    # posttrain vs TRL with the same kind of generation; and each side's vLLM against its own default.
    for p, t, key in (
        ("posttrain", "trl", "ratios"),
        ("posttrain+vllm", "trl+vllm", "ratios_vllm"),
        ("posttrain+vllm", "posttrain", "vllm_vs_native"),
        ("trl+vllm", "trl", "trl_vllm_vs_generate"),
    ):
        if p in out and t in out:
            out[key] = {
                "steps_per_s": out[p]["steps_per_s"] / out[t]["steps_per_s"],
                "tokens_per_s": out[p]["tokens_per_s"] / out[t]["tokens_per_s"],
                "peak_mem": out[p]["peak_mem_mb"] / out[t]["peak_mem_mb"],
            }
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    if a.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step pays one-off costs on both sides)")
    sides = sides_of(a)
    print(f"machine: {bc.machine()}; load average {bc.load_average()}")
    print(
        f"preset={a.preset} arch={a.arch} vocab={a.vocab_size or 'char'} device={a.device} dtype={a.dtype} "
        f"P={a.prompts} G={a.generations} max_completion_length={a.max_completion_length} "
        f"steps={a.steps} (+{a.warmup} warmup) rounds={a.rounds} threads={a.threads or 'default'}"
        + (f" posttrain overrides: {' '.join(a.set)}" if a.set else "")
        + f" sides: {', '.join(_label(*s) for s in sides)}"
    )
    runs = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = bc.build_model_dir(Path(d) / "model", a.preset, a.arch, a.vocab_size, a.seed)
        for r in range(a.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                res = spawn(a, side, model_dir, Path(d) / f"{_label(*side)}-{r}.json")
                runs.append(res)
                print(
                    f"  round {r + 1} {res['side']:14s}: {a.steps / res['seconds']:.3f} steps/s, "
                    f"{res['tokens'] / res['seconds']:.0f} tok/s, peak +{res['delta_bytes'] / 2**20:.0f} MiB, "
                    f"run {res['total_seconds']:.1f}s",
                    flush=True,
                )
    s = summarize(a, runs)
    print(f"\nmedians over {a.rounds} runs each (load average now {bc.load_average()}):")
    for which in (_label(*side) for side in sides):
        x = s[which]
        print(
            f"  {which:14s}: {x['steps_per_s']:.3f} steps/s  {x['tokens_per_s']:.0f} generated tok/s  "
            f"peak memory +{x['peak_mem_mb']:.0f} MiB  (mean completion {x['mean_completion_len']:.1f} tokens)"
        )
        if "split_s" in x:
            print(f"  {which} step split (s): " + ", ".join(f"{k} {v:.3f}" for k, v in x["split_s"].items()))
    for key, title in (
        ("ratios", "posttrain / TRL"),
        ("ratios_vllm", "posttrain+vllm / TRL+vllm"),
        ("vllm_vs_native", "posttrain+vllm / posttrain"),
        ("trl_vllm_vs_generate", "TRL+vllm / TRL"),
    ):
        if key in s:
            r = s[key]
            targets = f" (target >= {TARGET_SPEEDUP})" if key == "ratios" else ""
            print(
                f"  {title}: steps/s x{r['steps_per_s']:.2f}{targets}, tokens/s x{r['tokens_per_s']:.2f}, "
                f"peak memory x{r['peak_mem']:.2f}" + (f" (target <= {TARGET_MEMORY})" if key == "ratios" else "")
            )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs, "summary": s}, indent=2))


if __name__ == "__main__":
    main()
