"""A run directory holds one run: what may be written into it, and what it may resume.

A run directory is a user's record of an experiment, so before anything is written `check_run_dir`
decides, from the directory's contents and the new config alone, one of:

  - a fresh run: the directory is new, or empty of run files, or its run never reached a checkpoint;
  - a resume from a complete checkpoint (`train.resume: auto`, or an explicit checkpoint path), when the
    saved `config.yaml` differs from the new config only in fields that do not change the experiment
    (`SAFE_FIELDS`: logging, progress, sinks, cadence of saves and evals, a larger `train.steps`, ...);
  - a refusal (`RunDirError`), naming the directory and what to do instead, when the directory belongs to
    another recipe, holds a run that `train.resume: never` would mix with a new one, holds checkpoints
    beyond `train.steps`, or holds a run whose experiment-changing fields differ (the diff is listed).

The rules are driven by field names, not by recipe, so every recipe that calls `loop.start_run` gets
them. `open_run_dir` then writes `config.yaml` and, for a resume, appends what changed to
`resumes.jsonl` (the record of every continuation and its allowed changes).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import to_dict
from posttrain.config.loading import RUN_RECORD_KEYS  # top-level facts of config.yaml that are not config fields
from posttrain.models import checkpoint as ckpt
from posttrain.runtime.errors import RunDirError
from posttrain.runtime.files import WriteError, atomic_write_text, describe_write_error

log = logging.getLogger("posttrain")


# What a recipe run writes into its directory: any of these means the directory already holds a run.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "samples.jsonl",
    "resumes.jsonl",
    "rewards.json",
    "checkpoints",
    "final",
    "report.html",
    "tensorboard",
    "wandb",
)
RESUMES = "resumes.jsonl"

# Fields that may differ between a checkpoint's run and its continuation without changing what is
# trained: where and how it is logged, how often it is saved or evaluated, how it is computed. A field
# is safe when its dotted name (list indices dropped) or a section above it is listed; every other
# field, including any a newer recipe adds, changes the experiment. `train.steps` is handled apart: it
# may change as long as it does not fall below the checkpoint's step.
SAFE_FIELDS = frozenset(
    {
        "train.progress",
        "train.log_every",
        "train.report_to",
        "train.save_every",
        "train.keep_checkpoints",
        "train.eval_every",
        "train.resume",
        "train.output_dir",
        "train.threads",
        "train.steps",
        "model.device",
        # How the work is laid out over ranks, not what is computed (N ranks == 1 rank, tests/test_distributed.py).
        "train.strategy",
        "train.cpu_offload",
        "eval_every",
        "eval_examples",
        "samples_every",
        "reward_workers",
        # A run under `error` stopped at its first non-finite reward, so nothing before the checkpoint was
        # ever replaced: switching the policy changes no step already taken.
        "reward_non_finite",
    }
)

_ABSENT = "(absent)"


@dataclass(frozen=True)
class RunDirPlan:
    """What `check_run_dir` decided: resume from `resume_from` (at `resume_step`), or start fresh."""

    dir: Path
    resume_from: Path | None = None
    resume_step: int | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # safe fields: (saved, new)
    replaces: tuple[str, ...] = ()  # run files of a run that never reached a checkpoint


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 5}, "rewards": [{"name": "math"}]} -> {"train.steps": 5, "rewards[0].name": "math"}."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, (list, tuple)) and data:
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = list(data) if isinstance(data, tuple) else data
    return out


def is_safe(key: str) -> bool:
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    return any(".".join(parts[:i]) in SAFE_FIELDS for i in range(1, len(parts) + 1))


LAYOUT_FIELDS = ("train.micro_batch_size", "train.grad_accum")


def global_batch(data: dict, world: int) -> int | None:
    """Items one optimizer step trains on, over all ranks, for the recipes whose batch is the data
    sampler's (micro_batch_size x grad_accum x world_size); None for RL recipes, whose batch is
    ``prompts_per_step`` and whose micro_batch_size only lays out the work."""
    if "prompts_per_step" in data:
        return None
    train = data.get("train") or {}
    return int(train.get("micro_batch_size", 0)) * int(train.get("grad_accum", 1)) * world


def layout_only(changes: dict, saved: dict, cfg: Any, world: int) -> bool:
    """Do the changed layout fields keep the step's global batch (e.g. a 2-rank run resumed on one rank
    with twice the grad_accum)? Then they change how the work is split, not what is computed: losses take
    global counts (tests/test_distributed.py)."""
    if not any(k in changes for k in LAYOUT_FIELDS):
        return False
    before = global_batch(saved, int(saved.get("world_size", 1)))
    return before is None or before == global_batch(to_dict(cfg), world)


def config_diff(saved: dict, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Fields whose value in the saved config (plain data from config.yaml) differs from ``cfg``'s.
    A field the saved config lacks (written by an older version) counts as its default."""
    new = flatten(to_dict(cfg))
    defaults = flatten(to_dict(type(cfg)()))
    old = flatten({k: v for k, v in saved.items() if k not in RUN_RECORD_KEYS})
    diff = {}
    for key in sorted(set(new) | set(old)):
        before = old.get(key, defaults.get(key, _ABSENT))
        after = new.get(key, _ABSENT)
        if before != after:
            diff[key] = (before, after)
    return diff


def run_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (run_dir / name).exists()] if run_dir.is_dir() else []


def read_saved_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(
            f"{path}: unreadable ({type(e).__name__}); this directory's run cannot be checked, "
            f"so nothing is written into it: choose another train.output_dir"
        ) from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a posttrain run config; choose another train.output_dir")
    return data


