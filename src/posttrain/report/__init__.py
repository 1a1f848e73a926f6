"""`posttrain report RUN_DIR`: one self-contained HTML file (inline CSS and SVG, no scripts) per run or pipeline:
curves, accuracy per stage, sample completions and configs in one offline file.

The page is built from plain strings; every piece of text that came from a file (model completions, prompts,
config values, metric names) passes through ``escape`` exactly once, where it is placed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain.io_utils import atomic_write_text
from posttrain.report.html import render_run
from posttrain.report.load import PipelineData, load
from posttrain.report.pipeline import render_pipeline

__all__ = ["build_report", "main"]


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` for a recipe run or a pipeline directory and return its path."""
    data = load(run_dir)
    text = render_pipeline(data) if isinstance(data, PipelineData) else render_run(data)
    out = Path(run_dir) / "report.html"
    atomic_write_text(out, text)
    return out


def main(argv: list[str]) -> int:
    """posttrain report RUN_DIR: write RUN_DIR/report.html (a recipe run or a pipeline directory)."""
    p = argparse.ArgumentParser(prog="posttrain report", description=main.__doc__)
    p.add_argument("run_dir", help="a run's output_dir, or a pipeline directory holding pipeline.json")
    a = p.parse_args(argv)
    print(f"posttrain report: wrote {build_report(a.run_dir)}")
    return 0
