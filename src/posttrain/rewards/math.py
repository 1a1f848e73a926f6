"""`math`: final-answer equivalence with math-verify, run where its timeout can really kill.

Pipeline for one completion (each step's reason ends up in `Score.reason`):
  1. cap the completion to its last `max_chars` characters (the answer is at the end; parsing is O(length));
  2. extract the final answer: the last `\\boxed{}` / `<answer>` tag / `pattern` match (extract.py);
     no answer -> 0 "no_answer"; different final answers -> 0 "hedged";
  3. fast path, in the calling process (extract.fast_equivalence): identical after normalization, plain
     numbers as exact rationals with relative `tolerance`, `x=5` vs `5`, sets of plain numbers ->
     1 "exact" or 0 "mismatch" (it agrees with math-verify; the benchmark re-checks that);
  4. otherwise math-verify in a worker process (pool.py): `verify(gold, pred)` (gold first: the check is
     deliberately asymmetric), then the numeric tolerance on the parsed values; a check that outlives
     `timeout` is killed -> 0 "timeout"; a worker that dies -> 0 "crashed".

The model's text is never evaluated: extraction is string scanning, math-verify parses LaTeX with an
ANTLR grammar and only hands digits and operators to sympy's expression parser.
"""

from __future__ import annotations

import functools
import logging
import math as _math
import re
from collections.abc import Sequence
from typing import Any

from .base import Example, Score, VerifierError
from .extract import (
    DEFAULT_MAX_CHARS,
    ExtractMode,
    extract_answer,
    extract_answers,
    fast_equivalence,
    find_boxed,
    normalize_answer,
)
from .pool import WorkerPool, default_workers

# --- the part that runs inside worker processes -------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _configs() -> tuple[list[Any], list[Any]]:
    from latex2sympy2_extended import NormalizationConfig  # noqa: PLC0415 - math-verify loads in the worker processes only
    from math_verify import ExprExtractionConfig, LatexExtractionConfig  # noqa: PLC0415 - math-verify loads in the worker processes only

    # The prediction config follows math-verify's README advice for rewards (boxed first, no `nits`
    # guessing), except `malformed_operators=True`: `\frac12` is valid LaTeX, not a malformed operator.
    norm = NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=False, boxed="all", equations=False
    )
    pred = [LatexExtractionConfig(boxed_match_priority=0, normalization_config=norm)]
    gold = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return gold, pred


def init_math_worker() -> None:
    """Worker initializer: import math-verify and warm its grammar so first checks are not slow."""
    # Timeouts and parse failures are reported through the score's reason; the library's own warnings
    # would only flood the trainer's stderr from every worker.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    check_equivalence("\\frac{1}{2}", "0.5", 0.0, 5)


def _numeric_close(gold: Any, pred: Any, tolerance: float) -> bool:
    import sympy  # noqa: PLC0415 - sympy loads in the worker processes only

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return False
    if gold.free_symbols or pred.free_symbols or not (gold.is_number and pred.is_number):
        return False
    try:
        g, p = complex(sympy.N(gold, 30)), complex(sympy.N(pred, 30))
    except (TypeError, ValueError):
        # `is_number` is also true for values with no complex form (zoo, nan, unevaluated limits):
        # those are not "close" to anything, so no tolerance applies.
        return False
    if not all(_math.isfinite(v) for v in (g.real, g.imag, p.real, p.imag)):
        return False
    return abs(g - p) <= tolerance * max(abs(g), abs(p))


def check_equivalence(gold: str, pred: str, tolerance: float, inner_timeout: int) -> tuple[bool, str]:
    """math-verify's verdict on one pair of extracted answers. Runs in a worker's main thread, so
    math-verify's SIGALRM timeout (`inner_timeout` whole seconds) works as a first, graceful line."""
    from math_verify import parse, verify  # noqa: PLC0415 - math-verify loads in the worker processes only

    gold_cfg, pred_cfg = _configs()
    gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=gold_cfg, parsing_timeout=inner_timeout)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=inner_timeout)
    if not gold_parsed:
        return False, "gold_unparseable"
    pred_parsed = parse(f"\\boxed{{{pred}}}", extraction_config=pred_cfg, parsing_timeout=inner_timeout)
    if not pred_parsed:
        return False, "answer_unparseable"
    if verify(gold_parsed, pred_parsed, timeout_seconds=inner_timeout):
        return True, "equivalent"
    if tolerance > 0 and _numeric_close(gold_parsed[0], pred_parsed[0], tolerance):
        return True, "within_tolerance"
    return False, "not_equivalent"


# --- the verifier ------------------------------------------------------------------------------------


def gold_answer_text(gold: Any) -> str:
    """The gold column as an answer string: a boxed gold (a full reference solution) gives its last box."""
    text = str(gold).strip()
    boxes = find_boxed(text)
    if boxes:
        text = boxes[-1][1].strip()
    return text.strip("$").strip()


# What may follow a final answer when `trailing="reject"`: closing math delimiters and punctuation.
_ALLOWED_TAIL_RE = re.compile(r"(?:\s|\$|\.|\\\]|\\\)|</answer>)*")


