"""Evaluation with verifiers: ``stats`` (Wilson and normal intervals, unbiased pass@k, maj@k, the majority
baseline: pure functions) and ``accuracy`` (greedy accuracy, pass@k, maj@k and mean@k of a model on a prompt
set, through the rollout engines).

May import: rollout, rewards, models, data, config, runtime; never rl, recipes, pipeline or commands.
"""

from posttrain.evaluation.accuracy import (
    EvalSummary,
    answer_extractor,
    evaluate,
    evaluate_model_dir,
    format_summary,
    sample_completions,
)
from posttrain.evaluation.stats import (
    Z95,
    majority_baseline,
    majority_correct,
    mean_ci,
    pass_at_k,
    versus_baseline,
    versus_majority,
    wilson,
)

__all__ = [
    "EvalSummary",
    "Z95",
    "answer_extractor",
    "evaluate",
    "evaluate_model_dir",
    "format_summary",
    "majority_baseline",
    "majority_correct",
    "mean_ci",
    "pass_at_k",
    "sample_completions",
    "versus_baseline",
    "versus_majority",
    "wilson",
]
