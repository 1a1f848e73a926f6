"""Metric sinks: metrics.jsonl always; TensorBoard / W&B / trackio when installed and asked for."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.runtime.errors import TrackingError
from posttrain.runtime.files import keep_steps_upto

SINKS = ("tensorboard", "wandb", "trackio")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Tracker:
    """One record per step in ``metrics.jsonl`` (flushed per line, so a kill loses at most one)."""

    def __init__(
        self,
        run_dir: str | Path,
        report_to: tuple[str, ...] = (),
        config: dict | None = None,
        resume_step: int | None = None,
        name: str = "run",
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            keep_steps_upto(self.path, resume_step)  # later records will be produced again
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a", encoding="utf-8")
        self._sinks = [_open_sink(s, Path(run_dir), config or {}, name) for s in report_to]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        for sink in self._sinks:
            sink(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        self._fh.close()
        for sink in self._sinks:
            getattr(sink, "close", lambda: None)()


def _open_sink(name: str, run_dir: Path, config: dict, run_name: str):
    if name not in SINKS:
        raise TrackingError(f"train.report_to: unknown sink {name!r} (choose from {', '.join(SINKS)})")
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional sinks load when asked for

            writer = SummaryWriter(str(run_dir / "tensorboard"))

            def tb(step, metrics):
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)

            tb.close = writer.close
            return tb
        if name == "wandb":
            import wandb  # noqa: PLC0415 - optional sink

            run = wandb.init(project="posttrain", name=run_name, config=config, dir=str(run_dir))

            def wb(step, metrics):
                run.log(metrics, step=step)

            wb.close = run.finish
            return wb
        import trackio  # noqa: PLC0415 - optional sink

        trackio.init(project="posttrain", name=run_name, config=config)

        def tr(step, metrics):
            trackio.log(metrics, step=step)

        tr.close = trackio.finish
        return tr
    except ImportError as e:
        raise TrackingError(
            f"train.report_to asks for {name!r} but it is not installed ({e}); "
            f"pip install 'posttrain[tracking]' or remove it from report_to"
        ) from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
