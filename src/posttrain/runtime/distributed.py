"""The one place that knows about torch.distributed (DESIGN: recipes call it, losses never do).

Under ``torchrun`` every recipe runs data-parallel: one process per device, the process group set up
here (NCCL on CUDA, gloo on CPU), the trained models wrapped with FSDP2 (``fully_shard``). One process
gets the same object with ``world == 1``, whose calls are identities, so a recipe reads the same either
way and N ranks compute what one rank computes:

* every rank draws the same global batch (same seed, same sampler) and takes its own contiguous
  slice (``Dist.slice``);
* a loss is this rank's share of the global sum divided by GLOBAL counts (``Dist.sum``), times
  ``world`` (``Dist.loss_scale``) because FSDP averages gradients over the ranks
  (``losses/aggregation.py``);
* statistics over the whole batch (KTO's z, batch-whitened advantages, dynamic sampling's decision,
  the logged metrics) are gathered first (``Dist.gather``);
* FSDP's collectives need every rank to run as many forwards and backwards as every other: a rank
  with fewer micro-batches adds empty ones (``Dist.pad_count``), which carry no loss;
* token-by-token generation cannot gather parameters per layer in lockstep (ranks stop at different
  tokens), so a rollout runs on unsharded parameters (``Dist.unsharded``): for its duration every
  rank holds the whole policy, the memory of one replicated model, resharded before the update.

Strategies (``train.strategy``): ``fsdp`` shards parameters, gradients and optimizer state over the
ranks; ``replicate`` keeps the full weights on every rank (DDP-style: FSDP2 on a (replicate, 1) mesh,
the same code path with nothing to shard); ``auto`` is ``replicate`` with LoRA (small trainable state,
frozen base read by every forward) and ``fsdp`` otherwise. Models a rank calls a different number of
times than the others (reward models inside the reward function) stay plain, replicated modules.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from posttrain.runtime.errors import ModelError
from posttrain.runtime.launch import launched


@dataclass
class Dist:
    """Rank, world size, this rank's device, and the few collectives the recipes need."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale(self) -> int:
        """FSDP averages gradients over ranks; a loss already divided by global counts is multiplied
        back so the gradient is the sum over ranks, what one process computes."""
        return self.world

    # -- collectives (identities on one process) ----------------------------------------------

    def _tensor(self, x: Any, dtype=torch.float64) -> torch.Tensor:
        comm = self.device if self.device.type == "cuda" else torch.device("cpu")
        return torch.as_tensor(x, dtype=dtype).to(comm)

    def sum(self, x: float | int) -> float:
        """The sum over ranks of a number (float64: token counts stay exact)."""
        if not self.enabled:
            return x
        t = self._tensor(float(x))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(round(t.item())) if isinstance(x, int) else t.item()

    def max(self, x: float | int) -> float:
        if not self.enabled:
            return x
        t = self._tensor(float(x))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # -- the global batch ---------------------------------------------------------------------

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items; ``n`` must divide evenly."""
        if n % self.world:
            raise ValueError(f"{n} items cannot be split evenly over {self.world} ranks")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def pad_count(self, local: int) -> int:
        """Empty micro-batches this rank adds so that it runs as many as the busiest rank."""
        return int(self.max(local)) - local if self.enabled else 0

    # -- models ---------------------------------------------------------------------------------

    def wrap(
        self,
        model,
        strategy: str = "fsdp",
        *,
        mixed_precision: str = "none",
        cpu_offload: bool = False,
        forward_methods: dict[str, Callable] | None = None,
    ):
        """FSDP2 over every decoder layer, then the root (bottom-up, as ``fully_shard`` wants). Each of
        ``forward_methods`` (attribute name -> function of the model) is bound to the model and registered
        as a forward entry point: a recipe that runs the model through a function other than ``forward``
        (the chunked LM head, the critic's values) needs FSDP to gather the root's parameters around it as
        it does around ``forward``. One process: the model as it is."""
        if not self.enabled:
            return model
        kind = self.device.type
        if strategy == "replicate":
            mesh = init_device_mesh(kind, (self.world, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(kind, (self.world,), mesh_dim_names=("shard",))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if mixed_precision == "bf16"
            else MixedPrecisionPolicy()
        )
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        for name, fn in (forward_methods or {}).items():
            setattr(model, name, types.MethodType(fn, model))
            register_fsdp_forward_method(model, name)
        return model

    @contextlib.contextmanager
    def unsharded(self, *models) -> Iterator[None]:
        """Full parameters on every rank for the duration (a rollout: forwards that differ in number
        between ranks, with no collective inside them), resharded after."""
        mods = self._fsdp_modules(models)
        for m in mods:
            m.unshard()
            m.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for m in mods:
                m.reshard()
                m.set_reshard_after_forward(True)

    def _fsdp_modules(self, models) -> list:
        if not self.enabled:
            return []
        return [
            m
            for model in models
            if isinstance(model, torch.nn.Module)
            for m in model.modules()
            if isinstance(m, FSDPModule)
        ]

    def close(self) -> None:
        if self.enabled:
            if dist.is_initialized():
                dist.destroy_process_group()


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device={spec!r} but CUDA is not available")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ModelError(f"model.device={spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (the ``layers`` ModuleList of Llama / Qwen2-like
    models, under any PEFT or task-head wrapper): the unit FSDP gathers at a time."""
    for name, m in model.named_modules():
        if name.endswith("layers") and isinstance(m, torch.nn.ModuleList) and len(m):
            return list(m)
    return []


def resolve_strategy(strategy: str, lora_r: int) -> str:
    return strategy if strategy != "auto" else ("replicate" if lora_r > 0 else "fsdp")


def init(device_spec: str = "auto") -> Dist:
    """This process's ``Dist``: under a launcher, the process group (set up once per process) and the
    device of this rank (``model.device: auto`` is cuda:LOCAL_RANK where CUDA is available); else a
    single process on ``device_spec``."""
    if not launched():
        return Dist(device=resolve_device(device_spec))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, device=device)
