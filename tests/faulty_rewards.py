"""Reward functions that misbehave, imported by tests through `faulty_rewards:NAME`."""


def inf_first(completions, **kwargs):
    """+inf for the first completion of every batch, 0 for the rest."""
    return [float("inf") if i == 0 else 0.0 for i in range(len(completions))]


def nan_float(completions, **kwargs):
    """A NaN returned as a number (a bug, e.g. 0/0 in numpy) -- not TRL's None."""
    return [float("nan") if i == 1 else 1.0 for i in range(len(completions))]


def none_odd(completions, **kwargs):
    """TRL's None ("does not apply") on odd rows."""
    return [None if i % 2 else 0.5 for i in range(len(completions))]


def constant(completions, **kwargs):
    """The same reward for everything: no group ever varies."""
    return [1.0] * len(completions)
