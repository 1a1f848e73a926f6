"""Loop glue shared by the recipes: run directory, seeding, optimizer + schedule, the guarded
optimizer step, checkpoint/resume and the progress bar. No training math lives here."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from posttrain.config import ConfigError, OptimConfig, TrainConfig, to_dict
from posttrain.losses.logprobs import COMPLETION_LOGPS_ENTRY, completion_logps_unwrapped
from posttrain.models import checkpoint as ckpt
from posttrain.models.scalar import TOKEN_VALUES_ENTRY, token_values_unwrapped
from posttrain.run.preflight import check_recipe
from posttrain.run.rundir import open_run_dir
from posttrain.runtime import distributed
from posttrain.runtime.distributed import Dist, resolve_strategy
from posttrain.runtime.errors import NonFiniteError
from posttrain.runtime.memory import MemoryMeter
from posttrain.runtime.tracking import Tracker

log = logging.getLogger("posttrain")


@dataclass
class Run:
    """What travels through a recipe besides the config: where to write, on which device, logging."""

    dir: Path
    device: torch.device
    tracker: Tracker
    resume_from: Path | None
    start_time: float = field(default_factory=time.time)
    memory: MemoryMeter | None = None  # measured from before the models are loaded
    dist: Dist = field(default_factory=Dist)  # this process's rank, world size, collectives

    @property
    def load_device(self) -> torch.device:
        """Where models are loaded: the CPU when they will be sharded over ranks (``fully_shard`` moves each
        rank's shard to its device, so no device ever holds a whole unsharded copy), else the device."""
        return torch.device("cpu") if self.dist.enabled else self.device


class NoTracker:
    """The metric sinks of a rank other than 0: only rank 0 writes."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged, not the stream of the first run in the
    process (pytest's capture, a notebook, or a tool may have swapped and closed that one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)


THREADS_ENV = "POSTTRAIN_THREADS"


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """(intra-op CPU threads, why). On a busy machine torch's default (one thread per core) fights the
    verifier workers and every other process for the cores: a tiny model ran 12-17x slower on 2 shared
    cores than with one thread. So auto takes half the cores this process may use (at least 1), unless
    $POSTTRAIN_THREADS or $OMP_NUM_THREADS says otherwise."""
    if requested > 0:
        return requested, "train.threads"
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"${var}={value!r}: must be a whole number >= 1")
            return int(value), f"${var}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2), f"auto: half of the {cores} available cores"


def configure_threads(requested: int = 0) -> int:
    n, why = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("CPU threads: %d (%s; set train.threads or $%s to change)", n, why, THREADS_ENV)
    return n


def start_run(cfg: Any, recipe: str, device: torch.device | None = None) -> Run:
    """Join the process group under torchrun (``posttrain.runtime.distributed``), check the run directory (see
    posttrain.run.rundir: a refused run writes nothing), write its record, open the metric sinks, set the CPU
    threads and seed everything. Only rank 0 writes the record, metrics and logs; every rank sees the
    same config, seed and (so) data order. ``device`` is this rank's (``model.device``), chosen here."""
    setup_logging()
    dist = distributed.init(cfg.model.device)
    if dist.enabled and not dist.is_main:
        log.setLevel(logging.ERROR)  # one log for the run, rank 0's (an error reaches the CLI from every rank)
    train: TrainConfig = cfg.train
    check_recipe(cfg, recipe)  # data, models and rewards resolve, or nothing is written
    for text in getattr(cfg, "advice", list)():  # settings that load but are likely a mistake
        log.warning("%s", text)
    plan = dist.broadcast(open_run_dir(cfg, recipe, dist.world) if dist.is_main else None)
    configure_threads(getattr(train, "threads", 0))
    tracker = (
        Tracker(plan.dir, train.report_to, to_dict(cfg), resume_step=plan.resume_step, name=plan.dir.name)
        if dist.is_main
        else NoTracker()
    )
    seed_everything(train.seed)
    return Run(plan.dir, dist.device, tracker, plan.resume_from, memory=MemoryMeter(dist.device), dist=dist)


# Entry points other than ``forward`` through which the recipes run a wrapped model (the chunked LM head,
# the critic's values): FSDP gathers the root's parameters around them as it does around ``forward``.
FORWARD_METHODS = {COMPLETION_LOGPS_ENTRY: completion_logps_unwrapped, TOKEN_VALUES_ENTRY: token_values_unwrapped}


def wrap(run: Run, cfg: Any, model):
    """The model for data-parallel training under torchrun (FSDP2 with ``train.strategy``); unchanged
    in one process."""
    train = cfg.train
    if not run.dist.enabled:
        if train.mixed_precision != "none" or train.cpu_offload:
            log.warning(
                "train.mixed_precision / train.cpu_offload apply to FSDP2 under torchrun; one process keeps "
                "the model as model.dtype says, on its device"
            )
        return model
    if train.cpu_offload and run.device.type != "cuda":
        raise ConfigError("train.cpu_offload: FSDP2 offloads from GPUs to the CPU; this run is on the CPU already")
    lora_r = getattr(getattr(cfg, "lora", None), "r", 0)
    return run.dist.wrap(
        model,
        resolve_strategy(train.strategy, lora_r),
        mixed_precision=train.mixed_precision,
        cpu_offload=train.cpu_offload,
        forward_methods=FORWARD_METHODS,
    )


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

    def f(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

    return f


def make_optimizer(model, optim: OptimConfig, total_steps: int):
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps))
    return opt, sched


