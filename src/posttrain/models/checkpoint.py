"""Checkpoints in save_pretrained format plus the exact training state, written atomically, by one
process or by N data-parallel ranks alike (and resumable on any number of ranks).

Layout of a run directory:

    checkpoints/step-00000010/   model.safetensors (or the LoRA adapter, plus trainable.safetensors: the
                                 adapter keyed by the model's own parameter names), config.json, tokenizer
                                 files -- the whole model, gathered and written by rank 0;
                                 optim/: the optimizer states, written by torch.distributed.checkpoint
                                 (DCP), each rank its own shard, read back on any number of ranks;
                                 trainer_state.pt (scheduler, RNG states, step, data position);
                                 <extra>/ (PPO's critic) like the model; COMPLETE (written last)
    final/                       the exported model: merged LoRA, loads in plain transformers

A checkpoint is written to a hidden temporary directory and renamed into place: a kill during a
save leaves a `.tmp-*` directory that resume never considers (and the next save removes). Pruning
renames a checkpoint to a hidden `.trash-*` name before deleting it, so a kill mid-delete never leaves
a `step-*` directory with its marker but not its files; the next prune deletes the leftovers.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from posttrain.models.loading import no_progress_bars
from posttrain.models.lora import is_peft, merged
from posttrain.runtime.distributed import Dist
from posttrain.runtime.files import WriteError, describe_write_error, fsync_dir

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINABLE_FILE = "trainable.safetensors"
OPTIM_DIR = "optim"


def _write_model(model, tokenizer, directory: Path, *, merge: bool, full: dict | None = None) -> None:
    """``full``: the model's whole state dict (gathered from the ranks) when ``model`` is sharded; the
    directory is then written from it."""
    if full is not None and merge and is_peft(model):
        model = plain_copy(model, full)  # merging needs real (unsharded) modules
        full = None
    to_save = merged(model) if merge else model
    with no_progress_bars():
        to_save.save_pretrained(str(directory), safe_serialization=True, **({"state_dict": full} if full else {}))
    if is_peft(model) and not merge:
        state = full if full is not None else model.state_dict()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items() if k in trainable},
            str(directory / TRAINABLE_FILE),
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _tied_keys(model) -> set[str]:
    """State-dict keys that are another weight (a tied-embedding model's LM head)."""
    base = model.get_base_model() if is_peft(model) else model
    if not getattr(base.config, "tie_word_embeddings", False):
        return set()
    prefix = "base_model.model." if is_peft(model) else ""
    return {prefix + k for k in dict(getattr(base, "_tied_weights_keys", None) or {})}


def plain_class(module) -> type:
    """The module's own class, under the subclass FSDP2 creates when it wraps a module."""
    return next(c for c in type(module).__mro__ if not c.__name__.startswith("FSDP"))


def plain_copy(model, full: dict):
    """An unwrapped CPU copy of a (sharded) model from its full state dict: built on the meta device, its
    parameters and persistent buffers taken from ``full``, the rest of its buffers (rotary frequencies)
    copied from ``model``, which keeps them whole on every rank."""
    base = model.get_base_model() if is_peft(model) else model
    with torch.device("meta"):
        plain = plain_class(base)(copy.deepcopy(base.config))
        if is_peft(model):
            from peft import get_peft_model  # noqa: PLC0415 - peft is optional (posttrain[peft])

            plain = get_peft_model(plain, copy.deepcopy(model.peft_config["default"]))
    missing = plain.load_state_dict(full, assign=True, strict=False).missing_keys
    if any(k not in _tied_keys(plain) for k in missing):
        raise RuntimeError(f"plain_copy: the gathered state dict lacks {missing}")
    plain.tie_weights()
    for name, buf in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(owner) if owner else plain, attr, buf.detach().cpu().clone())
    return plain


