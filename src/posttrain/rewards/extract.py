"""Final-answer extraction and normalization shared by the math, label and spurious verifiers.

Everything here is pure string processing: no sympy, no eval, no process pool. Extraction is strict on
purpose (see /work/shared/reference/verifiers.md §3.1): an answer only counts when the model states it in
the expected format, and two or more different final answers (a hedge) count as no answer at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

ExtractMode = Literal["auto", "boxed", "answer_tag"]

DEFAULT_MAX_CHARS = 10_000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Extraction:
    """The final-answer claims found in a completion.

    `candidates` are in order of appearance; `answer` is the last one, or None when nothing was found
    or the candidates disagree (`hedged`). `after` is the text that follows the last claim (None when
    there is no claim): what `math`'s `trailing="reject"` checks.
    """

    candidates: tuple[str, ...]
    hedged: bool
    after: str | None = None

    @property
    def answer(self) -> str | None:
        if self.hedged or not self.candidates:
            return None
        return self.candidates[-1]


def cap_text(text: str, max_chars: int) -> str:
    """Keep only the tail: the final answer is at the end, and parsing cost grows with length."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    return text if len(text) <= max_chars else text[-max_chars:]


def _scan_group(text: str, open_index: int) -> int:
    """Return the index just past the brace group that opens at `open_index`, or -1 if it never closes.

    `\\{` and `\\}` are literal set braces in LaTeX, not grouping, so an escaped brace is skipped.
    A regex cannot do this: `[^}]+` stops at the first inner brace (`\\boxed{\\frac{1}{2}}`).
    """
    depth = 0
    i = open_index
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def find_boxed(text: str) -> list[tuple[int, str]]:
    """All `\\boxed{...}` / `\\fbox{...}` contents with their start offsets; an unclosed box is ignored.

    A box nested inside another box is part of the outer content (the caller unwraps it when normalizing).
    """
    return [(start, content) for start, _, content in _boxed_spans(text)]


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every box, ``end`` just past it."""
    found: list[tuple[int, int, str]] = []
    i = 0
    while True:
        starts = [(text.find(cmd, i), cmd) for cmd in _BOX_COMMANDS]
        starts = [(s, cmd) for s, cmd in starts if s >= 0]
        if not starts:
            return found
        start, cmd = min(starts)
        j = start + len(cmd)
        # `\boxedfoo` is a different macro; only `\boxed{`, `\boxed {` or `\boxed 5` are boxes.
        if j < len(text) and (text[j].isalpha()):
            i = j
            continue
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _scan_group(text, j)
            if end < 0:
                return found  # unclosed: a truncated completion has no final answer
            found.append((start, end, text[j + 1 : end - 1]))
            i = end
        elif j > start + len(cmd) and j < len(text):
            # `\boxed 5`: TeX takes the next token.
            m = re.match(r"[^\s$]+", text[j:])
            if m is None:  # `\boxed ` then a newline or `$`: no argument, no answer
                i = j
                continue
            found.append((start, j + m.end(), m.group(0)))
            i = j + m.end()
        else:
            i = j


def _after_reasoning(text: str) -> str:
    """The reasoning block is not the answer: boxes tried inside <think> must not count as hedges."""
    cut = text.rfind(_THINK_CLOSE)
    return text if cut < 0 else text[cut + len(_THINK_CLOSE) :]


def _claim_spans(text: str, mode: ExtractMode, pattern) -> tuple[str, list[tuple[int, int, str]]]:
    """Every final-answer claim in `text` as (start, end, claim) spans, in order of appearance, with the
    text they index into.

    - `pattern` (a regex) overrides `mode`: each match is a claim (named group `answer`, else group 1, else
      the whole match).
    - "boxed": the contents of every `\\boxed{}`.
    - "answer_tag": the contents of every `<answer>...</answer>`.
    - "auto": both; an answer tag that contains a box contributes its box(es) instead of its full text, so
      `<answer>The answer is \\boxed{5}</answer>` is one claim, `5`.
    In "auto" and "answer_tag" modes only the text after the last `</think>` is searched.
    """
    if pattern is not None:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        out = []
        for m in regex.finditer(text):
            if "answer" in regex.groupindex:
                claim = m.group("answer")
            elif regex.groups:
                claim = m.group(1)
            else:
                claim = m.group(0)
            if claim is not None:
                out.append((m.start(), m.end(), claim))
        return text, out
    if mode == "boxed":
        return text, _boxed_spans(text)
    if mode not in ("auto", "answer_tag"):
        raise ValueError(f"unknown extraction mode {mode!r}; expected 'auto', 'boxed' or 'answer_tag'")
    body = _after_reasoning(text)
    tags = [(m.start(), m.end(), m.group(1)) for m in _ANSWER_TAG_RE.finditer(body)]
    if mode == "answer_tag":
        return body, tags
    claims = _boxed_spans(body)
    for span in tags:
        if not any(cmd in span[2] for cmd in _BOX_COMMANDS):
            claims.append(span)
    claims.sort(key=lambda span: span[0])
    return body, claims


def extract_answers(
    text: str,
    *,
    mode: ExtractMode = "auto",
    pattern: str | re.Pattern[str] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Extraction:
    """Find the final-answer claims in the (capped) completion and decide whether they hedge.

    Claims are compared after `normalize_answer`, and plain numbers by value, so `\\boxed{0.5}` then
    `\\boxed{\\frac12}` is one answer while `\\boxed{1} or \\boxed{2}` is a hedge.
    """
    body, spans = _claim_spans(cap_text(text, max_chars), mode, pattern)
    raw = [c.strip() for _, _, c in spans]
    claims = tuple(c for c in raw if normalize_answer(c))
    distinct: list[str] = []
    for claim in claims:
        if not any(same_answer(claim, seen) for seen in distinct):
            distinct.append(claim)
    after = body[max(end for _, end, _ in spans) :] if spans else None
    return Extraction(candidates=claims, hedged=len(distinct) > 1, after=after)


def extract_answer(
    text: str,
    *,
    mode: ExtractMode = "auto",
    pattern: str | re.Pattern[str] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> str | None:
    """The final answer of a completion (stripped, not normalized), or None when absent or hedged.

    Used by evaluation (maj@k votes over these) and by the math verifier.
    """
    return extract_answers(text, mode=mode, pattern=pattern, max_chars=max_chars).answer


# --- normalization -------------------------------------------------------------------------------------

_SPACING_RE = re.compile(r"\\(?:(?:left|right|displaystyle)(?![a-zA-Z])|[!,;: ])|~|\s+")
_FRAC_ALIAS_RE = re.compile(r"\\[dt]frac")
_WRAPPERS = ("\\boxed{", "\\fbox{", "\\text{", "\\textbf{", "\\mathrm{", "\\mathbf{")


def _unwrap(s: str) -> str:
    """Strip `$...$` and one whole-answer wrapper like `\\text{...}` or a nested `\\boxed{...}`, repeatedly."""
    while True:
        before = s
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        for w in _WRAPPERS:
            if s.startswith(w) and _scan_group(s, len(w) - 1) == len(s):
                s = s[len(w) : -1]
        if s == before:
            return s


def normalize_answer(answer: str) -> str:
    """A canonical spelling for comparing two answers as strings: spacing and sizing macros removed,
    `\\dfrac`/`\\tfrac` -> `\\frac`, wrappers unwrapped, a trailing full stop dropped. Case is kept
    (in math `A` and `a` differ)."""
    s = _SPACING_RE.sub("", answer)
    s = _FRAC_ALIAS_RE.sub(r"\\frac", s)
    s = _unwrap(s).rstrip(".")
    return _unwrap(s)


def gold_answer(row: dict) -> str | None:
    """The row's gold answer as a comparable string (the `answer` column, else `label`), or None."""
    for col in ("answer", "label"):
        v = row.get(col)
        if v is not None and not isinstance(v, (list, dict)):
            return normalize_answer(str(v))
    return None


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_LATEX_FRAC_RE = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_SHORT_FRAC_RE = re.compile(r"([+-]?)\\frac(\d)(\d)")
_SLASH_FRAC_RE = re.compile(r"([+-]?\d+)/([+-]?\d+)")
_MAX_NUMBER_CHARS = 200  # Fraction of a 10k-digit literal is fine, but nobody's short answer is that long


