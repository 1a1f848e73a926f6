"""Error types whose message says all a user needs (what, where, what to do): ``posttrain`` prints it
without a traceback. They live here, torch-free, so the CLI entry can name them without importing torch;
the modules that raise them re-export them (``posttrain.run.loop.NonFiniteError`` still works)."""


class ModelError(ValueError):
    """A model directory, model option or device that cannot be used (named in the message)."""


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient; the run stops before the optimizer step, checkpoints stay intact."""


class RunDirError(RuntimeError):
    """The run directory cannot take this run as configured; nothing was written."""


class TrackingError(RuntimeError):
    """A metrics sink that was asked for cannot run (not installed, or failed to start)."""


class ReportError(ValueError):
    """The directory is not a run (or pipeline) directory; nothing was written."""