def _publish(tmp: Path, final: Path) -> None:
    (tmp / MARKER).write_text("ok\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():
        # Only ever replaced by a complete copy of the same step (e.g. a final export rerun).
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def _tmp_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _written(tmp: Path, final: Path, write, publish: bool = True, sync=lambda: None) -> None:
    """Run ``write()`` into ``tmp``, then publish it as ``final`` (``publish``: this process does; ``sync``
    waits for every writer first). A failed write removes the partial directory (it may be what filled
    the disk) and says what went wrong in words."""
    try:
        write()
        sync()
        if publish:
            _publish(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = describe_write_error(e, final.parent)
        if what is None:
            raise
        raise WriteError(f"{what} (while writing {final.name}; nothing was published)") from e


@contextlib.contextmanager
def _one_process_dcp():
    """DCP warns on every save / load without a process group that it assumes one process: that is
    what a single-process run means, so the warning says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    *,
    optimizer,
    scheduler,
    train_state: dict[str, Any],
    keep: int = 2,
    extras: dict[str, tuple] | None = None,
    dist=None,
) -> Path:
    """``extras``: other trained models of the run (PPO's critic) as {name: (model, optimizer)}, each saved
    in a subdirectory of its name. Every rank calls this (gathering the weights and writing the optimizer
    shards are collective); rank 0 writes the rest and publishes."""
    dist = dist or Dist()
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    tmp = dist.broadcast(_tmp_dir(root, name) if dist.is_main else None)
    models = {"": (model, tokenizer, optimizer), **{sub: (m, None, o) for sub, (m, o) in (extras or {}).items()}}
    fulls = {sub: full_state_dict(m, dist) for sub, (m, _, _) in models.items()}
    optims = {f"{sub or 'model'}": optimizer_state(m, o) for sub, (m, _, o) in models.items() if o is not None}

    def write() -> None:
        if dist.is_main:
            for sub, (m, tok, _) in models.items():
                _write_model(m, tok, tmp / sub if sub else tmp, merge=False, full=fulls[sub] if dist.enabled else None)
            torch.save(
                {
                    "step": step,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(),
                    "train_state": train_state,
                },
                tmp / STATE_FILE,
            )
        with _one_process_dcp():
            dcp.save(optims, checkpoint_id=str(tmp / OPTIM_DIR))

    final = root / name
    _written(tmp, final, write, publish=dist.is_main, sync=dist.barrier)
    if dist.is_main:
        _prune(root, keep)
    dist.barrier()
    return final


def full_state_dict(model, dist) -> dict | None:
    """The whole model's weights: gathered to rank 0 (on the CPU) from a sharded model; None on one
    process, where the model saves itself. Tied weights (the LM head of a tied-embedding model) are left
    out, as save_pretrained leaves them out of a model's own files."""
    if not dist.enabled:
        return None
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for key in _tied_keys(model):
        full.pop(key, None)
    return full


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state keyed by parameter names (sharded tensors under FSDP): what DCP saves and
    reshards for another number of ranks."""
    return get_optimizer_state_dict(model, optimizer)


def _trash(path: Path) -> None:
    """Delete a directory by renaming it out of sight first: a kill mid-delete leaves a `.trash-*`
    directory (removed by the next prune), never a half-deleted `step-*` one."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    complete = list_checkpoints(root.parent)
    for path in complete[:-keep] if keep > 0 else []:
        _trash(path)
    newest = int(_STEP_RE.match(complete[-1].name).group(1)) if complete else None
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and newest is not None and int(m.group(1)) < newest and p not in complete and p.is_dir():
            # Older than the newest complete checkpoint but itself incomplete: a leftover of a prune
            # interrupted before deletes were renamed first. Nothing can ever resume from it.
            _trash(p)
        elif p.name.startswith(".trash-") or (
            p.name.startswith((".tmp-", ".old-")) and not p.name.endswith(f"-{os.getpid()}")
        ):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones have no marker or a .tmp name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, model, *, optimizer, scheduler, extras: dict[str, tuple] | None = None
) -> dict[str, Any]:
    """Restore weights (in place), optimizers, scheduler and RNG, on any number of ranks (every rank
    calls it); return the saved train_state + step. ``extras`` as in ``save_checkpoint``."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    models = {"": (model, optimizer), **(extras or {})}
    for sub, (m, _) in models.items():
        load_weights(m, path / sub if sub else path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if "optimizer" in state:  # a checkpoint from before optimizer states went to DCP (one process)
        optimizer.load_state_dict(state["optimizer"])
    else:
        optims = {f"{sub or 'model'}": (m, o) for sub, (m, o) in models.items() if o is not None}
        saved = {k: optimizer_state(m, o) for k, (m, o) in optims.items()}
        with _one_process_dcp():
            dcp.load(saved, checkpoint_id=str(path / OPTIM_DIR))
        for k, (m, o) in optims.items():
            set_optimizer_state_dict(m, o, saved[k])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {"step": state["step"], **state["train_state"]}


def load_weights(model, directory: str | Path) -> None:
    """Load a checkpoint directory's weights into ``model`` in place, sharded or not: the whole state dict
    is read on every rank and each rank keeps its shard (``set_model_state_dict``). A causal LM or a
    sequence classifier is read by its own class; a LoRA model reads ``trainable.safetensors`` (keyed by
    its own parameter names), or peft's adapter file from an older checkpoint."""
    directory = Path(directory)
    if is_peft(model):
        if not (directory / TRAINABLE_FILE).is_file():
            from peft import set_peft_model_state_dict  # noqa: PLC0415 - peft is optional (posttrain[peft])

            set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
            return
        state, strict = load_file(str(directory / TRAINABLE_FILE)), False
    else:
        with no_progress_bars():
            state = (
                plain_class(model).from_pretrained(str(directory), dtype=next(model.parameters()).dtype).state_dict()
            )
        strict = True
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def export_model(run_dir: str | Path, model, tokenizer, name: str = "final", dist=None) -> Path:
    """The deliverable: merged weights + tokenizer, loadable by transformers, vLLM and peft users. Every
    rank calls it; rank 0 writes one ordinary directory."""
    dist = dist or Dist()
    run_dir = Path(run_dir)
    final = run_dir / name
    full = full_state_dict(model, dist)
    if dist.is_main:
        tmp = _tmp_dir(run_dir, name)
        _written(tmp, final, lambda: _write_model(model, tokenizer, tmp, merge=True, full=full))
    dist.barrier()
    return final


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()
