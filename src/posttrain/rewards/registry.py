"""`load(name, **options)`: built-in verifiers by name, or a user function by "pkg.module:function".

Built-ins are registered as "module:attribute" strings and imported on first use, so importing
`posttrain.rewards` imports neither math-verify nor the code sandbox.

A "module:function" whose module is not importable from `sys.path` is looked for in the current
directory and in the directories registered with `add_search_dir` (the CLI registers the config file's
directory), so `my_rewards.py` next to the config or in the working directory is found as a user
expects. Every loading failure is a `VerifierLoadError` naming the verifier.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .base import NOT_APPLICABLE, Example, Score, VerifierError, as_text, columns_from_rows, verifier_name
from .extract import gold_answer

BUILTINS: dict[str, str] = {
    "math": "posttrain.rewards.math:MathVerifier",
    "code": "posttrain.rewards.code:CodeVerifier",
    "json": "posttrain.rewards.structured:JsonVerifier",
    "label": "posttrain.rewards.structured:LabelVerifier",
    "format": "posttrain.rewards.format:FormatVerifier",
    "regex": "posttrain.rewards.format:RegexVerifier",
    "overlong": "posttrain.rewards.format:OverlongPenalty",
    "random": "posttrain.rewards.spurious:RandomReward",
    "incorrect": "posttrain.rewards.spurious:IncorrectReward",
    "format_only": "posttrain.rewards.spurious:FormatOnlyReward",
    "reward_model": "posttrain.rewards.reward_model:RewardModelReward",
    "judge": "posttrain.rewards.judge:JudgeReward",
    "rubric": "posttrain.rewards.rubric:RubricReward",
    "env_reward": "posttrain.rewards.episode:EnvReward",
}


class VerifierLoadError(ValueError):
    """A verifier could not be loaded: unknown name, module not importable, no such attribute, bad options."""


class VerifierImportError(VerifierLoadError, ImportError):
    pass


class VerifierAttributeError(VerifierLoadError, AttributeError):
    pass


class VerifierOptionError(VerifierLoadError, TypeError):
    pass


_SEARCH_DIRS: list[Path] = []


def add_search_dir(path: str | Path) -> None:
    """Also look for "module:function" modules in ``path`` (after sys.path and the current directory)."""
    p = Path(path).resolve()
    if p not in _SEARCH_DIRS:
        _SEARCH_DIRS.append(p)


def _raised_while_importing(module_name: str, spec: str, exc: Exception) -> VerifierImportError:
    """The user's module itself failed: a syntax error names its file and line, anything else what it raised."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else f"module {module_name!r}"
        code = f"\n    {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        return VerifierImportError(f"{where}: syntax error in the module of verifier {spec!r}: {exc.msg}{code}")
    return VerifierImportError(
        f"importing module {module_name!r} for verifier {spec!r} raised {type(exc).__name__}: {exc}"
    )


