"""Tiny user reward functions, loaded by tests as "reward_fns_example:<name>" (tests/ is on sys.path)."""


def length_reward(completions, prompts=None, **kwargs):
    """TRL batch form, written the way TRL users write them: columns arrive as lists in kwargs."""
    targets = kwargs["target_len"]
    return [1.0 if len(c) == t else 0.0 for c, t in zip(completions, targets)]


def skip_odd_rows(completions, **kwargs):
    """TRL's None = "does not apply to this row"."""
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def contains_keyword(completion, **example):
    """Per-example form."""
    return 1.0 if example["keyword"] in completion else 0.0


def broken(completions, **kwargs):
    raise ZeroDivisionError("bug in the user's reward function")
