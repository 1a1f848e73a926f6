"""`posttrain report RUN_DIR`: write RUN_DIR/report.html for a recipe run or a pipeline directory."""

from __future__ import annotations

import argparse

from posttrain.report import build_report


def main(argv: list[str]) -> int:
    """posttrain report RUN_DIR: write RUN_DIR/report.html (a recipe run or a pipeline directory)."""
    p = argparse.ArgumentParser(prog="posttrain report", description=main.__doc__)
    p.add_argument("run_dir", help="a run's output_dir, or a pipeline directory holding pipeline.json")
    a = p.parse_args(argv)
    print(f"posttrain report: wrote {build_report(a.run_dir)}")
    return 0
