"""`posttrain plan`: will it fit? Reads a model's config (no weights), prints per-GPU memory by component
for the configuration asked, and the cheapest configuration that fits (``posttrain.planning.estimate``)."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from posttrain.models import tiny
from posttrain.planning.estimate import (
    LINEARS,
    RECIPES,
    Estimate,
    GiB,
    ModelShape,
    Plan,
    PlanError,
    causal_params,
    estimate,
    search,
)

# Public config.json numbers of Qwen2.5 models (Qwen/Qwen2.5-*-Instruct on the Hugging Face hub): hidden,
# layers, heads, kv heads, MLP size, vocabulary, tied embeddings. All have q/k/v biases (Qwen2 architecture).
BUILTIN: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        hidden_size=5120,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=13824,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
SUPPORTED = ("llama", "qwen2", "mistral")  # decoder layers the activation formulas describe


def _config(spec: str, arch: str, vocab: int):
    """A transformers config from a tiny preset name, a built-in shape or a local model directory."""
    if tiny.is_preset(spec):
        # The tiny models' vocabulary is their tokenizer's: 105 characters and specials (char) by default.
        v = vocab or len(tiny.build_tokenizer("char"))
        cls = Qwen2Config if arch == "qwen2" else LlamaConfig
        return cls(vocab_size=v, tie_word_embeddings=True, **tiny.PRESETS[spec])
    if spec in BUILTIN:
        return Qwen2Config(**{**BUILTIN[spec], **({"vocab_size": vocab} if vocab else {})})
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise PlanError(
            f"--model {spec!r}: not a tiny preset ({', '.join(tiny.PRESETS)}), a built-in shape "
            f"({', '.join(BUILTIN)}) or a model directory with a config.json"
        )
    return AutoConfig.from_pretrained(str(path))


def load_shape(spec: str, arch: str = "llama", vocab: int = 0) -> ModelShape:
    """The shape of ``spec``, its parameter count checked against the architecture built on the meta
    device (no memory, no weights): a model whose parameters the formulas miss is refused, not guessed."""
    cfg = _config(spec, arch, vocab)
    if cfg.model_type not in SUPPORTED:
        raise PlanError(
            f"--model {spec!r}: model_type {cfg.model_type!r}; the planner's formulas describe "
            f"{', '.join(SUPPORTED)} decoders"
        )
    heads = cfg.num_attention_heads
    shape = ModelShape(
        name=Path(spec).name if Path(spec).is_dir() else spec,
        vocab=cfg.vocab_size,
        hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        intermediate=cfg.intermediate_size,
        tied=bool(cfg.tie_word_embeddings),
        qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    counted = sum(p.numel() for p in model.parameters())
    if counted != causal_params(shape):
        raise PlanError(
            f"--model {spec!r}: the architecture has {counted:,} parameters, the planner's formulas "
            f"{causal_params(shape):,}; it has parts the planner does not model"
        )
    return shape


def parse_gpus(text: str) -> tuple[int, int]:
    """'2x24GB' -> (2, 24 GiB). GPU memory is sold in binary units: a '24 GB' card has 24 GiB."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?(\d+(?:\.\d+)?)\s*(GiB|GB|G)?\s*", text)
    if not m:
        raise PlanError(f"--gpus {text!r}: expected NxSIZE, e.g. 2x24GB")
    return int(m.group(1) or 1), int(float(m.group(2)) * GiB)


def gib(n: float) -> str:
    return f"{n / GiB:7.2f}"


def describe(p: Plan) -> str:
    lora = f"LoRA r={p.lora_r} on {','.join(p.lora_targets)}" if p.lora_r else "full fine-tuning"
    return (
        f"{p.strategy}{' + CPU offload' if p.offload else ''}, {lora}, dtype {p.dtype}, mixed precision "
        f"{p.mixed_precision}, gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}, "
        f"micro-batch {p.micro_batch} x {p.seq_len} tokens"
    )


def flags(p: Plan) -> str:
    out = [f"--strategy {p.strategy}", f"--micro-batch {p.micro_batch}", f"--lora-r {p.lora_r}"]
    out += ["--gradient-checkpointing"] if p.gradient_checkpointing else []
    out += ["--offload"] if p.offload else []
    return " ".join(out)


