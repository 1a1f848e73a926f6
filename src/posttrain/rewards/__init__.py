"""Rewards: everything that scores a completion against a dataset row. Verifiers (math, code in the sandbox,
structured output, format, the spurious controls) and reward models behind one registry, the composite
reward the RL recipes train on, and the audit that attacks a verifier before a policy does.

    from posttrain import rewards
    math_check = rewards.load("math", timeout=5)
    math_check("... so \\boxed{0.5}", answer="\\frac12")        # -> 1.0 (a Score: a float with .reason)
    trl_fn = rewards.batch(math_check)                          # fn(completions, prompts=..., answer=[...])
    reward = rewards.build_reward([("math", 1.0, {}), ("format", 0.1, {})])
    reward(completions, prompts, {"answer": answers}).total

Built-in names: math, code, json, label, format, regex, overlong, random, incorrect, format_only; any
other "pkg.module:function" imports a user function (TRL batch form or per-example form).
See base.py for the failure policy (what scores 0 and what raises). Importing this package imports
neither math-verify, the code sandbox nor torch (a reward model loads them when it is built).

May import: rollout (a judge runs on its engines), models, data, config, runtime; never evaluation, run, rl,
recipes or above.
"""

from .base import Score, Verifier, VerifierError, as_text, batch, is_correct, score_all
from .composite import RewardFunction, RewardScores, build_reward
from .extract import Extraction, extract_answer, extract_answers
from .registry import BUILTINS, UserFunction, load

__all__ = [
    "BUILTINS",
    "Extraction",
    "RewardFunction",
    "RewardScores",
    "Score",
    "UserFunction",
    "Verifier",
    "VerifierError",
    "as_text",
    "batch",
    "build_reward",
    "extract_answer",
    "extract_answers",
    "is_correct",
    "load",
    "score_all",
]
