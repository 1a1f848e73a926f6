"""The run report: one self-contained HTML file (inline CSS and SVG, no scripts) per run or pipeline:
curves, accuracy per stage, sample completions and configs in one offline file (``build_report``).
``load`` reads a run directory, ``html`` and ``pipeline`` render a run and a pipeline, ``svg`` draws the plots.

The page is built from plain strings; every piece of text that came from a file (model completions, prompts,
config values, metric names) passes through ``escape`` exactly once, where it is placed.

May import: run, evaluation, rewards and everything below; never rl, recipes, pipeline or commands.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.report.html import render_run
from posttrain.report.load import PipelineData, load
from posttrain.report.pipeline import render_pipeline
from posttrain.runtime.files import atomic_write_text

__all__ = ["build_report", "main"]


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` for a recipe run or a pipeline directory and return its path."""
    data = load(run_dir)
    text = render_pipeline(data) if isinstance(data, PipelineData) else render_run(data)
    out = Path(run_dir) / "report.html"
    atomic_write_text(out, text)
    return out
