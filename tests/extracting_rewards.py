"""A user reward function that tells maj@k how to read its answer (`extract_answer`)."""


def last_char(completions, **kwargs):
    return [1.0 if c.endswith("2") else 0.0 for c in completions]


last_char.extract_answer = lambda text: text[-1:] or None