class MathVerifier:
    """Score 1 when the completion's final answer is mathematically equivalent to the gold answer.

    Options: `answer_column` (gold column, default "answer"), `extract` ("auto" | "boxed" | "answer_tag"),
    `pattern` (a regex whose named group `answer`/group 1 is the answer; overrides `extract`),
    `max_chars` (completion cap, keeps the tail), `tolerance` (relative, for numbers; 0 = exact; math-verify
    itself also rounds floats to 6 decimals), `timeout` (seconds per check, enforced by killing the worker),
    `workers` (pool size; 0 = auto), `fast_path` (decide plain numbers and identical strings without
    math-verify), `memory_limit_mb` (address-space cap per worker), `trailing` ("allow", or "reject":
    score 0, reason "trailing_text", when anything but whitespace, `$`, `.`, `\\]`, `\\)` or `</answer>`
    follows the final answer -- for policies that learn to keep writing after it).

    The pool starts on the first check that needs math-verify; call `close()` (or use `with`) to stop it
    early, otherwise its daemon workers end with the process. Workers are spawned (start_method="spawn"),
    so a script that scores at top level needs the usual `if __name__ == "__main__":` guard.
    """

    name = "math"

    def __init__(
        self,
        *,
        answer_column: str = "answer",
        extract: ExtractMode = "auto",
        pattern: str | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
        tolerance: float = 1e-6,
        timeout: float = 5.0,
        workers: int = 0,
        fast_path: bool = True,
        start_method: str = "spawn",
        memory_limit_mb: int | None = 4096,
        trailing: str = "allow",
    ) -> None:
        if trailing not in ("allow", "reject"):
            raise ValueError(f"trailing must be 'allow' or 'reject', got {trailing!r}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.answer_column = answer_column
        self.extract = extract
        self.pattern = pattern
        self.max_chars = int(max_chars)
        self.tolerance = float(tolerance)
        self.timeout = float(timeout)
        self.workers = int(workers) if workers else default_workers()
        self.fast_path = fast_path
        self.start_method = start_method
        self.memory_limit_mb = memory_limit_mb
        self.trailing = trailing
        # math-verify's alarm fires first when there is room for it (no worker restart needed); the
        # pool's kill is the backstop for work SIGALRM cannot interrupt.
        self._inner_timeout = max(1, int(self.timeout * 0.8))
        self._pool: WorkerPool | None = None
        # Validate the extraction options now rather than on the first completion.
        extract_answers("", mode=extract, pattern=pattern, max_chars=self.max_chars)

    # -- pool --------------------------------------------------------------------------------------

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(
                self.workers,
                timeout=self.timeout,
                initializer=init_math_worker,
                start_method=self.start_method,
                memory_limit_mb=self.memory_limit_mb,
            )
        return self._pool

    @property
    def restarts(self) -> int:
        """Workers killed (timeout) or found dead and replaced so far."""
        return 0 if self._pool is None else self._pool.restarts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None  # processes do not travel; a copy starts its own pool when needed
        return state

    # -- scoring -----------------------------------------------------------------------------------

    @classmethod
    def row_problems(cls, rows, *, answer_column: str = "answer", **_: Any):
        """The data contract: every row has a gold answer."""
        for i, row in enumerate(rows):
            if row.get(answer_column) is None:
                yield i, f"no gold answer in column {answer_column!r} (the row has {sorted(row)})"

    def extract_answer(self, completion: str) -> str | None:
        """The completion's final answer as maj@k and the diversity metrics compare it (None: none, or hedged)."""
        found = extract_answer(completion, mode=self.extract, pattern=self.pattern, max_chars=self.max_chars)
        return None if found is None else normalize_answer(found) or None

    def gold_answer(self, example: Example) -> str | None:
        value = example.get(self.answer_column)
        return None if value is None else normalize_answer(gold_answer_text(value)) or None

    def gold(self, example: Example) -> str:
        if self.answer_column not in example:
            raise KeyError(f"math verifier needs the gold column {self.answer_column!r}; the row has {sorted(example)}")
        value = example[self.answer_column]
        if value is None:
            raise ValueError(f"gold column {self.answer_column!r} is None")
        return gold_answer_text(value)

    def prejudge(self, completion: str, example: Example) -> Score | tuple[str, str]:
        """Everything decidable without math-verify: a final Score, or the (gold, answer) pair to check."""
        gold = self.gold(example)
        found = extract_answers(completion, mode=self.extract, pattern=self.pattern, max_chars=self.max_chars)
        if found.hedged:
            return Score(0.0, "hedged", None)
        answer = found.answer
        if answer is None:
            return Score(0.0, "no_answer", None)
        if self.trailing == "reject" and found.after and not _ALLOWED_TAIL_RE.fullmatch(found.after):
            return Score(0.0, "trailing_text", answer)
        if self.fast_path:
            verdict = fast_equivalence(gold, answer, self.tolerance)
            if verdict is not None:
                return Score(1.0 if verdict else 0.0, "exact" if verdict else "mismatch", answer)
        return gold, answer.strip("$").strip()

    def check_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Score]:
        """Run math-verify on (gold, answer) pairs in the pool; order preserved."""
        if not pairs:
            return []
        args = [(g, a, self.tolerance, self._inner_timeout) for g, a in pairs]
        outcomes = self.pool.run(check_equivalence, args)
        scores = []
        for (_, answer), outcome in zip(pairs, outcomes):
            if outcome.status == "ok":
                ok, reason = outcome.value
                scores.append(Score(1.0 if ok else 0.0, reason, answer))
            else:
                scores.append(Score(0.0, outcome.status, answer))
        return scores

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Score]:
        judged: list[Score | tuple[str, str]] = []
        for row, (completion, example) in enumerate(zip(completions, examples)):
            try:
                judged.append(self.prejudge(completion, example))
            except (KeyError, ValueError, TypeError) as exc:
                raise VerifierError(f"verifier {self.name!r} failed on row {row}: {exc}") from exc
        pending = [i for i, j in enumerate(judged) if not isinstance(j, Score)]
        checked = self.check_pairs([judged[i] for i in pending])  # type: ignore[misc]
        for i, score in zip(pending, checked):
            judged[i] = score
        return judged  # type: ignore[return-value]

    def __call__(self, completion: str, **example: Any) -> Score:
        return self.score_batch([completion], [example])[0]
