"""`json` (structured extraction against a schema and a gold object) and `label` (classification)."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema

from .base import Example, Score
from .extract import DEFAULT_MAX_CHARS, ExtractMode, cap_text, extract_answers

_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)
_THINK_CLOSE = "</think>"


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # `{"city": "wrong", "city": "right"}` would otherwise hedge: json.loads silently keeps the last value.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def _decode(text: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity. Raises ValueError (JSONDecodeError is one)."""
    return _DECODER.decode(text.strip())


def _top_level_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every top-level balanced `{...}`; braces inside JSON strings do not count.

    Quotes only open a string inside an object: prose around the JSON is full of apostrophes. An object
    that never closes (a truncated completion) yields no span.
    """
    spans = []
    depth, start, in_string, escaped = 0, -1, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"' and depth > 0:
            in_string = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def find_json_objects(text: str) -> list[Any]:
    """The JSON values a completion offers as its answer.

    Fenced blocks (```json ... ``` or bare ```) win when present: every block is a claim, and a block that
    does not parse is the claim `_INVALID`. Otherwise every top-level balanced `{...}` that parses is a
    claim; one that does not parse (prose like "the set {1, 2}", or an object with a duplicate key) is
    skipped *without* looking inside it, so a valid object nested in a broken one is never taken as the
    answer. Only text after the last `</think>` is searched.
    """
    cut = text.rfind(_THINK_CLOSE)
    body = text if cut < 0 else text[cut + len(_THINK_CLOSE) :]
    fences = _FENCE_RE.findall(body)
    claims: list[Any] = []
    if fences:
        for block in fences:
            try:
                claims.append(_decode(block))
            except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                claims.append(_INVALID)
        return claims
    for start, end in _top_level_spans(body):
        try:
            claims.append(_decode(body[start:end]))
        except (ValueError, RecursionError):
            continue
    return claims


_INVALID = object()


def _normalize_text(value: str) -> str:
    return " ".join(value.casefold().split())


def values_match(gold: Any, pred: Any, *, tolerance: float, normalize_strings: bool) -> bool:
    """Recursive equality with JSON semantics: bools are not numbers, ints and floats compare by value
    (relative `tolerance`), strings optionally case/whitespace-folded, lists in order, objects by keys."""
    if isinstance(gold, bool) or isinstance(pred, bool):
        return isinstance(gold, bool) and isinstance(pred, bool) and gold == pred
    if isinstance(gold, (int, float)) and isinstance(pred, (int, float)):
        if gold == pred:
            return True
        return tolerance > 0 and math.isclose(gold, pred, rel_tol=tolerance, abs_tol=0.0)
    if isinstance(gold, str) and isinstance(pred, str):
        return _normalize_text(gold) == _normalize_text(pred) if normalize_strings else gold == pred
    if isinstance(gold, list) and isinstance(pred, list):
        return len(gold) == len(pred) and all(
            values_match(g, p, tolerance=tolerance, normalize_strings=normalize_strings) for g, p in zip(gold, pred)
        )
    if isinstance(gold, dict) and isinstance(pred, dict):
        return gold.keys() == pred.keys() and all(
            values_match(gold[k], pred[k], tolerance=tolerance, normalize_strings=normalize_strings) for k in gold
        )
    return gold is None and pred is None


def _load_schema(schema: Mapping[str, Any] | str | Path | None) -> dict[str, Any] | None:
    if schema is None:
        return None
    if isinstance(schema, Mapping):
        return dict(schema)
    path = Path(schema)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"options.schema: cannot read a JSON schema from {path}: {exc}") from exc


def schema_validator(schema: Mapping[str, Any] | str | Path | None):
    """A validator for ``schema`` (None without one); an invalid schema is a ValueError of one line naming
    what is wrong and where (jsonschema's own error dumps the whole metaschema)."""
    loaded = _load_schema(schema)
    if loaded is None:
        return None
    cls = jsonschema.validators.validator_for(loaded)
    try:
        cls.check_schema(loaded)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top level)"
        raise ValueError(f"options.schema: not a valid JSON Schema at {where}: {exc.message}") from None
    return cls(loaded)


class JsonVerifier:
    """Score a JSON answer: 0 unless exactly one JSON object is offered, it parses strictly and it validates
    against `schema`; then the weighted fraction of gold fields it matches (1.0 when there is no gold).

    Options: `schema` (dict or path to a JSON Schema file), `answer_column` (gold object, a dict or a JSON
    string; default "answer"), `fields` (which top-level gold fields to score; default all of them),
    `field_weights` (dict field -> weight, default 1 each), `normalize_strings` (case/whitespace-fold
    strings, default True), `tolerance` (relative, for numbers), `max_chars` (completion cap, keeps the tail),
    `schema_only` (score schema validity alone and read no gold: an explicit choice, never a fallback; a
    row without its gold column is an error otherwise -- it used to score any schema-valid JSON 1.0).
    """

    name = "json"

    def __init__(
        self,
        *,
        schema: Mapping[str, Any] | str | Path | None = None,
        answer_column: str = "answer",
        fields: Sequence[str] | None = None,
        field_weights: Mapping[str, float] | None = None,
        normalize_strings: bool = True,
        tolerance: float = 1e-6,
        max_chars: int = 20_000,
        schema_only: bool = False,
    ) -> None:
        self._validator = schema_validator(schema)  # a broken schema is a config error, raised now
        self.schema = None if self._validator is None else self._validator.schema
        if schema_only and self._validator is None:
            raise ValueError("options.schema_only: true needs options.schema")
        self.schema_only = schema_only
        self.answer_column = answer_column
        self.fields = tuple(fields) if fields is not None else None
        self.field_weights = dict(field_weights or {})
        if any(w < 0 for w in self.field_weights.values()):
            raise ValueError("field weights must be >= 0")
        self.normalize_strings = normalize_strings
        self.tolerance = float(tolerance)
        self.max_chars = int(max_chars)

    @classmethod
    def row_problems(
        cls,
        rows: Sequence[Mapping[str, Any]],
        *,
        schema=None,
        answer_column: str = "answer",
        fields=None,
        schema_only: bool = False,
        **_: Any,
    ) -> Iterator[tuple[int, str]]:
        """The data contract, checked before a run starts: (row index, problem) for every row the verifier
        could not score honestly. Raises ValueError for an invalid schema."""
        validator = schema_validator(schema)
        if schema_only:
            if validator is None:
                raise ValueError("options.schema_only: true needs options.schema")
            return
        for i, row in enumerate(rows):
            value = row.get(answer_column)
            if value is None:
                hint = "; options.schema_only: true scores schema validity alone" if validator else ""
                yield i, f"no gold value in column {answer_column!r} (the row has {sorted(row)}){hint}"
                continue
            try:
                gold = json.loads(value) if isinstance(value, str) else value
            except ValueError as exc:
                yield i, f"gold column {answer_column!r} is not valid JSON: {exc}"
                continue
            if not isinstance(gold, dict):
                yield i, f"gold column {answer_column!r} holds a {type(gold).__name__}, not a JSON object"
            elif validator is not None and (errors := list(validator.iter_errors(gold))):
                yield i, f"the gold object fails the schema: {errors[0].message}"
            elif fields is not None and (absent := [f for f in fields if f not in gold]):
                yield i, f"the gold object has no field(s) {absent} of options.fields"

    def _canonical(self, obj: Mapping[str, Any], fields: Sequence[str] | None) -> str:
        """One spelling for objects the verifier scores alike: the scored fields only, keys sorted, strings
        folded as ``normalize_strings`` folds them."""

        def fold(v: Any) -> Any:
            if isinstance(v, str):
                return _normalize_text(v) if self.normalize_strings else v
            if isinstance(v, list):
                return [fold(x) for x in v]
            if isinstance(v, dict):
                return {k: fold(x) for k, x in v.items()}
            return v

        keys = fields if fields is not None else sorted(obj)
        return json.dumps({k: fold(obj.get(k)) for k in keys}, sort_keys=True, ensure_ascii=False)

    def breakdown(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Per-field accuracy over a set of completions (the report's extraction table): for each scored field,
        the share of rows whose offered object (schema-valid, not hedged) matches the gold value."""
        hits: dict[str, int] = {}
        for text, example in zip(completions, examples):
            gold = self.gold_or_none(example)
            if gold is None:
                continue
            fields = self.fields if self.fields is not None else tuple(gold)
            for f in fields:
                hits.setdefault(f, 0)
            pred, _ = self._offered(text)
            if pred is None or (self._validator is not None and not self._validator.is_valid(pred)):
                continue
            for f in fields:
                hits[f] += (
                    f in pred
                    and f in gold
                    and values_match(
                        gold[f], pred[f], tolerance=self.tolerance, normalize_strings=self.normalize_strings
                    )
                )
        n = len(completions)
        return {"kind": "fields", "n": n, "accuracy": {f: h / n for f, h in hits.items()} if n else {}}

    def gold_or_none(self, example: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return self.gold(example)
        except (KeyError, TypeError, ValueError):
            return None

    def extract_answer(self, completion: str) -> str | None:
        """The completion's one JSON object, canonical (its scored fields): what maj@k votes over and the
        diversity metrics count. None: no object, an invalid or hedged one."""
        pred, _ = self._offered(completion)
        return None if pred is None else self._canonical(pred, self.fields)

    def gold_answer(self, example: Example) -> str | None:
        gold = self.gold_or_none(example)
        return None if gold is None else self._canonical(gold, self.fields)

    def gold(self, example: Example) -> dict[str, Any] | None:
        if self.schema_only:
            return None
        if self.answer_column not in example or example[self.answer_column] is None:
            raise KeyError(
                f"json verifier: the row has no gold value in column {self.answer_column!r} (it has {sorted(example)}); "
                f"options.schema_only: true scores schema validity alone"
            )
        gold = example[self.answer_column]
        if isinstance(gold, str):
            gold = json.loads(gold)
        if not isinstance(gold, dict):
            raise TypeError(f"gold column {self.answer_column!r} must hold a JSON object, got {type(gold).__name__}")
        return gold

    def _offered(self, completion: str) -> tuple[dict[str, Any] | None, str]:
        """The one JSON object the completion offers, or None and why not: no_json, invalid_json, hedged (two
        different objects), not_an_object. The schema is not checked here."""
        claims = find_json_objects(cap_text(completion, self.max_chars))
        if not claims:
            return None, "no_json"
        if any(c is _INVALID for c in claims):
            return None, "invalid_json"
        if any(c != claims[0] for c in claims[1:]):
            return None, "hedged"
        if not isinstance(claims[-1], dict):
            return None, "not_an_object"
        return claims[-1], "offered"

    def __call__(self, completion: str, **example: Any) -> Score:
        gold = self.gold(example)
        pred, why = self._offered(completion)
        if pred is None:
            return Score(0.0, why)
        if self._validator is not None and not self._validator.is_valid(pred):
            return Score(0.0, "schema_violation")
        if gold is None:  # schema_only
            return Score(1.0, "valid")
        fields = self.fields if self.fields is not None else tuple(gold)
        weights = {f: float(self.field_weights.get(f, 1.0)) for f in fields}
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("json verifier: the scored fields have zero total weight")
        got = sum(
            w
            for f, w in weights.items()
            if f in pred
            and f in gold
            and values_match(gold[f], pred[f], tolerance=self.tolerance, normalize_strings=self.normalize_strings)
        )
        return Score(got / total, "fields")


# --- label -------------------------------------------------------------------------------------------


def normalize_label(text: str) -> str:
    """Case-folded, punctuation (Unicode category P*) and symbols (S*) removed, whitespace collapsed."""
    kept = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in unicodedata.normalize("NFKC", text))
    return " ".join(kept.casefold().split())


class LabelVerifier:
    """Classification: 1 when the extracted answer equals the gold label after `normalize_label`.

    Options: `answer_column` (default: "label" if the row has it, else "answer"; an integer gold indexes
    `labels`), `labels` (the allowed label set; an answer outside it scores 0), `extract` / `pattern` (as
    for math), `allow_bare` (when no answer tag or box is present, the whole completion is the answer;
    default True, since classifiers often answer with the label alone), `max_chars`.
    """

    name = "label"

    def __init__(
        self,
        *,
        answer_column: str | None = None,
        labels: Sequence[str] | None = None,
        extract: ExtractMode = "auto",
        pattern: str | None = None,
        allow_bare: bool = True,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        self.answer_column = answer_column
        self.labels = tuple(labels) if labels is not None else None
        self._allowed = None if labels is None else {normalize_label(label) for label in labels}
        self.extract = extract
        self.pattern = pattern
        self.allow_bare = allow_bare
        self.max_chars = int(max_chars)
        extract_answers("", mode=extract, pattern=pattern, max_chars=self.max_chars)

    @classmethod
    def row_problems(
        cls, rows: Sequence[Mapping[str, Any]], *, answer_column: str | None = None, labels=None, **_: Any
    ) -> Iterator[tuple[int, str]]:
        """The data contract: every row has its gold label, inside ``labels`` when they are given."""
        allowed = None if labels is None else {normalize_label(label) for label in labels}
        for i, row in enumerate(rows):
            column = answer_column or ("label" if "label" in row else "answer")
            gold = row.get(column)
            if gold is None:
                yield i, f"no gold label in column {column!r} (the row has {sorted(row)})"
            elif isinstance(gold, int) and not isinstance(gold, bool):
                if labels is None or not 0 <= gold < len(labels):
                    yield i, f"gold label {gold} is an index, but options.labels has {len(labels or ())} labels"
            elif allowed is not None and normalize_label(str(gold)) not in allowed:
                yield i, f"gold label {gold!r} is not one of options.labels {list(labels)}: it could never be matched"

    def _given(self, completion: str) -> tuple[str | None, str]:
        """The answer the completion gives (tagged or boxed; else, with ``allow_bare``, the whole completion),
        or None and why not: hedged or no_answer."""
        found = extract_answers(completion, mode=self.extract, pattern=self.pattern, max_chars=self.max_chars)
        if found.hedged:
            return None, "hedged"
        if found.answer is not None:
            return found.answer, "given"
        if self.allow_bare and self.pattern is None:
            return cap_text(completion, self.max_chars), "bare"
        return None, "no_answer"

    def extract_answer(self, completion: str) -> str | None:
        """The label the completion gives, normalized as the verifier compares it (a bare label counts when
        ``allow_bare``); None when it gives none or hedges."""
        answer, _ = self._given(completion)
        return None if answer is None else normalize_label(answer) or None

    def gold_answer(self, example: Example) -> str | None:
        try:
            return normalize_label(self.gold(example)) or None
        except (KeyError, ValueError, IndexError):
            return None

    def breakdown(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The confusion matrix over a set of completions (the report's classification table): counts[gold]
        [answer], answers outside the label set and no answer under their own names."""
        counts: dict[str, dict[str, int]] = {}
        for text, example in zip(completions, examples):
            gold = self.gold_answer(example)
            if gold is None:
                continue
            answer = self.extract_answer(text)
            answer = (
                "(no answer)"
                if answer is None
                else answer
                if self._allowed is None or answer in self._allowed
                else "(not a label)"
            )
            row = counts.setdefault(gold, {})
            row[answer] = row.get(answer, 0) + 1
        labels = [normalize_label(x) for x in self.labels] if self.labels is not None else sorted(counts)
        return {"kind": "confusion", "labels": labels, "counts": counts}

    def gold(self, example: Example) -> str:
        column = self.answer_column
        if column is None:
            column = "label" if "label" in example else "answer"
        if column not in example or example[column] is None:
            raise KeyError(f"label verifier needs the gold column {column!r}; the row has {sorted(example)}")
        gold = example[column]
        if isinstance(gold, int) and not isinstance(gold, bool):
            if self.labels is None:
                raise ValueError(f"gold label {gold} is an index; pass `labels` to name the classes")
            return self.labels[gold]
        return str(gold)

    def __call__(self, completion: str, **example: Any) -> Score:
        gold = normalize_label(self.gold(example))
        answer, why = self._given(completion)
        if answer is None:
            return Score(0.0, why)
        normalized = normalize_label(answer)
        if not normalized:
            return Score(0.0, "no_answer", answer)
        if self._allowed is not None and normalized not in self._allowed:
            return Score(0.0, "not_a_label", answer)
        return Score(1.0 if normalized == gold else 0.0, "match" if normalized == gold else "mismatch", answer)
