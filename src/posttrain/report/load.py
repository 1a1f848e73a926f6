"""Read a run directory (one recipe run, or a pipeline of them) into plain records for the report.

Tolerant by design: a report is most wanted for runs that died, so a missing file or a torn last line of
metrics.jsonl shows up as "missing" in the report instead of an exception. Only a run_dir that does not exist,
or holds none of the files a run or a pipeline writes, raises.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from posttrain.runtime.errors import ReportError

# A recipe run writes config.yaml first; any of these marks a directory as a run's.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoints", "final")


@dataclass(frozen=True)
class RunData:
    """One recipe run: its resolved config, per-step metrics and sampled completions."""

    name: str
    path: Path
    exists: bool
    recipe: str | None = None
    config_text: str | None = None
    metrics: tuple[dict, ...] = ()
    samples: tuple[dict, ...] = ()
    finished: datetime | None = None  # mtime of the newest file read
    problems: tuple[str, ...] = ()  # unreadable lines or files, shown in the report
    warnings: tuple[dict, ...] = ()  # RL diagnostics' warnings (warnings.jsonl): kind, step, cause, suggestion
    best: dict | None = None  # keep_best: best.json (step and held-out accuracy of best/)


@dataclass(frozen=True)
class StageData:
    name: str
    recipe: str | None
    eval: dict | None
    seconds: float | None
    ref_model: str | None
    run: RunData | None
    of: str | None = None  # for controls: the stage this control is the counterpart of
    dir: str | None = None  # as written in pipeline.json, relative to the pipeline directory
    start_stage: str | None = None  # the earlier stage whose model this stage started from


@dataclass(frozen=True)
class PipelineData:
    name: str
    path: Path
    stages: tuple[StageData, ...]
    controls: tuple[StageData, ...] = ()
    baseline_eval: dict | None = None
    total_seconds: float | None = None
    finished: datetime | None = None
    raw: dict = field(default_factory=dict)
    ablations: tuple[dict, ...] = ()  # ablations.json (posttrain demo --evidence): on/off runs with their evals


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path.name} line {i}: not valid JSON (skipped)")
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows, problems


def _mtime(*paths: Path) -> datetime | None:
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return datetime.fromtimestamp(max(times)) if times else None


def _recipe_from_config(text: str) -> str | None:
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    recipe = cfg.get("recipe") if isinstance(cfg, dict) else None
    return str(recipe) if recipe is not None else None


def load_run(path: Path, name: str | None = None) -> RunData:
    name = name or path.resolve().name
    if not path.is_dir():
        return RunData(name=name, path=path, exists=False)
    cfg_path, met_path, smp_path = path / "config.yaml", path / "metrics.jsonl", path / "samples.jsonl"
    config_text = cfg_path.read_text(encoding="utf-8", errors="replace") if cfg_path.exists() else None
    metrics, problems = _read_jsonl(met_path) if met_path.exists() else ([], [])
    samples, smp_problems = _read_jsonl(smp_path) if smp_path.exists() else ([], [])
    metrics = sorted((m for m in metrics if numeric(m.get("step")) is not None), key=lambda m: m["step"])
    warnings, warn_problems = _read_jsonl(path / "warnings.jsonl") if (path / "warnings.jsonl").exists() else ([], [])
    best = _read_json_dict(path / "best.json")
    return RunData(
        name=name,
        path=path,
        exists=True,
        recipe=_recipe_from_config(config_text) if config_text else None,
        config_text=config_text,
        metrics=tuple(metrics),
        samples=tuple(samples),
        finished=_mtime(cfg_path, met_path, smp_path),
        problems=tuple(problems + smp_problems + warn_problems),
        warnings=tuple(warnings),
        best=best,
    )


def _read_json_dict(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _stage(entry: dict, root: Path, stage_index: int) -> StageData:
    name = str(entry.get("name") or f"stage {stage_index + 1}")
    run = load_run(root / entry["dir"], name) if entry.get("dir") else None
    recipe = entry.get("recipe") or (run.recipe if run else None)
    ev = entry.get("eval") if isinstance(entry.get("eval"), dict) else None
    return StageData(
        name=name,
        recipe=recipe,
        eval=ev,
        seconds=numeric(entry.get("seconds")),
        ref_model=entry.get("ref_model"),
        run=run,
        of=entry.get("of"),
        dir=entry.get("dir"),
        start_stage=entry.get("start_stage") or None,
    )


def load_pipeline(path: Path) -> PipelineData:
    raw = json.loads((path / "pipeline.json").read_text(encoding="utf-8"))
    stages = tuple(_stage(e, path, i) for i, e in enumerate(raw.get("stages") or []))
    controls = tuple(_stage(e, path, i) for i, e in enumerate(raw.get("controls") or []))
    base = raw.get("baseline_eval") if isinstance(raw.get("baseline_eval"), dict) else None
    ablations = []
    if (path / "ablations.json").exists():
        try:
            ablations = json.loads((path / "ablations.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            ablations = []
    return PipelineData(
        name=path.resolve().name,
        path=path,
        stages=stages,
        controls=controls,
        baseline_eval=base,
        total_seconds=numeric(raw.get("total_seconds")),
        finished=_mtime(path / "pipeline.json"),
        raw=raw,
        ablations=tuple(a for a in ablations if isinstance(a, dict)),
    )


def load(run_dir: str | Path) -> RunData | PipelineData:
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ReportError(f"{run_dir} is a file, not a run directory")
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    if (path / "pipeline.json").exists():
        return load_pipeline(path)
    if not any((path / name).exists() for name in RUN_MARKERS):
        raise ReportError(
            f"{run_dir} is not a run directory (it has no {', '.join(RUN_MARKERS)} or pipeline.json); "
            f"give a run's train.output_dir or a pipeline's output_dir"
        )
    return load_run(path)


def numeric(v: Any) -> float | None:
    """A finite number, or None (the tracker writes non-finite floats as strings like "nan")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None
