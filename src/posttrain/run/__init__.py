"""The run glue every recipe shares: the run directory (what may be written, what may resume: ``rundir``),
preflight (resolve data, models, verifiers and the run directory before anything starts: ``preflight``) and
the loop helpers (start a run, wrap the model for torchrun, optimizer and schedule, save / resume / export,
progress: ``loop``).

May import: rewards, rollout, models, data, config, losses, runtime; never rl, recipes, pipeline or commands.
"""
