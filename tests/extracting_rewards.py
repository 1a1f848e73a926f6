"""A user reward function that tells maj@k how to read its answer (`extract_answer`)."""


def last_char(completions, **kwargs):
    return [1.0 if c.endswith("2") else 0.0 for c in completions]


last_char.extract_answer = lambda text: text[-1:] or None


class Costly:
    """A verifier class that is expensive to build (e.g. it loads a model): the preflight must not build it."""

    built = 0

    def __init__(self, *, threshold: float = 0.5):
        Costly.built += 1
        self.threshold = threshold

    def __call__(self, completion, **row):
        return 1.0
