"""Checkpoints in save_pretrained format plus the exact training state, written atomically.

Layout of a run directory:

    checkpoints/step-00000010/   model.safetensors (or the LoRA adapter), config.json, tokenizer files,
                                 trainer_state.pt (optimizer, scheduler, RNG states, step, data position),
                                 COMPLETE (written last)
    final/                       the exported model: merged LoRA, loads in plain transformers

A checkpoint is written to a hidden temporary directory and renamed into place: a kill during a
save leaves a `.tmp-*` directory that resume never considers (and the next save removes). Pruning
renames a checkpoint to a hidden `.trash-*` name before deleting it, so a kill mid-delete never leaves
a `step-*` directory with its marker but not its files; the next prune deletes the leftovers.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.io_utils import WriteError, describe_write_error, fsync_dir
from posttrain.models.lora import is_peft, merged

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


def _write_model(model, tokenizer, directory: Path, *, merge: bool) -> None:
    to_save = merged(model) if merge else model
    to_save.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


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


def _written(tmp: Path, final: Path, write) -> None:
    """Run ``write()`` into ``tmp``, then publish it as ``final``. A failed write removes the partial
    directory (it may be what filled the disk) and says what went wrong in words."""
    try:
        write()
        _publish(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = describe_write_error(e, final.parent)
        if what is None:
            raise
        raise WriteError(f"{what} (while writing {final.name}; nothing was published)") from e


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, *, optimizer, scheduler,
                    train_state: dict[str, Any], keep: int = 2, extras: dict[str, Any] | None = None) -> Path:
    """``extras``: other trained models of the run (PPO's critic), each saved in a subdirectory of its
    name and restored with ``load_weights(model, checkpoint / name)``; their optimizer states go in
    ``train_state``."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    tmp = _tmp_dir(root, name)

    def write() -> None:
        _write_model(model, tokenizer, tmp, merge=False)
        for sub, extra in (extras or {}).items():
            _write_model(extra, None, tmp / sub, merge=False)
        torch.save({
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "train_state": train_state,
        }, tmp / STATE_FILE)

    final = root / name
    _written(tmp, final, write)
    _prune(root, keep)
    return final


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
        elif p.name.startswith(".trash-") or (p.name.startswith((".tmp-", ".old-"))
                                               and not p.name.endswith(f"-{os.getpid()}")):
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


def load_checkpoint(path: str | Path, model, *, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights (in place), optimizer, scheduler and RNG; return the saved train_state + step."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    if is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    else:
        load_weights(model, path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {"step": state["step"], **state["train_state"]}


def load_weights(model, directory: str | Path) -> None:
    """Load a save_pretrained directory's weights into ``model`` in place (its own class reads them, so
    causal LMs and sequence classifiers alike)."""
    saved = type(model).from_pretrained(str(directory), dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


def export_model(run_dir: str | Path, model, tokenizer, name: str = "final") -> Path:
    """The deliverable: merged weights + tokenizer, loadable by transformers, vLLM and peft users."""
    run_dir = Path(run_dir)
    tmp = _tmp_dir(run_dir, name)
    final = run_dir / name
    _written(tmp, final, lambda: _write_model(model, tokenizer, tmp, merge=True))
    return final


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()
