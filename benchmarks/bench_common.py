"""Shared pieces of the GRPO benchmarks: the model directory both sides load, the reward both sides
score with, thread and memory measurement. Imported by grpo_vs_trl.py and floor.py (and, through
``bench_common:digit_reward``, by posttrain's reward loader)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from pathlib import Path


def digit_reward(completions, **kwargs) -> list[float]:
    """Fraction of a completion's characters that are digits.

    Deliberately cheap (microseconds per batch) and identical on both sides, so the benchmarks measure
    the trainer, not the verifier; it varies between samples, so advantages are not all zero.
    """
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def child_env() -> dict:
    """The environment of a worker subprocess: this folder importable (``bench_common:digit_reward``)."""
    here = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}


def set_threads(n: int) -> None:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if n > 0:
        torch.set_num_threads(n)


def build_model_dir(out: Path, preset: str, arch: str, vocab_size: int = 0, seed: int = 0) -> Path:
    """Save a seeded tiny model + character tokenizer as a plain HF directory that both trainers load.

    The character tokenizer has ~105 tokens, which makes the LM head and the log-softmax nearly free.
    ``vocab_size`` > that pads the vocabulary with never-seen added tokens (a random-init model still
    samples them), so the vocabulary-dependent cost -- head matmul, softmax, sampling, (B, T, V) logits
    memory -- is a real model's (Qwen2: 151,936). Tokenization of the prompts is unchanged.
    """
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer("char")
    if vocab_size > len(tok):
        tok.add_tokens([f"<|v{i}|>" for i in range(vocab_size - len(tok))])
    model = build_tiny_model(preset, tok, arch=arch, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class PeakMemory:
    """Peak memory of this process during a run.

    cuda: torch.cuda.max_memory_allocated (bytes held by tensors, reset at start).
    cpu: peak resident set size (getrusage ru_maxrss, the kernel's high-water mark) minus the RSS at
    start. Run each measurement in a fresh process that imported the same modules before ``start``,
    so the baseline is the same for every trainer and the high-water mark belongs to this run only.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.base = psutil.Process().memory_info().rss
            self.base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {
                "peak_bytes": peak,
                "base_bytes": self.base,
                "delta_bytes": peak - self.base,
                "kind": "cuda max_memory_allocated",
            }
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "peak_bytes": peak,
            "base_bytes": self.base,
            "delta_bytes": peak - self.base,
            "import_peak_bytes": self.base_peak,
            "kind": "cpu peak RSS (ru_maxrss) - RSS after imports",
        }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def write_json(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj))


def load_average() -> str:
    try:
        a = os.getloadavg()
        return f"{a[0]:.1f} {a[1]:.1f} {a[2]:.1f}"
    except OSError:
        return "n/a"


def machine() -> str:
    import platform

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {dev}; python "
        f"{sys.version.split()[0]}, torch {torch.__version__}"
    )


def grpo_bench_config(a, model_dir, run_dir):
    """The GRPO config both benchmarks run posttrain with: DAPO loss settings, beta 0, one update per
    rollout, the whole batch in one micro-batch, the shared digit reward (so the reward is not measured).
    ``--set KEY=VALUE`` options (``a.set``) are applied last, e.g. ``--set padding_free=false`` for an A/B run."""
    from posttrain.config import GRPOConfig, config_from_dict

    total = a.warmup + a.steps
    return config_from_dict(
        GRPOConfig,
        {},
        [
            f"model.path={model_dir}",
            f"model.device={a.device}",
            f"model.dtype={a.dtype}",
            "data.path=builtin:arithmetic",
            f"data.num_examples={a.prompts * total}",
            "data.shuffle=false",
            "rewards=[bench_common:digit_reward]",
            f"prompts_per_step={a.prompts}",
            f"num_generations={a.generations}",
            f"max_completion_length={a.max_completion_length}",
            "temperature=1.0",
            "top_p=1.0",
            "loss=ppo_clip",
            "aggregation=token_mean",
            "eps_low=0.2",
            "eps_high=0.28",
            "beta=0",
            "num_iterations=1",
            "scale=std",
            "advantage=grpo",
            f"optim.lr={a.lr}",
            "optim.schedule=constant",
            "optim.weight_decay=0",
            "optim.max_grad_norm=1.0",
            f"train.micro_batch_size={a.prompts * a.generations}",
            f"train.steps={total}",
            f"train.seed={a.seed}",
            f"train.output_dir={run_dir}",
            "train.progress=false",
            "train.log_every=1000000",
            "samples_every=0",
            "train.resume=never",
            *(getattr(a, "set", None) or []),
        ],
    )


def trl_dapo_args(**overrides) -> dict:
    """TRL GRPOConfig keyword arguments for the runs compared with posttrain's: DAPO's loss and Clip-Higher, no KL,
    one update per rollout, group-scaled rewards, constant lr, AdamW, no logging, saving or shuffling. The caller
    adds its batch, lengths, steps, lr, device and paths."""
    return {
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "loss_type": "dapo",
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "beta": 0.0,
        "num_iterations": 1,
        "scale_rewards": "group",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "optim": "adamw_torch",
        "gradient_checkpointing": False,
        "shuffle_dataset": False,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1_000_000,
        "disable_tqdm": True,
        "log_completions": False,
        **overrides,
    }