def _fmt(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value, default=str)


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items())


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_run_dir(cfg: Any, recipe: str, world: int = 1) -> RunDirPlan:
    """Decide what this run does with ``cfg.train.output_dir`` (see the module docstring). Reads only."""
    train = cfg.train
    run_dir = Path(train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"train.output_dir={train.output_dir!r} exists and is not a directory")
    found = run_files(run_dir)
    saved = read_saved_config(run_dir)
    saved_recipe = saved.get("recipe") if saved else None
    if saved_recipe is not None and saved_recipe != recipe:
        raise RunDirError(
            f"run directory {run_dir} holds a run of recipe {saved_recipe!r} (its config.yaml says so); "
            f"a {recipe} run needs a directory of its own: set train.output_dir to a new directory"
        )
    if train.resume == "never":
        if found:
            raise RunDirError(
                f"train.resume=never, but run directory {run_dir} already holds a run "
                f"({', '.join(found)}); a new run would mix with it (a later resume would pick up the "
                f"old checkpoints). Nothing was changed: set train.output_dir to a new directory, or "
                f"delete {run_dir} first"
            )
        return RunDirPlan(run_dir)
    if train.resume == "auto":
        source = ckpt.latest_checkpoint(run_dir)
    else:
        source = Path(train.resume)
        if not ckpt.is_complete(source) or not (source / ckpt.STATE_FILE).is_file():
            raise RunDirError(
                f"train.resume={train.resume!r}: not a complete checkpoint directory "
                f"(expected RUN/checkpoints/step-N with {ckpt.MARKER} and {ckpt.STATE_FILE})"
            )
        if found and not _inside(source, run_dir):
            raise RunDirError(
                f"train.resume={train.resume!r} is another run's checkpoint, but {run_dir} already holds "
                f"a run ({', '.join(found)}); continuing one run inside another mixes them: set "
                f"train.output_dir to a new directory"
            )
    if source is None:
        if (run_dir / "final").exists():
            raise RunDirError(
                f"run directory {run_dir} holds an exported model (final/) but no checkpoint to "
                f"resume from; a new run would overwrite it: set train.output_dir to a new directory, or "
                f"delete {run_dir}"
            )
        return RunDirPlan(run_dir, replaces=tuple(found))
    step = _checkpoint_step(source)
    if step > train.steps:
        raise RunDirError(
            f"train.steps={train.steps}, but the checkpoint to resume ({source}) is at step {step}: "
            f"resuming would export a model trained for {step} steps. Set train.steps >= {step}, or "
            f"start a new run in a new train.output_dir"
        )
    origin = source.parent.parent
    origin_saved = saved if _inside(origin, run_dir) else read_saved_config(origin)
    if origin_saved is None:
        raise RunDirError(
            f"{origin} holds checkpoints but no config.yaml, so what they were trained with is unknown; "
            f"nothing is resumed from it: set train.output_dir to a new directory"
        )
    if origin_saved.get("recipe", recipe) != recipe:
        raise RunDirError(
            f"train.resume={train.resume!r} is a checkpoint of a {origin_saved['recipe']} run; a "
            f"{recipe} run cannot continue it"
        )
    changes = config_diff(origin_saved, cfg)
    layout = layout_only(changes, origin_saved, cfg, world)
    experiment = {k: v for k, v in changes.items() if not is_safe(k) and not (layout and k in LAYOUT_FIELDS)}
    if experiment and _inside(origin, run_dir):
        safe = {k: v for k, v in changes.items() if is_safe(k)}
        raise RunDirError(
            f"run directory {run_dir} holds a {recipe} run (checkpoint at step {step}) whose config differs in fields "
            f"that change the experiment:\n{format_changes(experiment)}\n"
            "Resuming would continue the old run while config.yaml claimed the new values. To run this config, "
            "set train.output_dir to a new directory (add train.resume=never to make sure none is reused); to "
            "continue the old run, undo these changes; to branch from the checkpoint with them, set "
            f"train.resume={source} and a new train.output_dir."
            + (f"\nThese changes would be allowed:\n{format_changes(safe)}" if safe else "")
        )
    return RunDirPlan(run_dir, source, step, changes)


def open_run_dir(cfg: Any, recipe: str, world: int = 1) -> RunDirPlan:
    """`check_run_dir`, then create the directory and write its record: config.yaml (with the number of
    ranks it ran on), and for a resume a line in resumes.jsonl with the checkpoint and the changed fields."""
    plan = check_run_dir(cfg, recipe, world)
    try:
        plan.dir.mkdir(parents=True, exist_ok=True)
        record = {"recipe": recipe, **({"world_size": world} if world > 1 else {}), **to_dict(cfg)}
        atomic_write_text(plan.dir / "config.yaml", yaml.safe_dump(record, sort_keys=False))
        resumes = plan.dir / RESUMES
        if plan.resume_from is None:
            resumes.unlink(missing_ok=True)  # a fresh run: no continuation of anything
        else:
            record = {
                "step": plan.resume_step,
                "from": str(plan.resume_from),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "changed": {k: [a, b] for k, (a, b) in plan.changes.items()},
            }
            with open(resumes, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
    except OSError as e:
        what = describe_write_error(e, plan.dir)
        if what is None:
            raise
        raise WriteError(f"{what} (train.output_dir={cfg.train.output_dir!r})") from e
    if plan.changes:
        log.info(
            "resuming %s from step %d with changed fields (recorded in %s):\n%s",
            plan.dir,
            plan.resume_step,
            RESUMES,
            format_changes(plan.changes),
        )
    if plan.replaces:
        log.warning(
            "%s: the run there never reached a checkpoint; starting over (its %s are replaced)",
            plan.dir,
            ", ".join(plan.replaces),
        )
    return plan
