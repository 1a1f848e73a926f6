"""The planner against measured runs: `posttrain plan`'s estimate / the measured memory of the real recipes,
per component and for the peak, at a few shapes.

Run (2-core CPU, ~10 minutes):
    .venv/bin/python benchmarks/plan_check.py
    .venv/bin/python benchmarks/plan_check.py --only grpo-small --only sft-small   # a subset

Each run is a fresh subprocess running posttrain's own recipe (sft, dpo, reward-model, grpo, ppo, on the tiny presets
saved as model directories; two with a 32k vocabulary so the LM head matters; LoRA with a reference,
gradient checkpointing and bfloat16 once each) for 3 optimizer steps.
The worker records, without changing what the recipe does:
  * the shape of every forward that builds a graph (rows B, tokens T, loss positions K), by wrapping the
    recipe's forward entry point; the estimate is computed for the largest of them (the planner's own
    CLI assumes the worst case: every row at full length);
  * at every logged step: the exact bytes of the weights of every live model, of the gradients (one per
    trainable parameter) and of the optimizer state (posttrain.runtime.memory's definitions), and the peak
    resident set size.
What "peak" means on CPU: the process's peak resident set size above its size just before `train`,
minus the same growth of a "null" run: the same recipe, tokenizer, dtype and options on the tiny preset
with a one-row micro-batch (library pages, Python objects, the tokenizer, the data, oneDNN's kernels:
25-100 MB that are not tensors; its own few MB of tensors, as the planner estimates them, are not
counted as overhead). glibc keeps freed tensor pages
in its heap (its mmap threshold rises to 32 MB after the first large free), so the resident set would
count freed activations too; the workers run with MALLOC_MMAP_THRESHOLD_=65536, so every tensor over 64 KiB
is its own mapping and leaves the resident set when freed; and with oneDNN's primitive cache and
ideep's LRU cache off (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0, LRU_CACHE_CAPACITY=1) no kernel code is kept per
distinct matmul shape (a bf16 rollout otherwise adds ~35 MB of them). What remains comparable is the
high-water mark of live tensor bytes, which is what CUDA's max_memory_allocated reports and what the planner
estimates. Ratios are estimate / measured; the target is within 15% (0.85-1.15) for the peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

MB = 1 << 20
STEPS = 3
# name -> (recipe, preset, vocab (0: the char tokenizer's), extra overrides)
RUNS: dict[str, tuple[str, str, int, tuple[str, ...]]] = {
    "sft-small": ("sft", "small", 0, ()),
    "sft-base": ("sft", "base", 0, ()),
    "sft-small-32k": ("sft", "small", 32000, ()),
    "dpo-medium": ("dpo", "medium", 0, ()),
    "dpo-small-ref": ("dpo", "small", 0, ("precompute_ref=false",)),
    "grpo-small": ("grpo", "small", 0, ()),
    "grpo-base": ("grpo", "base", 0, ()),
    "grpo-medium-kl-lora": ("grpo", "medium", 0, ("beta=0.04", "lora.r=8", "optim.lr=1e-4")),
    "grpo-small-32k": ("grpo", "small", 32000, ()),
    "grpo-medium-ckpt": ("grpo", "medium", 0, ("model.gradient_checkpointing=true",)),
    "grpo-small-bf16": ("grpo", "small", 0, ("model.dtype=bfloat16",)),
    "grpo-small-long": ("grpo", "small", 0, ("max_completion_length=160",)),
    "rm-medium": ("reward_model", "medium", 0, ()),
    "ppo-small": ("ppo", "small", 0, ()),
    "ppo-medium": ("ppo", "medium", 0, ()),
}
THRESHOLD = 0.15
# Make the resident set track live tensors (see the module docstring): freed tensors over 64 KiB leave it,
# and oneDNN / ideep keep no compiled kernels per distinct matmul shape (bf16 decoding makes hundreds).
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"}


def overrides(recipe: str, model_dir: str, rm_dir: str, out: Path) -> list[str]:
    common = [
        f"model.path={model_dir}",
        "model.device=cpu",
        f"train.steps={STEPS}",
        f"train.output_dir={out}",
        "train.progress=false",
        "train.resume=never",
        "train.log_every=1000000",
        "optim.schedule=constant",
    ]
    if recipe == "sft":
        return common + [
            "data.path=builtin:arithmetic",
            "data.num_examples=200",
            "data.max_length=64",
            "data.eval_fraction=0.0",
            "train.micro_batch_size=16",
        ]
    if recipe in ("dpo", "reward_model"):
        return (
            common
            + [
                f"data.path={out.parent / 'pairs.jsonl'}",
                "data.max_length=64",
                "data.eval_fraction=0.0",
                "train.micro_batch_size=8",
            ]
            + (["loss=dpo"] if recipe == "dpo" else [])
        )
    rl = common + [
        "data.path=builtin:arithmetic?max_terms=5",
        "data.num_examples=64",
        "data.shuffle=false",
        "prompts_per_step=8",
        "num_generations=4",
        "max_completion_length=32",
        "train.micro_batch_size=32",
        "samples_every=0",
        "mask_truncated_completions=false",
    ]
    if recipe == "grpo":
        return rl + ["rewards=[{name: 'bench_common:digit_reward'}]"]
    rm = f"{{name: reward_model, options: {{path: '{rm_dir}', device: cpu}}}}"
    return rl + [f"rewards=[{rm}]", "critic.init=reward_model", "beta=0.05", "ppo_epochs=1", "num_mini_batches=1"]


def null_overrides(recipe: str) -> list[str]:
    """A null run's sizes, applied last: one row (pair) per micro-batch; RL: one prompt, 2 samples, 2 tokens."""
    if recipe in ("grpo", "ppo"):
        return ["prompts_per_step=1", "num_generations=2", "max_completion_length=2", "train.micro_batch_size=2"]
    return ["train.micro_batch_size=1"]