def _import_module(module_name: str, spec: str) -> Any:
    top = module_name.split(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != top:
            raise VerifierImportError(f"cannot import module {module_name!r} for verifier {spec!r}: {exc}") from exc
        looked = [Path.cwd().resolve(), *_SEARCH_DIRS]
        for d in looked:
            if (d / f"{top}.py").is_file() or (d / top / "__init__.py").is_file():
                # Appended, not prepended: nothing already importable is shadowed. Spawned verifier
                # workers inherit sys.path, so they find the module too.
                if str(d) not in sys.path:
                    sys.path.append(str(d))
                importlib.invalidate_caches()
                try:
                    return importlib.import_module(module_name)
                except ImportError as again:
                    raise VerifierImportError(
                        f"cannot import module {module_name!r} for verifier {spec!r}: {again}"
                    ) from again
                except Exception as again:  # noqa: BLE001 - the user's module raised while importing
                    raise _raised_while_importing(module_name, spec, again) from again
        where = ", ".join(str(d) for d in looked)
        raise VerifierImportError(
            f"cannot import module {module_name!r} for verifier {spec!r}: no {top}.py on sys.path or in {where}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise _raised_while_importing(module_name, spec, exc) from exc


def import_object(spec: str) -> Any:
    """Import "pkg.module:attr" (attr may be dotted, e.g. "module:Class.method")."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise VerifierLoadError(f"expected 'pkg.module:name', got {spec!r}")
    obj: Any = _import_module(module_name, spec)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise VerifierAttributeError(
                f"module {module_name!r} has no attribute {attr!r} (verifier {spec!r})"
            ) from exc
    return obj


def _first_parameter(fn: Callable[..., Any]) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature
        return None
    return params[0].name if params else None


class UserFunction:
    """A user reward function as a verifier, in either form:

    - "batch", TRL's `fn(completions: list[str], **kwargs) -> list[float | None]` (kwargs: `prompts` and
      the dataset's other columns, as lists). Called once per batch, unchanged.
    - "single", `fn(completion: str, **example) -> float`.

    `form="auto"` picks "batch" when the first parameter is named `completions`. A `None` score (TRL's
    "not applicable to this row") becomes a NaN `Score` with reason "not_applicable", which `RewardFunction`
    leaves out of the weighted sum (a NaN or inf the function returns itself is a fault, not "n/a").
    Exceptions from the function propagate as `VerifierError` naming the function (and the row, for
    single-form functions): they are bugs, not scores.
    """

    def __init__(
        self, fn: Callable[..., Any], *, form: Literal["auto", "batch", "single"] = "auto", name: str | None = None
    ) -> None:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        if form == "auto":
            form = "batch" if _first_parameter(fn) == "completions" else "single"
        if form not in ("batch", "single"):
            raise ValueError(f"form must be 'auto', 'batch' or 'single', got {form!r}")
        self.fn = fn
        self.form = form
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        # How maj@k reads this reward's answer: the function's own `extract_answer(text) -> str | None` (or its
        # row-aware `extract_row_answers`, which `answer_reader` finds on the function).
        self.extract_answer = getattr(fn, "extract_answer", None)

    @staticmethod
    def _to_score(value: Any, where: str) -> float:
        if value is None:
            return Score(math.nan, NOT_APPLICABLE)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # bool is an int subclass, but a True reward is almost always a bug in the function.
            raise VerifierError(f"{where} returned {value!r}; expected a float or None")
        return value if isinstance(value, Score) else float(value)

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        if self.form == "single":
            out = []
            for row, (completion, example) in enumerate(zip(completions, examples)):
                try:
                    value = self.fn(completion, **example)
                except Exception as exc:
                    raise VerifierError(
                        f"reward function {self.name!r} raised on row {row}: {type(exc).__name__}: {exc}"
                    ) from exc
                out.append(self._to_score(value, f"reward function {self.name!r} on row {row}"))
            return out
        columns = columns_from_rows(examples)
        columns.setdefault("prompts", [None] * len(completions))
        try:
            values = self.fn(list(completions), **columns)
        except Exception as exc:
            raise VerifierError(
                f"reward function {self.name!r} raised on a batch of {len(completions)}: {type(exc).__name__}: {exc}"
            ) from exc
        if values is None or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values"
            raise VerifierError(f"reward function {self.name!r} returned {got} for {len(completions)} completions")
        return [self._to_score(v, f"reward function {self.name!r} on row {i}") for i, v in enumerate(values)]

    def __call__(self, completion: str, **example: Any) -> float:
        return self.score_batch([as_text(completion)], [example])[0]


def check(name: str, **options: Any) -> None:
    """Raise what `load` would for an unknown name, an unimportable module, a missing attribute or an unknown
    option name, without constructing the verifier (which may be costly, e.g. one that loads a model)."""
    if name in BUILTINS:
        _check_options(name, import_object(BUILTINS[name]), options)
        return
    if ":" not in name:
        load(name)  # raises the unknown-name error with its suggestion
    obj = import_object(name)
    if inspect.isclass(obj):
        _check_options(name, obj, options)
    elif callable(obj):
        unknown = set(options) - {"form", "name"}
        if unknown:
            raise VerifierOptionError(
                f"reward function {name!r} takes no options {sorted(unknown)} (only 'form', 'name')"
            )
    else:
        raise VerifierOptionError(f"{name!r} is a {type(obj).__name__}, not a verifier class or function")


def load(name: str, **options: Any) -> Callable[..., float]:
    """A verifier by built-in name (see `BUILTINS`) or "pkg.module:function".

    For an imported object: a class is instantiated with `options`; a function becomes a `UserFunction`
    (options: `form`, `name`); anything else is an error.
    """
    if name in BUILTINS:
        return _construct(name, import_object(BUILTINS[name]), options)
    if ":" not in name:
        close = difflib.get_close_matches(name, list(BUILTINS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise VerifierLoadError(
            f"unknown verifier {name!r}; {hint}built-ins are {sorted(BUILTINS)}, or pass 'pkg.module:function'"
        )
    obj = import_object(name)
    if inspect.isclass(obj):
        return _construct(name, obj, options)
    if callable(obj):
        unknown = set(options) - {"form", "name"}
        if unknown:
            raise VerifierOptionError(
                f"reward function {name!r} takes no options {sorted(unknown)} (only 'form', 'name')"
            )
        return UserFunction(obj, **options)
    raise VerifierOptionError(f"{name!r} is a {type(obj).__name__}, not a verifier class or function")


def _check_options(name: str, cls: type, options: dict[str, Any]) -> None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    # a class that forwards its **options to a component lists their names (e.g. a judge's engine options)
    forwarded = list(getattr(cls, "forwarded_options", ()))
    takes_any = not forwarded and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)] + forwarded
    unknown = sorted(set(options) - set(known)) if not takes_any else []
    if unknown:
        raise VerifierOptionError(f"verifier {name!r}: unknown option(s) {unknown}; its options are {known}")


def _construct(name: str, cls: type, options: dict[str, Any]) -> Any:
    """``cls(**options)``, with a failure said in terms of the verifier's options."""
    _check_options(name, cls, options)
    try:
        return cls(**options)
    except TypeError as exc:
        raise VerifierOptionError(f"verifier {name!r} with options {options}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a rejected option value, or a bug in a user's class
        raise VerifierLoadError(f"verifier {name!r} with options {options}: {type(exc).__name__}: {exc}") from exc


def accepts_option(name: str, option: str) -> bool:
    """Whether the built-in (or imported class) `name` names the keyword `option` explicitly in its
    constructor (or among its ``forwarded_options``). A catch-all `**options` does not count: `format` forwards those to the regex verifier,
    which would reject e.g. `workers`."""
    spec = BUILTINS.get(name, name if ":" in name else None)
    if spec is None:
        return False
    obj = import_object(spec)
    if not inspect.isclass(obj):
        return False
    if option in getattr(obj, "forwarded_options", ()):
        return True
    param = inspect.signature(obj).parameters.get(option)
    return param is not None and param.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


__all__ = [
    "BUILTINS",
    "AnswerReader",
    "UserFunction",
    "VerifierLoadError",
    "accepts_option",
    "add_search_dir",
    "answer_reader",
    "check",
    "import_object",
    "load",
    "per_text",
    "verifier_name",
]


def data_problems(
    name: str, options: dict[str, Any], rows: Sequence[Mapping[str, Any]], where: Sequence[str], most: int = 5
) -> list[str]:
    """The verifier's data contract over ``rows`` (``where[i]`` names row i, e.g. ``train.jsonl:12``): the
    problems of the rows it could not score honestly (a missing gold column, a gold value it would reject),
    at most ``most`` of them and a count of the rest, and an invalid option value (e.g. a broken schema) as
    one line. A verifier without a contract (``row_problems``) has nothing to say."""
    obj = import_object(BUILTINS[name]) if name in BUILTINS else import_object(name) if ":" in name else None
    contract = getattr(obj, "row_problems", None) if inspect.isclass(obj) else None
    if contract is None:
        return []
    try:
        found = list(contract(rows, **options))
    except (ValueError, TypeError) as exc:
        return [str(exc)]
    out = [f"{where[i]}: {problem}" for i, problem in found[:most]]
    if len(found) > most:
        out.append(f"... and {len(found) - most} more of the {len(rows)} rows")
    return out


Answers = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], list[str | None]]


class AnswerReader(NamedTuple):
    """How maj@k, the diversity metrics and the report read answers for one verifier (``answer_reader``).

    answers(completions, rows)  each completion's final answer, canonical (equal answers spelled alike),
                                read against the row it answers; None: no answer. Batched, because some
                                answers need work per row (a program's answer is what it prints on the
                                row's tests). None when the verifier has no answer extractor.
    gold(row)                   the row's gold answer in the same spelling; None: the row has none.
    """

    answers: Answers | None
    gold: Callable[[Mapping[str, Any]], str | None]


def per_text(extract: Callable[[str], str | None]) -> Answers:
    """A text-only extractor (``extract_answer(text)``) as a batched, row-aware one that ignores the rows."""

    def answers(completions: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str | None]:
        return [extract(text) for text in completions]

    return answers


def answer_reader(verifier: Any) -> AnswerReader:
    """The verifier's ``AnswerReader``. A verifier (or a user function) defines one of two extractors:
    ``extract_row_answers(completions, rows) -> list[str | None]`` where the answer depends on the row (code:
    the program's output signature on the row's tests), else ``extract_answer(text) -> str | None`` (math,
    json, label: the answer is in the text); and ``gold_answer(row)``. Without an extractor ``answers`` is
    None (maj@k not defined); without ``gold_answer`` gold reads the row's ``answer`` / ``label`` column."""
    inner = getattr(verifier, "fn", verifier)  # a UserFunction wraps the user's function

    def own(attr: str) -> Any:
        return getattr(verifier, attr, None) or getattr(inner, attr, None)

    answers = own("extract_row_answers")
    if answers is None and (extract := own("extract_answer")) is not None:
        answers = per_text(extract)
    return AnswerReader(answers, own("gold_answer") or gold_answer)
