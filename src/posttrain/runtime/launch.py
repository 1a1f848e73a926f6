"""What the launcher told this process (torchrun's environment variables), torch-free so that the CLI entry
can ask without importing torch. ``runtime.distributed`` re-exports ``launched``."""

from __future__ import annotations

import os

__all__ = ["is_main_process", "launched"]


def is_main_process() -> bool:
    """Rank 0 of a launched job, or a single process: the one that prints a command's summary."""
    return os.environ.get("RANK", "0") == "0"


def launched() -> bool:
    """Started by torchrun (or another env:// launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