# ---------------------------------------------------------------------------------------------
# The worker: one recipe run, instrumented


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _snapshot(base: int) -> dict:
    """posttrain.runtime.memory's split, over every live model and optimizer (found by the garbage collector,
    so recipes that do not log memory metrics are measured the same way)."""
    import torch

    from posttrain.runtime.memory import _bytes, optimizer_bytes

    gc.collect()
    objs = gc.get_objects()
    params = [p for o in objs if isinstance(o, torch.nn.Module) for p in o.parameters(recurse=False)]
    opts = [o for o in objs if isinstance(o, torch.optim.Optimizer)]
    return {
        "weights": _bytes(params),
        "grads": _bytes(p for p in params if p.requires_grad),
        "optimizer": sum(optimizer_bytes(o) for o in opts),
        "peak_growth": _status("VmHWM") - base,
    }


def worker(spec: dict, out: Path) -> None:
    bc.set_threads(1)
    import importlib

    import peft  # noqa: F401 -- imported by LoRA runs inside train(); every run imports it before the baseline
    import torch

    from posttrain.config import RECIPE_CONFIGS, config_from_dict
    from posttrain.recipes import grpo, preference, reward_model, sft
    from posttrain.runtime import memory
    from posttrain.runtime.tracking import Tracker

    shapes: list[tuple[int, int, int]] = []  # (B, T, K) of every forward that builds a graph

    def recorded(fn, loss_positions):
        def wrapper(*args, **kwargs):
            if torch.is_grad_enabled():
                ids = args[1] if len(args) > 1 else kwargs["input_ids_BT"]
                shapes.append((ids.shape[0], ids.shape[1], loss_positions(args, kwargs)))
            return fn(*args, **kwargs)

        return wrapper

    grpo.completion_logps = recorded(grpo.completion_logps, lambda a, k: int((a[5] > 0).sum()))
    sft.forward_logits = recorded(sft.forward_logits, lambda a, k: 0)
    preference.forward_logits = recorded(preference.forward_logits, lambda a, k: 0)
    reward_model.sequence_scores = recorded(reward_model.sequence_scores, lambda a, k: 0)
    snaps: list[dict] = []
    log = Tracker.log

    def logged(self, step, metrics):
        snaps.append(
            {**_snapshot(base), "recipe_metrics": {k: v for k, v in metrics.items() if k.startswith("memory/")}}
        )
        return log(self, step, metrics)

    Tracker.log = logged
    recipe = spec["recipe"]
    cls = RECIPE_CONFIGS["preference" if recipe == "dpo" else recipe]
    cfg = config_from_dict(cls, {}, spec["overrides"])
    module = importlib.import_module(f"posttrain.recipes.{'preference' if recipe == 'dpo' else recipe}")
    gc.collect()
    memory.reset_peak(torch.device("cpu"))
    base = _status("VmRSS")
    module.train(cfg)
    last = snaps[-1]
    B, T, K = max(shapes, key=lambda s: (s[0] * s[1], s[2]))
    out.write_text(
        json.dumps(
            {
                **spec,
                "peak_growth": max(s["peak_growth"] for s in snaps),
                **{k: last[k] for k in ("weights", "grads", "optimizer")},
                "recipe_metrics": last["recipe_metrics"],
                "B": B,
                "T": T,
                "K": K,
                "forwards_per_step": len(shapes) // STEPS,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# The parent: models, runs, estimates, table


def build(tmp: Path, preset: str, vocab: int) -> tuple[str, str]:
    """A policy directory (the preset, random init) and a reward model with its backbone (for PPO)."""
    d = tmp / f"{preset}-{vocab}"
    if not (d / "policy").is_dir():
        bc.build_model_dir(d / "policy", preset, "llama", vocab_size=vocab)
        from posttrain.config import ModelConfig
        from posttrain.models.scalar import load_scalar

        rm, tok = load_scalar(ModelConfig(path=str(d / "policy"), device="cpu"))
        rm.save_pretrained(d / "rm")
        tok.save_pretrained(d / "rm")
    return str(d / "policy"), str(d / "rm")


def write_pairs(path: Path, n: int = 64) -> None:
    """Preference pairs from the arithmetic task: the worked completion vs. the same with a wrong answer."""
    from posttrain.data.io import read_rows

    rows = read_rows("builtin:arithmetic", "train", num_examples=n, seed=0).rows
    with open(path, "w") as fh:
        for r in rows:
            wrong = r["completion"].replace(f"\\boxed{{{r['answer']}}}", f"\\boxed{{{int(r['answer']) + 1}}}")
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": r["completion"], "rejected": wrong}) + "\n")


def run(
    name: str,
    recipe: str,
    preset: str,
    vocab: int,
    extra: tuple[str, ...],
    tmp: Path,
    null: bool = False,
    plain: bool = False,
) -> dict:
    model_dir, rm_dir = build(tmp, preset, vocab)
    out_dir = tmp / name
    spec = {
        "name": name,
        "recipe": recipe,
        "preset": preset,
        "vocab": vocab,
        "model_dir": model_dir,
        "overrides": [
            *overrides(recipe, model_dir, rm_dir, out_dir),
            *extra,
            *(null_overrides(recipe) if null else []),
        ],
    }
    result = tmp / f"{name}.json"
    env = {**bc.child_env(), **({} if plain else ENV), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec), "--out", str(result)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def planned(r: dict):
    """The planner's estimate for a measured run: its model directory read by ``posttrain plan``'s loader,
    its settings, the shape of its largest forward."""
    from posttrain.commands.plan import load_shape
    from posttrain.config import RECIPE_CONFIGS, config_from_dict
    from posttrain.planning.estimate import PAIR_RECIPES, Plan, estimate

    cfg = config_from_dict(RECIPE_CONFIGS["preference" if r["recipe"] == "dpo" else r["recipe"]], {}, r["overrides"])
    rl = r["recipe"] in ("grpo", "ppo")
    plan = Plan(
        recipe=r["recipe"],
        dtype=cfg.model.dtype,
        lora_r=cfg.lora.r,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora_targets=tuple(cfg.lora.target_modules),
        micro_batch=r["B"] // (2 if r["recipe"] in (*PAIR_RECIPES, "reward_model") else 1),
        seq_len=r["T"],
        completion_len=cfg.max_completion_length if rl else r["T"],
        loss_tokens=r["K"],
        grad_accum=max(1, r["forwards_per_step"]) if not rl else 1,
        prompts_per_step=cfg.prompts_per_step if rl else 8,
        num_generations=cfg.num_generations if rl else 8,
        beta=cfg.beta if rl else 0.0,
        precompute_ref=getattr(cfg, "precompute_ref", True),
        device="cpu",
    )
    return estimate(load_shape(r["model_dir"]), plan)


def compare(r: dict, overhead: float) -> dict:
    e = planned(r)
    est = {
        "weights": sum(p.bytes for p in e.parts if p.name.endswith("weights")),
        "grads": e.get("gradients") + e.get("critic gradients"),
        "optimizer": e.get("optimizer state") + e.get("critic optimizer state"),
        "peak": e.peak,
    }
    measured_peak = r["peak_growth"] - overhead
    static_est = est["weights"] + est["grads"] + est["optimizer"]
    static = r["weights"] + r["grads"] + r["optimizer"]
    return {
        "name": r["name"],
        "shape": f"{r['B']}x{r['T']} K={r['K']}",
        "est": est,
        "phase": e.peak_phase,
        "measured": {
            "weights": r["weights"],
            "grads": r["grads"],
            "optimizer": r["optimizer"],
            "peak": measured_peak,
            "activations": measured_peak - static,
        },
        "est_activations": est["peak"] - static_est,
        "growth": r["peak_growth"],
        "overhead": overhead,
        "ratio": {k: est[k] / r[k] if r[k] else float("nan") for k in ("weights", "grads", "optimizer")}
        | {"peak": est["peak"] / measured_peak, "activations": (est["peak"] - static_est) / (measured_peak - static)},
    }


def table(rows: list[dict]) -> str:
    head = [
        "run",
        "B x T (K)",
        "weights MB",
        "grads MB",
        "optimizer MB",
        "activations MB est / meas",
        "peak MB est / meas",
        "peak ratio",
        "phase",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in rows:
        e, m = c["est"], c["measured"]
        lines.append(
            "| "
            + " | ".join(
                [
                    c["name"],
                    c["shape"],
                    *(f"{e[k] / MB:.1f} / {m[k] / MB:.1f}" for k in ("weights", "grads", "optimizer")),
                    f"{c['est_activations'] / MB:.0f} / {m['activations'] / MB:.0f}",
                    f"{e['peak'] / MB:.0f} / {m['peak'] / MB:.0f}",
                    f"{c['ratio']['peak']:.3f}",
                    c["phase"],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", choices=list(RUNS), help="run these only (repeatable)")
    ap.add_argument("--json", help="write every run and comparison here")
    ap.add_argument(
        "--plain-env",
        action="store_true",
        help="run without ENV: glibc's and oneDNN's defaults (the "
        "resident set then also holds freed pages and cached kernels)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker), Path(a.out))
        return 0
    bc.set_threads(1)
    names = a.only or list(RUNS)
    with tempfile.TemporaryDirectory(prefix="plan_check_") as d:
        tmp = Path(d)
        write_pairs(tmp / "pairs.jsonl")
        rows = []
        overheads = {}
        for n in names:
            recipe, preset, vocab, extra = RUNS[n]
            key = (recipe, vocab, extra)
            if key not in overheads:
                # The same run on the tiny preset with the same tokenizer (a 32k-token tokenizer alone is
                # ~60 MB of Python and Rust objects), dtype and options (bf16 kernels, LoRA) and a one-row
                # micro-batch; its own tensors, as the planner estimates them (a few MB, mostly the exact
                # static part), are not overhead.
                null = run(f"null-{n}", recipe, "tiny", vocab, extra, tmp, null=True, plain=a.plain_env)
                overheads[key] = null["peak_growth"] - planned(null).peak
            r = run(n, recipe, preset, vocab, extra, tmp, plain=a.plain_env)
            rows.append(compare(r, overheads[key]))
            print(
                f"{n}: peak est {rows[-1]['est']['peak'] / MB:.0f} MB / measured {rows[-1]['measured']['peak'] / MB:.0f} "
                f"MB = {rows[-1]['ratio']['peak']:.3f} (overhead {overheads[key] / MB:.0f} MB)",
                flush=True,
            )
    print(
        f"\n{bc.machine()}; {STEPS} steps per run; float32 unless named; 1 thread; "
        + ("glibc and oneDNN defaults" if a.plain_env else " ".join(f"{k}={v}" for k, v in ENV.items()))
    )
    print(
        "est / measured; measured peak = peak RSS growth - the run's null-run overhead ("
        + ", ".join(f"{c['overhead'] / MB:.0f}" for c in rows)
        + " MB)\n"
    )
    print(table(rows))
    worst = max(abs(c["ratio"]["peak"] - 1) for c in rows)
    static_ok = all(abs(c["ratio"][k] - 1) < 1e-9 for c in rows for k in ("weights", "grads", "optimizer"))
    print(
        f"\nweights, gradients, optimizer state exact: {static_ok}; worst peak ratio off by {100 * worst:.1f}% "
        f"(target <= {100 * THRESHOLD:.0f}%: {'met' if worst <= THRESHOLD else 'NOT met'})"
    )
    if a.json:
        bc.write_json(a.json, {"runs": rows, "machine": bc.machine()})
    return 0 if worst <= THRESHOLD and static_ok else 1


if __name__ == "__main__":
    sys.exit(main())
