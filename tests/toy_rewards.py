"""Toy reward functions in TRL's batch form, imported by tests through `toy_rewards:NAME`."""


def ones(completions, **kwargs):
    """Fraction of the completion's characters that are '1': a dense, checkable toy reward."""
    return [sum(c == "1" for c in text) / max(1, len(text)) for text in completions]
