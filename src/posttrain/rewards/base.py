"""The verifier protocol, the score record, and the adapters between the per-example and the TRL batch form.

A verifier is a plain callable `verifier(completion: str, **example) -> float`, where `example` is one dataset
row (its columns, plus `prompt`). Scores are in [0, 1] except for documented penalty terms (`overlong`).

A verifier MAY also define `score_batch(completions, examples) -> list[float]`; slow verifiers (math, code)
use it to run a whole batch through their worker pool. Everything that scores batches goes through
`score_all`, which picks `score_batch` when present.

Failure policy (one rule for every verifier): a well-defined failure of the *completion* (no extractable
answer, invalid JSON, a check that timed out or crashed its worker) scores 0 and says why in
`Score.reason`. Anything else, a bug in a verifier or an exception raised by a user's reward function, is
not a property of the completion: it propagates as `VerifierError` naming the verifier and the row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Example = Mapping[str, Any]


class VerifierError(RuntimeError):
    """A verifier (or a user reward function) raised; carries which one and which row."""


# `Score.reason` of a NaN that means "this reward does not apply to this row" (a user function returned
# None, TRL's convention): left out of a weighted sum. Any other non-finite score is a fault.
NOT_APPLICABLE = "not_applicable"

# The status (`Score.reason`) of a judged reward (rewards.judge, rewards.rubric): a verdict; nothing to judge
# (an empty answer, 0.0 without a judge call); no verdict from the judge (0.0 or, under on_failure="exclude",
# a NaN the composite reward leaves out and reports); a programmatic gate failed (0.0, the rubric not asked).
SCORED, POLICY_INVALID, JUDGE_FAILED, GATED = "scored", "policy_invalid", "judge_failed", "gated"
STATUSES = (SCORED, POLICY_INVALID, JUDGE_FAILED, GATED)


class Score(float):
    """A float that also says why it has its value. Behaves as a plain float everywhere.

    `reason` is a short machine-readable tag (e.g. "equivalent", "no_answer", "hedged", "timeout");
    `answer` is the extracted answer when there was one.
    """

    __slots__ = ("reason", "answer")
    reason: str
    answer: str | None

    def __new__(cls, value: float, reason: str = "", answer: str | None = None) -> Score:
        obj = super().__new__(cls, value)
        obj.reason = reason
        obj.answer = answer
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        # Scores cross process boundaries (worker pools, DataLoader workers).
        return (Score, (float(self), self.reason, self.answer))

    def __repr__(self) -> str:
        return f"Score({float(self)!r}, reason={self.reason!r}, answer={self.answer!r})"


@runtime_checkable
class Verifier(Protocol):
    def __call__(self, completion: str, **example: Any) -> float: ...


def is_correct(score: float) -> bool:
    """The binary verdict every consumer uses (accuracy, pass@k, pair making): full marks only, so a
    partial-credit verifier never counts as correct."""
    return float(score) >= 1.0 - 1e-9


def verifier_name(verifier: Any) -> str:
    name = getattr(verifier, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(verifier, "__name__", type(verifier).__name__)


def as_text(completion: Any) -> str:
    """A completion as plain text. TRL passes conversational completions as a list of messages
    (`[{"role": "assistant", "content": ...}]`); their contents are joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(m, Mapping) for m in completion):
        return "".join(str(m.get("content", "")) for m in completion)
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def rows_from_columns(n: int, columns: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Split column lists into `n` per-row dicts. Values that are not length-`n` sequences (e.g. TRL's
    `trainer_state`) are not columns and are left out. `prompts` becomes the per-row key `prompt`."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in columns.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n:
            continue
        row_key = "prompt" if key == "prompts" else key
        for row, value in zip(rows, values):
            row[row_key] = value
    return rows


def columns_from_rows(rows: Sequence[Example]) -> dict[str, list[Any]]:
    """The inverse of `rows_from_columns`, in the TRL spelling (`prompt` -> `prompts`)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    return {("prompts" if k == "prompt" else k): [row.get(k) for row in rows] for k in keys}


def call_one(verifier: Callable[..., float], completion: str, example: Example, row: int) -> float:
    """Call a per-example verifier, naming the verifier and the row if it raises. A row's own ``completion``
    column (an SFT row's reference answer) is not passed: the completion scored is the one given."""
    try:
        return verifier(completion, **{k: v for k, v in example.items() if k != "completion"})
    except VerifierError:
        raise
    except Exception as exc:
        raise VerifierError(
            f"verifier {verifier_name(verifier)!r} raised on row {row}: {type(exc).__name__}: {exc}"
        ) from exc


def score_all(verifier: Callable[..., float], completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
    """Score a batch: the verifier's own `score_batch` when it has one (parallel), else one call per row."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    texts = [as_text(c) for c in completions]
    batch_method = getattr(verifier, "score_batch", None)
    if batch_method is not None:
        try:
            scores = list(batch_method(texts, examples))
        except VerifierError:
            raise
        except Exception as exc:
            raise VerifierError(
                f"verifier {verifier_name(verifier)!r} raised on a batch of {len(texts)}: {type(exc).__name__}: {exc}"
            ) from exc
        if len(scores) != len(texts):
            raise VerifierError(
                f"verifier {verifier_name(verifier)!r} returned {len(scores)} scores for {len(texts)} completions"
            )
        return scores
    return [call_one(verifier, c, ex, i) for i, (c, ex) in enumerate(zip(texts, examples))]


def batch(verifier: Callable[..., float]) -> Callable[..., list[float]]:
    """The TRL reward-function form of a verifier: `fn(completions, prompts=None, **columns) -> list[float]`.

    Dataset columns arrive as lists, one value per completion; other keyword arguments TRL passes
    (`trainer_state`, ...) are ignored. `__name__` is the verifier's name, which TRL uses as the metric key.
    """

    def reward_fn(completions: Sequence[Any], prompts: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
        columns = dict(kwargs)
        if prompts is not None:
            columns["prompts"] = prompts
        examples = rows_from_columns(len(completions), columns)
        return [float(s) for s in score_all(verifier, completions, examples)]

    reward_fn.__name__ = verifier_name(verifier)
    reward_fn.__qualname__ = reward_fn.__name__
    reward_fn.__doc__ = f"TRL batch form of verifier {verifier_name(verifier)!r}."
    return reward_fn
