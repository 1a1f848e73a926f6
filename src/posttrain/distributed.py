"""The one place that knows about torch.distributed (DESIGN: recipes call it, losses never do).

Under ``torchrun`` every recipe runs data-parallel: one process per device, the process group
initialised here (NCCL on CUDA, gloo on CPU), models wrapped with FSDP2 (``fully_shard``). A
single process gets the same object with ``world == 1``, whose calls are identities, so a recipe
reads the same either way and N ranks compute what one rank computes:

* every rank draws the same global batch (same seed, same sampler) and takes its own contiguous
  slice (``Dist.slice``);
* losses are "this rank's share of the global sum" divided by GLOBAL counts (``Dist.sum``), times
  ``world`` because FSDP averages gradients over ranks (``losses/aggregation.py``);
* statistics that need the whole batch (KTO's z, batch-whitened advantages, dynamic sampling's
  decision, metrics) are gathered first;
* FSDP's collectives need every rank to run the same number of forwards and backwards:
  ``Dist.pad_count`` tells a rank how many empty micro-batches to add (they carry no loss);
* token-by-token generation cannot gather parameters per layer per token in lockstep, so the
  policy is unsharded for the whole rollout (``Dist.unsharded``): full weights on every rank while
  generating -- the memory of one replicated model -- resharded before the update.

Strategies (``train.strategy``): ``fsdp`` shards parameters, gradients and optimizer state over the
ranks; ``replicate`` keeps full weights on every rank (DDP-style, via FSDP2 on a (replicate, 1)
mesh: the same code path with nothing to shard), the default with LoRA, whose trainable state is
small; ``auto`` picks one of the two.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch


@dataclass
class Dist:
    """Rank, world size, the device of this rank, and the collectives the recipes need."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (identities on one process) ----------------------------------------------

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sum(self, x: float | int | torch.Tensor) -> Any:
        """The sum over ranks (float64 for numbers, so counts stay exact)."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
        src_device = t.device
        t = t.to(self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(src_device) if isinstance(x, torch.Tensor) else t.item()

    def max(self, x: float | int) -> float:
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = torch.tensor(float(x), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` holds on every rank (a collective: call it on all ranks)."""
        return self.sum(0.0 if ok else 1.0) == 0.0

    # -- sharding the global batch ------------------------------------------------------------

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (``n`` divisible by ``world``)."""
        if n % self.world:
            raise ValueError(f"{n} items cannot be split evenly over {self.world} ranks")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def pad_count(self, local: int) -> int:
        """How many empty micro-batches this rank adds so every rank runs as many as the busiest one."""
        return int(self.max(local)) - local if self.enabled else 0

    # -- models ---------------------------------------------------------------------------------

    def wrap(self, model, strategy: str, *, mixed_precision: str = "none", cpu_offload: bool = False):
        """FSDP2 on every decoder layer, then the root (bottom-up, as ``fully_shard`` wants). A single
        process returns the model unchanged."""
        if not self.enabled:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        kind = "cuda" if self.device.type == "cuda" else "cpu"
        if strategy == "replicate":
            mesh = init_device_mesh(kind, (self.world, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(kind, (self.world,), mesh_dim_names=("shard",))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if mixed_precision == "bf16" else MixedPrecisionPolicy()
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    @contextlib.contextmanager
    def unsharded(self, *models) -> Iterator[None]:
        """Full parameters on every rank for the duration (a rollout: forwards that differ in number
        between ranks, with no collective inside), resharded after."""
        from torch.distributed.fsdp import FSDPModule

        mods = [m for model in models if model is not None and not isinstance(model, str)
                for m in model.modules() if isinstance(m, FSDPModule)] if self.enabled else []
        for m in mods:
            m.unshard()
            m.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for m in mods:
                m.reshard()
                m.set_reshard_after_forward(True)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0, on CPU (other ranks get {}); a plain state dict on one
        process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.enabled:
            return model.state_dict()
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (``model.layers`` of Llama / Qwen2-like models, under
    any PEFT or task-head wrapper): the unit FSDP shards and gathers at a time."""
    found = [m for name, m in model.named_modules() if name.endswith(".layers") and isinstance(m, torch.nn.ModuleList)]
    return list(found[0]) if found else []


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_CURRENT: Dist | None = None


def init(device_spec: str = "auto") -> Dist:
    """The process group (once per process) and this rank's device. ``device_spec`` as in
    ``model.device``: ``auto`` is cuda:LOCAL_RANK when CUDA is available, else cpu."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    from posttrain.models.loading import resolve_device

    if not launched():
        _CURRENT = Dist(device=resolve_device(device_spec))
        return _CURRENT
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    _CURRENT = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, device=device)
    return _CURRENT


def pickled_size(obj: Any) -> int:
    return len(pickle.dumps(obj))


def concat(parts: Sequence[list]) -> list:
    return [x for part in parts for x in part]