def table(e: Estimate, capacity: int) -> str:
    lines = [f"  {'component (per GPU)':<32}{'GiB':>8}  {'held':<8} how"]
    for part in e.parts:
        if part.bytes or part.phase == "always":
            lines.append(f"  {part.name:<32}{gib(part.bytes)} {'  ' + part.phase:<9} {part.how}")
    lines.append("  peak by phase: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in e.phases.items()) + " GiB")
    verdict = "fits" if e.peak <= capacity else "does NOT fit"
    lines.append(f"  peak {e.peak / GiB:.2f} GiB ({e.peak_phase}) of {capacity / GiB:.2f} GiB usable: {verdict}")
    if e.host_bytes:
        lines.append(f"  CPU memory for the offloaded state: {e.host_bytes / GiB:.2f} GiB per GPU process")
    return "\n".join(lines)


def why_not(options, capacity: int, cpu: int) -> str:
    """Why the closest option does not fit: the GPUs, or the CPU memory its offloaded state needs."""
    smallest = min(options, key=lambda o: o.estimate.peak)
    if smallest.estimate.peak <= capacity:
        return (
            f"{describe(smallest.plan)} fits the GPUs ({smallest.estimate.peak / GiB:.2f} GiB) but its offloaded "
            f"state needs {smallest.estimate.host_bytes * smallest.plan.gpus / GiB:.0f} GiB of CPU memory "
            f"(--cpu-memory {cpu / GiB:g})."
        )
    return (
        f"the smallest configuration searched needs {smallest.estimate.peak / GiB:.2f} GiB per GPU "
        f"({describe(smallest.plan)})."
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="posttrain plan", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        required=True,
        help="local HF model directory (config.json only), a tiny preset, or a built-in shape: " + ", ".join(BUILTIN),
    )
    ap.add_argument("--recipe", required=True, choices=RECIPES)
    ap.add_argument("--gpus", default="1x24GB", help="N x memory per GPU, e.g. 2x24GB (GB read as GiB)")
    ap.add_argument(
        "--reserve",
        type=float,
        default=1.5,
        help="GiB per GPU kept free for the CUDA context, NCCL and "
        "allocator fragmentation, which the estimate does not count (an assumption, not measured here)",
    )
    ap.add_argument(
        "--strategy",
        choices=("replicate", "fsdp"),
        default=None,
        help="train.strategy (default: replicate with LoRA, else fsdp on >1 GPU)",
    )
    ap.add_argument("--mixed-precision", choices=("none", "bf16"), default="bf16")
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="model.dtype: how weights are stored (default: bfloat16 with LoRA -- a frozen base needs no "
        "fp32 master -- else float32, the fp32 master of bf16 mixed precision)",
    )
    ap.add_argument("--offload", action="store_true", help="FSDP2 CPU offload of parameters, gradients, AdamW state")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward per GPU (pairs for dpo)")
    ap.add_argument("--max-length", type=int, default=512, help="sft/preference: tokens per row")
    ap.add_argument("--prompt-length", type=int, default=256, help="RL: longest prompt in tokens")
    ap.add_argument("--max-completion-length", type=int, default=1024, help="RL: max new tokens")
    ap.add_argument("--prompts-per-step", type=int, default=8, help="RL: P prompts per step (global)")
    ap.add_argument("--num-generations", type=int, default=8, help="RL: G completions per prompt")
    ap.add_argument("--beta", type=float, default=None, help="RL KL coefficient (default: grpo 0, ppo 0.05)")
    ap.add_argument("--no-precompute-ref", action="store_true", help="dpo/ipo/kto: hold a frozen reference model")
    ap.add_argument(
        "--grad-accum",
        type=int,
        default=0,
        help="micro-batches per optimizer step (0: RL derives it from P x G / (GPUs x micro-batch), else 1)",
    )
    ap.add_argument("--reward-model", default="", help="ppo: the reward model's shape (default: the policy's)")
    ap.add_argument("--arch", choices=("llama", "qwen2"), default="llama", help="architecture of a tiny preset")
    ap.add_argument("--vocab", type=int, default=0, help="override the vocabulary size")
    ap.add_argument(
        "--cpu-memory",
        type=float,
        default=0,
        help="GiB of CPU memory on the machine (for offload; 0: not checked, only reported)",
    )
    ap.add_argument(
        "--search-lora-r", type=int, default=16, help="LoRA rank of the alternative shown beside a full fine-tune"
    )
    ap.add_argument("--no-search", action="store_true", help="only the configuration asked for")
    ap.add_argument("--json", action="store_true", help="print the estimate (and the best option) as JSON")
    return ap


