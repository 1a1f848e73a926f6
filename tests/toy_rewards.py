"""Toy reward functions in TRL's batch form, imported by tests through `toy_rewards:NAME`."""


def ones(completions, **kwargs):
    """Fraction of the completion's characters that are '1': a dense, checkable toy reward."""
    return [sum(c == "1" for c in text) / max(1, len(text)) for text in completions]


def parity(completion, answer="0", **row):
    """1.0 when the completion's character codes plus int(answer) sum to an even number: a
    deterministic verdict that splits a random model's samples about evenly and depends on a
    dataset column (so a test can see that the row's columns reach the verifier)."""
    return float((sum(map(ord, completion)) + int(answer)) % 2 == 0)


def fails_on_rank_1(completions, **kwargs):
    """A reward that raises on data-parallel rank 1 only: one rank's error must stop every rank."""
    import os

    if os.environ.get("RANK") == "1":
        raise ValueError("boom on rank 1")
    return [0.0] * len(completions)
