"""Static HTML run report: curves, accuracy per stage, sample completions and configs in one offline file."""

from posttrain.report.html import build_report, main

__all__ = ["build_report", "main"]