def parse_number(answer: str) -> Fraction | None:
    """The exact rational value of a plain number (`42`, `-0.50`, `3/4`, `\\frac{1}{2}`, `\\frac12`,
    `-\\frac{3}{4}`), or None for anything else (symbols, units, percentages, thousands separators, sets),
    which the caller must hand to math-verify instead. Never guesses: None means "not decided here"."""
    s = normalize_answer(answer)
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    if _NUMBER_RE.fullmatch(s):
        return Fraction(s)
    for regex in (_LATEX_FRAC_RE, _SHORT_FRAC_RE, _SLASH_FRAC_RE):
        m = regex.fullmatch(s)
        if m is None:
            continue
        sign, num, den = ("",) + m.groups() if regex is _SLASH_FRAC_RE else m.groups()
        if not (_NUMBER_RE.fullmatch(num) and _NUMBER_RE.fullmatch(den)):
            return None
        d = Fraction(den)
        if d == 0:
            return None
        value = Fraction(num) / d
        return -value if sign == "-" else value
    return None


def numbers_close(a: Fraction, b: Fraction, tolerance: float) -> bool:
    """Exact rational equality, or relative difference within `tolerance` (0 = exact only)."""
    if a == b:
        return True
    if tolerance <= 0:
        return False
    scale = max(abs(a), abs(b))
    return abs(a - b) <= Fraction(tolerance) * scale


