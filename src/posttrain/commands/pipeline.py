"""`posttrain pipeline CONFIG.yaml`: run the stages a pipeline config lists, with evaluation between them,
and print the per-stage table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from posttrain.config import ConfigError, recipe_help
from posttrain.pipeline.stages import format_table, load_pipeline, run
from posttrain.rewards.registry import add_search_dir
from posttrain.runtime.launch import is_main_process


def main(argv: list[str]) -> int:
    """posttrain pipeline CONFIG.yaml [key.sub=value ...]"""
    if any(a in ("-h", "--help") for a in argv):
        print(recipe_help("pipeline"))
        print("\nEach stage's `config` is that recipe's config: posttrain RECIPE --help lists its fields.")
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    cfg = load_pipeline(path, argv[1:] if path else argv)
    if path:
        add_search_dir(Path(path).resolve().parent)  # `module:function` rewards next to the config file
    try:
        summary = run(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    if not is_main_process():
        return 0  # under torchrun the table is printed once, by rank 0
    Console().print(format_table(summary))
    print(f"report: {Path(cfg.output_dir) / 'report.html'}")
    return 0
