"""Will it fit? ``estimate``: per-GPU memory of a run by component, from a model's config alone (no weights,
nothing allocated), and the search for the cheapest configuration that fits (``posttrain plan``).

The bottom layer: pure arithmetic, imports nothing of posttrain.
"""
