"""The article's comparison, measured: GRPO (beta = 0, and beta > 0) against PPO with a critic and a reward
model, on the same policy, prompts, P x G completions and token budget.

Run (2-core CPU defaults: the ~25M-parameter `base` shape, ~5 minutes):
    .venv/bin/python benchmarks/grpo_vs_ppo.py
With the RLHF demo's trained models (accuracy then means something; tiny shape):
    .venv/bin/posttrain demo --rlhf
    .venv/bin/python benchmarks/grpo_vs_ppo.py --policy runs/demo-rlhf/stages/02_sft/final \\
        --reward-model runs/demo-rlhf/stages/03_rm/final --steps 100 --eval 200
GPU: add --device cuda --dtype bfloat16 --threads 0 (and a bigger --preset / --policy).

The three runs, each a fresh subprocess running posttrain's own recipe:
  (a) grpo     GRPO, beta = 0: the policy is the only model held (DAPO settings, one update per rollout)
  (b) grpo_kl  GRPO, beta = 0.04, k3 in the loss: + a frozen reference model
  (c) ppo      PPO: the policy, a frozen reference (beta = 0.05, k1 in the reward), a reward model and a
               critic initialised from it (a second trained model with its own AdamW); one epoch, one
               mini-batch: one policy update per rollout, like (a) and (b)
Same for all: the model directory, prompts (builtin arithmetic, no shuffling), P x G samples per step,
max_completion_length, one micro-batch of P*G sequences, AdamW, lr, seed. The reward: GRPO scores with
a program (--reward; default the cheap digit fraction of bench_common, so every group varies and every
step updates; `math` with a trained policy), PPO with the reward model -- the article's contrast.

Measured per run (the recipes' own `memory/*` metrics, posttrain.runtime.memory): models held; exact bytes of
weights, gradients (one per trainable parameter) and optimizer state; the peak (CUDA max allocated, or
CPU peak resident set) above the process's memory before the models were loaded, and the activations
as that peak minus the rest; median step time after --warmup steps; held-out greedy accuracy at the end
(--eval N rows). Target from the article ("cutting the memory footprint roughly in half"): GRPO beta=0's
peak <= 0.55x PPO's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

TARGET_RATIO = 0.55
VARIANTS = ("grpo", "grpo_kl", "ppo")
PARTS = ("weights", "grads", "optimizer", "activations")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="base", help="posttrain.models.tiny preset for a random policy")
    ap.add_argument("--policy", default="", help="a trained policy directory instead of a random preset")
    ap.add_argument(
        "--reward-model",
        default="",
        help="a trained reward model directory (default: the policy's backbone with a random head)",
    )
    ap.add_argument("--reward", default="bench_common:digit_reward", help="GRPO's programmatic reward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", "-P", type=int, default=8)
    ap.add_argument("--generations", "-G", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the step-time median")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eval", type=int, default=0, help="held-out rows for the final greedy accuracy (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=VARIANTS, action="append", help="run these variants only (repeatable)")
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--policy-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rm-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def variant_config(a, variant: str, run_dir: Path):
    from posttrain.config import GRPOConfig, PPOConfig, config_from_dict

    common = [
        f"model.path={a.policy_dir}",
        f"model.device={a.device}",
        f"model.dtype={a.dtype}",
        "data.path=builtin:arithmetic?max_terms=5",
        f"data.num_examples={a.prompts * a.steps}",
        f"data.max_length={32 + a.max_completion_length}",
        "data.shuffle=false",
        f"prompts_per_step={a.prompts}",
        f"num_generations={a.generations}",
        f"max_completion_length={a.max_completion_length}",
        f"optim.lr={a.lr}",
        "optim.schedule=constant",
        f"train.micro_batch_size={a.prompts * a.generations}",
        f"train.steps={a.steps}",
        f"train.seed={a.seed}",
        f"train.output_dir={run_dir}",
        "train.progress=false",
        "train.log_every=1000000",
        "samples_every=0",
        "train.resume=never",
        "mask_truncated_completions=false",
    ]
    if a.eval:
        common += ["data.eval_path=builtin:arithmetic?max_terms=5", f"eval_examples={a.eval}"]
    program = f"{{name: '{a.reward}'}}"
    if variant == "ppo":
        rewards = f"[{{name: reward_model, options: {{path: '{a.rm_dir}', device: {a.device}, dtype: {a.dtype}}}}}]"
        if a.eval:  # the gold check first (it defines accuracy), logged only
            rewards = f"[{{name: math, weight: 0}}, {rewards[1:-1]}]"
        return config_from_dict(
            PPOConfig,
            {},
            [
                *common,
                f"rewards={rewards}",
                "critic.init=reward_model",
                f"critic.lr={a.lr}",
                f"critic.dtype={a.dtype}",
                "beta=0.05",
                "kl_estimator=k1",
                "ppo_epochs=1",
                "num_mini_batches=1",
            ],
        )
    beta = "0.04" if variant == "grpo_kl" else "0"
    return config_from_dict(
        GRPOConfig,
        {},
        [
            *common,
            f"rewards=[{program}]",
            f"beta={beta}",
            "kl_estimator=k3",
            "aggregation=token_mean",
            "eps_low=0.2",
            "eps_high=0.28",
            "num_iterations=1",
        ],
    )


def worker(a) -> None:
    bc.set_threads(a.threads)
    import importlib

    import posttrain.recipes  # noqa: F401 -- the same imports before the run for every variant
    from posttrain.runtime.tracking import read_metrics

    run_dir = Path(a.out).with_suffix("")
    cfg = variant_config(a, a.worker, run_dir)
    importlib.import_module(f"posttrain.recipes.{'ppo' if a.worker == 'ppo' else 'grpo'}").train(cfg)
    m = read_metrics(run_dir)
    last = m[-1]
    times = [r["step_time"] for r in m[a.warmup :]] or [r["step_time"] for r in m]
    peak = max(r["memory/peak_mb"] for r in m)
    out = {
        "variant": a.worker,
        "models_held": last["memory/models_held"],
        "peak_mb": peak,
        "peak_above_baseline_mb": peak - last["memory/baseline_mb"],
        "baseline_mb": last["memory/baseline_mb"],
        **{f"{k}_mb": last[f"memory/{k}_mb"] for k in PARTS},
        "step_time_s": bc.median(times),
        "steps": len(m),
        "generated_tokens": sum(r["tokens_per_s"] * r["step_time"] for r in m),
        "eval_accuracy": last.get("eval_accuracy"),
        "reward_mean_last": last["reward/mean"],
        "skipped_updates": sum(r.get("skipped_update", 0) for r in m),
    }
    bc.write_json(a.out, out)


def build_models(a, tmp: Path) -> None:
    """The policy directory (a random preset unless --policy) and the reward model (a one-label classifier
    with the policy's backbone and a random head unless --reward-model), saved once for every run."""
    bc.set_threads(a.threads)
    if not a.policy:
        a.policy = str(bc.build_model_dir(tmp / "policy", a.preset, "llama", seed=a.seed))
    if not a.reward_model:
        from posttrain.config import ModelConfig
        from posttrain.models.scalar import load_scalar

        rm, tok = load_scalar(ModelConfig(path=a.policy, device="cpu"), seed=a.seed)
        rm.save_pretrained(tmp / "rm")
        tok.save_pretrained(tmp / "rm")
        a.reward_model = str(tmp / "rm")


def run_variant(a, variant: str, tmp: Path) -> dict:
    out = tmp / f"{variant}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--policy-dir",
        a.policy,
        "--rm-dir",
        a.reward_model,
        "--out",
        str(out),
        "--reward",
        a.reward,
        "--device",
        a.device,
        "--dtype",
        a.dtype,
        "--prompts",
        str(a.prompts),
        "--generations",
        str(a.generations),
        "--max-completion-length",
        str(a.max_completion_length),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--lr",
        str(a.lr),
        "--eval",
        str(a.eval),
        "--threads",
        str(a.threads),
        "--seed",
        str(a.seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bc.child_env())
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def table(runs: list[dict]) -> str:
    ppo = next((r for r in runs if r["variant"] == "ppo"), None)
    head = ["run", "models", *(f"{k} MB" for k in PARTS), "peak MB", "x PPO", "s/step", "eval acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        ratio = f"{r['peak_above_baseline_mb'] / ppo['peak_above_baseline_mb']:.2f}" if ppo else "-"
        acc = "-" if r["eval_accuracy"] is None else f"{100 * r['eval_accuracy']:.1f}%"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    f"{r['models_held']:.0f}",
                    *(f"{r[f'{k}_mb']:.0f}" for k in PARTS),
                    f"{r['peak_above_baseline_mb']:.0f}",
                    ratio,
                    f"{r['step_time_s']:.2f}",
                    acc,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    variants = a.only or list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="grpo_vs_ppo_") as d:
        tmp = Path(d)
        build_models(a, tmp)
        runs = []
        for v in variants:
            runs.append(run_variant(a, v, tmp))
            print(
                f"{v}: peak {runs[-1]['peak_above_baseline_mb']:.0f} MB above baseline, "
                f"{runs[-1]['step_time_s']:.2f} s/step",
                flush=True,
            )
    print(
        f"\n{bc.machine()}; load {bc.load_average()}; policy {a.policy or a.preset}; P={a.prompts} G={a.generations} "
        f"max_completion_length={a.max_completion_length}; {a.steps} steps; {a.device} {a.dtype}; threads {a.threads}"
    )
    print("peak MB = the run's peak above the process's memory before the models were loaded\n")
    print(table(runs))
    grpo, ppo = (next((r for r in runs if r["variant"] == v), None) for v in ("grpo", "ppo"))
    summary = {}
    if grpo and ppo:
        ratio = grpo["peak_above_baseline_mb"] / ppo["peak_above_baseline_mb"]
        summary = {"grpo_over_ppo_peak": ratio, "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO}
        print(
            f"\nGRPO (beta=0) peak / PPO peak = {ratio:.2f} (target <= {TARGET_RATIO}: "
            f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})"
        )
    if a.json:
        bc.write_json(
            a.json,
            {
                "args": {k: v for k, v in vars(a).items() if k != "worker"},
                "runs": runs,
                "summary": summary,
                "machine": bc.machine(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