def same_answer(a: str, b: str, tolerance: float = 0.0) -> bool:
    """Cheap equivalence (`fast_equivalence`): False means "not shown equal here", not "different"
    (symbolic forms need math-verify)."""
    return fast_equivalence(a, b, tolerance) is True


# --- the math fast path ------------------------------------------------------------------------------

_ASSIGNMENT_RE = re.compile(r"([a-zA-Z])=([^=<>]+)")
_SET_RE = re.compile(r"\\\{(.*)\\\}")
_STRICT_NUMBER_RE = re.compile(r"[+-]?(?:0|[1-9]\d*)(?:\.\d+)?")  # no "000": `\{1,000\}` is ambiguous


def _set_of_numbers(body: str) -> frozenset[Fraction] | None:
    values = []
    for part in body.split(","):
        if _NUMBER_RE.fullmatch(part) and not _STRICT_NUMBER_RE.fullmatch(part):
            return None  # "000", "01", ".5": maybe a thousands group, so not decided here
        value = parse_number(part)
        if value is None:
            return None
        values.append(value)
    return frozenset(values)


def plain_value(answer: str) -> tuple[str | None, Fraction | frozenset[Fraction]] | None:
    """(variable, value) for the answers the fast path decides without sympy: a plain number, a
    one-letter assignment of one (`x=5`), or a set of plain numbers (`\\{1, \\frac12\\}`); None otherwise."""
    s = normalize_answer(answer)
    variable = None
    m = _ASSIGNMENT_RE.fullmatch(s)
    if m is not None:
        variable, s = m.group(1), m.group(2)
    number = parse_number(s)
    if number is not None:
        return variable, number
    m = _SET_RE.fullmatch(s)
    if m is not None and variable is None:
        values = _set_of_numbers(m.group(1))
        if values is not None:
            return None, values
    return None


def fast_equivalence(gold: str, answer: str, tolerance: float) -> bool | None:
    """The math verdict when it needs no symbolic work, else None (ask math-verify).

    Decided here: identical after normalization; plain numbers (exact rationals, relative `tolerance`);
    `x=5` against `5` (math-verify compares an equation's right-hand side, so this agrees with it);
    sets of plain numbers, order and repeats ignored. Two different variable names, or a set against a
    number, are left to math-verify.
    """
    if normalize_answer(answer) == normalize_answer(gold):
        return True
    g, p = plain_value(gold), plain_value(answer)
    if g is None or p is None:
        return None
    (g_var, g_val), (p_var, p_val) = g, p
    if g_var is not None and p_var is not None and g_var != p_var:
        return None
    if isinstance(g_val, Fraction) and isinstance(p_val, Fraction):
        return numbers_close(g_val, p_val, tolerance)
    if isinstance(g_val, frozenset) and isinstance(p_val, frozenset):
        if g_val == p_val:
            return True
        if len(g_val) != len(p_val):
            return False
        # Numbers within tolerance pair up one-to-one (sorted, so the pairing is the nearest one).
        return all(numbers_close(a, b, tolerance) for a, b in zip(sorted(g_val), sorted(p_val)))
    return None