def optimizer_step(model, optimizer, scheduler, *, max_grad_norm: float, step: int, loss: float) -> float:
    """Check finiteness, clip, step. Returns the pre-clip gradient norm."""
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite loss ({loss}) at step {step}; stopped before updating the weights")
    params = trainable_parameters(model)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite gradient norm at step {step}; stopped before updating the weights")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def save(
    run: Run, cfg: Any, step: int, model, tokenizer, optimizer, scheduler, train_state: dict, extras: dict | None = None
) -> Path:
    """A checkpoint (every rank calls it). ``extras``: {name: (model, optimizer)} of other trained models."""
    return ckpt.save_checkpoint(
        run.dir,
        step,
        model,
        tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        train_state=train_state,
        keep=cfg.train.keep_checkpoints,
        extras=extras,
        dist=run.dist,
    )


def resume(run: Run, model, optimizer, scheduler, extras: dict | None = None) -> tuple[int, dict]:
    """(start step, saved train_state) -- (0, {}) for a fresh run. Any checkpoint resumes on any number
    of ranks."""
    if run.resume_from is None:
        return 0, {}
    state = ckpt.load_checkpoint(run.resume_from, model, optimizer=optimizer, scheduler=scheduler, extras=extras)
    log.info("resumed from %s (step %d)", run.resume_from, state["step"])
    return state["step"], state


def export(run: Run, model, tokenizer, name: str = "final") -> Path:
    """The exported model (every rank calls it; rank 0 writes one ordinary directory)."""
    return ckpt.export_model(run.dir, model, tokenizer, name=name, dist=run.dist)


def export_final(run: Run, model, tokenizer, recipe: str) -> Path:
    """The run's model as ``final/``, said in the log."""
    final = export(run, model, tokenizer)
    log.info("%s: done; model exported to %s", recipe, final)
    return final


def should(every: int, step: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def end_step(
    run: Run,
    cfg: Any,
    recipe: str,
    step: int,
    last: int,
    metrics: dict,
    info: str,
    progress: Progress,
    checkpoint: Callable[[], Any],
) -> None:
    """The end of a supervised step (pretrain, sft, preference, reward model): record ``metrics``, show
    ``info`` on the progress bar (in the log when the bar is off) and call ``checkpoint()`` when
    ``train.save_every`` says so."""
    run.tracker.log(step, metrics)
    progress.update(step, info)
    if should(cfg.train.log_every, step, last) and not cfg.train.progress:
        log.info("%s step %d/%d %s lr %.2e", recipe, step, last, info, metrics["lr"])
    if should(cfg.train.save_every, step, last):
        checkpoint()


class Progress:
    """A rich progress bar with rate and ETA, plus the latest key metrics."""

    def __init__(self, total: int, start: int, desc: str, enabled: bool = True, unit: str = "steps"):
        self._p = None
        if enabled:
            self._p = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._p.start()
            self._task = self._p.add_task(desc, total=total, completed=start, rate="", info="")
        self._t0, self._start, self._unit = time.time(), start, unit

    def update(self, step: int, info: str = "") -> None:
        if self._p is None:
            return
        elapsed = max(time.time() - self._t0, 1e-9)
        rate = f"{(step - self._start) / elapsed:.2f} {self._unit}/s"
        self._p.update(self._task, completed=step, rate=rate, info=info)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
