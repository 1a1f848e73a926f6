"""Measured memory of a training run, split the way the GRPO-vs-PPO argument needs it.

* weights, gradients, optimizer state: exact bytes of the tensors the recipe holds (every model it
  keeps: policy, reference, critic, reward models). Gradients are one tensor per trainable parameter,
  alive from the first backward of a step to the optimizer step, so their size is the trainable
  parameters' size.
* peak: the process's high-water mark since the run started -- CUDA: ``max_memory_allocated``; CPU:
  the peak resident set size (``VmHWM``, reset at the start through ``/proc/self/clear_refs``).
* activations (and everything else a step allocates: logits tiles, the rollout KV cache, allocator
  slack): the peak minus the memory in use before the models were loaded minus the three above.

This is measurement, not estimation (``planning.py`` estimates); on CPU the resident set also counts the
allocator's cached pages, so small models show mostly overhead.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

MB = 1 << 20


def _rss_field(name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def in_use(device: torch.device) -> int:
    """Bytes in use now: CUDA allocated, or the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _rss_field("VmRSS") or 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _rss_field("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return hwm


def _bytes(tensors) -> int:
    """Bytes this process holds: a sharded (DTensor) parameter or state counts its local shard."""
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def optimizer_bytes(optimizer) -> int:
    return _bytes(v for state in optimizer.state.values() for v in state.values())


class MemoryMeter:
    """Created before the models are loaded (that is the baseline); ``metrics`` splits the peak."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        reset_peak(self.device)
        self.baseline = in_use(self.device)

    def metrics(self, models, optimizers) -> dict[str, float]:
        models = [m for m in models if isinstance(m, torch.nn.Module)]
        params = [p for m in models for p in m.parameters()]
        weights = _bytes(params)
        grads = _bytes(p for p in params if p.requires_grad)
        opt = sum(optimizer_bytes(o) for o in optimizers)
        top = peak(self.device)
        return {
            "memory/weights_mb": weights / MB,
            "memory/grads_mb": grads / MB,
            "memory/optimizer_mb": opt / MB,
            "memory/activations_mb": max(0, top - self.baseline - weights - grads - opt) / MB,
            "memory/peak_mb": top / MB,
            "memory/baseline_mb": self.baseline / MB,
            "memory/models_held": float(len(models)),
        }


def reward_models(reward_fn) -> list[torch.nn.Module]:
    """The torch models inside a reward function's components (reward models hold one each)."""
    return [
        c.verifier.model
        for c in getattr(reward_fn, "components", ())
        if isinstance(getattr(c.verifier, "model", None), torch.nn.Module)
    ]