def plan_from_args(a, gpus: int) -> Plan:
    rl = a.recipe in ("grpo", "ppo")
    strategy = a.strategy or ("fsdp" if gpus > 1 and not a.lora_r else "replicate")
    return Plan(
        recipe=a.recipe,
        gpus=gpus,
        strategy=strategy,
        mixed_precision=a.mixed_precision,
        dtype=a.dtype or ("bfloat16" if a.lora_r else "float32"),
        offload=a.offload,
        gradient_checkpointing=a.gradient_checkpointing,
        lora_r=a.lora_r,
        lora_targets=tuple(t.strip() for t in a.lora_targets.split(",") if t.strip()),
        micro_batch=a.micro_batch,
        seq_len=a.prompt_length + a.max_completion_length if rl else a.max_length,
        completion_len=a.max_completion_length,
        grad_accum=a.grad_accum,
        prompts_per_step=a.prompts_per_step,
        num_generations=a.num_generations,
        beta=a.beta if a.beta is not None else (0.05 if a.recipe == "ppo" else 0.0),
        precompute_ref=not a.no_precompute_ref,
    )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        n, per_gpu = parse_gpus(a.gpus)
        shape = load_shape(a.model, a.arch, a.vocab)
        reward = load_shape(a.reward_model, a.arch) if a.reward_model else None
        plan = plan_from_args(a, n)
        bad = [t for t in plan.lora_targets if t not in LINEARS]
        if bad:
            raise PlanError(f"--lora-targets {bad}: expected some of {', '.join(LINEARS)}")
        capacity = per_gpu - int(a.reserve * GiB)
        asked = estimate(shape, plan, reward)
        cpu = int(a.cpu_memory * GiB)
        options = [] if a.no_search else search(shape, plan, capacity, reward, cpu)
        lora = (
            []
            if a.no_search or plan.lora_r
            else search(
                shape,
                replace(
                    plan,
                    lora_r=a.search_lora_r,
                    dtype=a.dtype or "bfloat16",
                    strategy="replicate" if not a.strategy else plan.strategy,
                ),
                capacity,
                reward,
                cpu,
            )
        )
    except PlanError as e:
        print(f"posttrain plan: error: {e}")
        return 2
    best = next((o for o in options if o.fits), None)
    best_lora = next((o for o in lora if o.fits), None)
    if a.json:
        out = {
            "model": asdict(shape),
            "plan": asdict(plan),
            "capacity_bytes": capacity,
            "estimate": {
                "parts": [asdict(p) for p in asked.parts],
                "phases": asked.phases,
                "peak": asked.peak,
                "host_bytes": asked.host_bytes,
            },
        }
        for key, o in (("best", best), ("best_lora", best_lora)):
            if o:
                out[key] = {
                    "plan": asdict(o.plan),
                    "peak": o.estimate.peak,
                    "cost": o.cost,
                    "host_bytes": o.estimate.host_bytes,
                }
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"posttrain plan: {shape.name} ({causal_params(shape) / 1e9:.3g}B parameters: {shape.layers} layers, hidden "
        f"{shape.hidden}, {shape.heads}/{shape.kv_heads} heads, MLP {shape.intermediate}, vocab {shape.vocab}), "
        f"recipe {plan.recipe}, {n} x {per_gpu / GiB:.0f} GiB ({a.reserve:g} GiB kept free per GPU)"
    )
    if plan.recipe in ("grpo", "ppo"):
        print(
            f"rollout: P x G = {plan.prompts_per_step} x {plan.num_generations}, prompt {a.prompt_length} + "
            f"completion {a.max_completion_length} tokens, beta {plan.beta:g}"
        )
    print(f"\nasked: {describe(plan)}\n{table(asked, capacity)}")
    if a.no_search:
        return 0
    kind = f"LoRA r={plan.lora_r}" if plan.lora_r else "full fine-tuning"
    if best is None:
        print(f"\n{kind}: nothing fits; {why_not(options, capacity, cpu)}")
    elif best.plan == plan:
        print(f"\n{kind}: the configuration asked is the cheapest that fits.")
    else:
        print(
            f"\n{kind}, cheapest that fits (x{best.cost:.2f} step time against no sharding, checkpointing or "
            f"offload at micro-batch {plan.micro_batch}): {describe(best.plan)}\n  flags: {flags(best.plan)}\n"
            f"{table(best.estimate, capacity)}"
        )
        runners = [o for o in options if o.fits and o is not best][:3]
        if runners:
            print(
                "  next: "
                + "; ".join(f"x{o.cost:.2f} {flags(o.plan)} (peak {o.estimate.peak / GiB:.1f} GiB)" for o in runners)
            )
    if lora:
        if best_lora is None:
            print(f"\nwith LoRA r={a.search_lora_r}: nothing fits either; {why_not(lora, capacity, cpu)}")
        else:
            print(
                f"\nwith LoRA r={a.search_lora_r} instead (a low-rank update, not the same training), cheapest that "
                f"fits (x{best_lora.cost:.2f}): {describe(best_lora.plan)}\n  flags: {flags(best_lora.plan)} "
                f"--dtype {best_lora.plan.dtype}\n{table(best_lora.estimate, capacity)}"
            )
    return 0 if best or best_lora else 1
