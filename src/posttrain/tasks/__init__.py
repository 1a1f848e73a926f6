"""Built-in tasks: generated data with checkable answers (no downloads), read as ``builtin:<task>``.

The bottom layer: imports nothing of posttrain outside ``tasks``.
"""

from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.clauses import ClausesTask
from posttrain.tasks.counting import CountingTask
from posttrain.tasks.extraction import ExtractionTask
from posttrain.tasks.toolcalc import ToolCalcTask

BUILTIN_TASKS = {
    "arithmetic": ArithmeticTask,
    "counting": CountingTask,
    "clauses": ClausesTask,
    "extraction": ExtractionTask,
    "tools": ToolCalcTask,
}


def get_task(name: str, **options):
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown builtin task {name!r}; available: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name](**options)
