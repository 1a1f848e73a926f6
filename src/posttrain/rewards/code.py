"""Code verifier: run the completion's program against the example's tests in the sandbox (sandbox.py).

Test formats (column `tests` by default; a list, a dict, or the same as a JSON string):
- stdin/stdout cases `{"input": "...", "output": "..."}` (or APPS-style `{"inputs": [...], "outputs": [...]}`):
  each case is a fresh run of the program with that stdin. Outputs match when every line matches after
  stripping trailing whitespace per line and dropping trailing blank lines; the exit status must be 0.
- function-call cases `{"fn_name": "f", "inputs": [[args...], ...], "outputs": [...]}`: `f(*args)` per case
  (`Solution().f` when the program only defines a LeetCode-style `class Solution`).
- assert strings (`"assert f(2) == 4"`, or a block of them): parsed here with `ast`. Only the expression
  side (`f(2)`) is evaluated in the sandbox; the expected side must be a literal, read with
  `ast.literal_eval` in this process. Also `assert f(x) is None/True/False`, `assert f(x)` / `assert not
  f(x)` (exactly True / False), `assert math.isclose(f(x), 1.5[, rel_tol=, abs_tol=])` and
  `assert abs(f(x) - 1.5) < 1e-6`.

Comparison happens here, never in the sandbox, on plain values rebuilt from tagged JSON:
- types are strict: True != 1, 1 != 1.0, "1" != 1; objects of other types (or of subclasses, such as an int
  whose `__eq__` always returns True) cannot be serialized, so such a case fails;
- floats compare with `math.isclose(rel_tol=float_rel_tol, abs_tol=float_abs_tol)`; NaN matches NaN;
- for function-call tests the expected values come from JSON, which has no tuples, so a returned tuple may
  match an expected list. Assert literals keep Python's types: `(1, 2)` does not match `[1, 2]`.
A case that reports nothing (early exit, crash, timeout) has failed. The reward is 1.0 when every case passes,
else 0.0; `partial=True` gives the pass fraction instead (partial credit is easier to game: §3.1 of the notes).

Execution plan: one sandbox launch per completion. Call-mode cases share one child process (the module runs
once, like a judge's function harness); if a case hangs or kills the process, that case fails and the rest run
in a fresh child. Stdio cases get one forked child each inside the same launch (fork from the already-started
supervisor, no new interpreter), so RLIMIT_NPROC never sees more than init + supervisor + one program.
When `partial` is off, the run stops at the first case that crashed or timed out (the reward is 0 anyway).

The answer (what maj@k votes over and the diversity metrics count) is the program's output signature on the
row's tests, `output_signature`: two programs written differently that output the same agree.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from posttrain.rewards.base import Score, as_text
from posttrain.rewards.sandbox import Backend, Sandbox, SandboxLimits, SandboxReport

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n`]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}
_DETAIL_CHARS = 200
_SIGNATURE_CHARS = 240  # a longer output signature keeps its head and a hash of the whole
_REMEMBERED_RUNS = 4096  # recent complete runs kept for the answer extractor


def extract_program(completion: str) -> str:
    """The last ```python fenced block, else the last fenced block of any language, else the whole text."""
    blocks = _FENCE_RE.findall(completion)
    for tag, body in reversed(blocks):
        if tag.lower() in _PYTHON_TAGS:
            return body
    if blocks:
        return blocks[-1][1]
    return completion


# ---------------------------------------------------------------------------- test parsing


@dataclass(frozen=True)
class _Expected:
    """What one case must produce; stays in this process."""

    value: Any
    json_source: bool = False  # expected came from JSON: a returned tuple may match a list
    rel_tol: float | None = None  # set by math.isclose / abs(...) < tol asserts
    abs_tol: float | None = None


@dataclass(frozen=True)
class TestPlan:
    """Tests split into what goes into the sandbox (`cases`) and what never does (`expected`)."""

    mode: str  # "stdio" | "call"
    cases: tuple[Any, ...]
    expected: tuple[Any, ...]  # str per stdio case, _Expected per call case


def parse_tests(tests: Any) -> TestPlan:
    """Normalize any supported test spec into a TestPlan; a malformed spec raises ValueError (a dataset bug,
    not a property of the completion)."""
    if isinstance(tests, (str, bytes)):
        text = tests.decode() if isinstance(tests, bytes) else tests
        try:
            tests = json.loads(text)
        except ValueError:
            tests = [text]  # Python source holding assert statements
    items = [tests] if isinstance(tests, Mapping) else tests
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ValueError(f"tests must be a list, a dict or a JSON string, got {type(tests).__name__}")
    stdio: list[tuple[str, str]] = []
    calls: list[tuple[dict[str, Any], _Expected]] = []
    for item in items:
        if isinstance(item, str):
            calls.extend(_parse_asserts(item))
        elif isinstance(item, Mapping) and "fn_name" in item:
            calls.extend(_parse_fn_cases(item))
        elif isinstance(item, Mapping) and "inputs" in item and "outputs" in item:
            if len(item["inputs"]) != len(item["outputs"]):
                raise ValueError("tests: 'inputs' and 'outputs' differ in length")
            stdio.extend((_text(i), _text(o)) for i, o in zip(item["inputs"], item["outputs"]))
        elif isinstance(item, Mapping) and "input" in item and "output" in item:
            stdio.append((_text(item["input"]), _text(item["output"])))
        else:
            raise ValueError(f"unrecognized test case: {str(item)[:200]!r}")
    if stdio and calls:
        raise ValueError("tests mix stdin/stdout cases with function-call/assert cases")
    if not stdio and not calls:
        raise ValueError("tests hold no test case")
    if stdio:
        return TestPlan("stdio", tuple(i for i, _ in stdio), tuple(o for _, o in stdio))
    return TestPlan("call", tuple(c for c, _ in calls), tuple(e for _, e in calls))


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return "\n".join(value)  # some datasets store a case's input/output as a list of lines
    raise ValueError(f"stdin/stdout test values must be strings, got {type(value).__name__}")


def _parse_fn_cases(item: Mapping[str, Any]) -> list[tuple[dict[str, Any], _Expected]]:
    fn, inputs, outputs = item["fn_name"], item.get("inputs"), item.get("outputs")
    if not isinstance(fn, str) or not fn.isidentifier():
        raise ValueError(f"fn_name must be an identifier, got {fn!r}")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise ValueError("function tests need 'inputs' and 'outputs' lists of equal length")
    cases = []
    for args, out in zip(inputs, outputs):
        if not isinstance(args, list):
            raise ValueError(f"each function-test input must be a list of arguments, got {args!r}")
        cases.append(({"kind": "call", "fn": fn, "args": args}, _Expected(out, json_source=True)))
    return cases


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _expr_case(node: ast.expr) -> dict[str, Any]:
    return {"kind": "expr", "expr": ast.unparse(node)}


def _parse_asserts(source: str) -> list[tuple[dict[str, Any], _Expected]]:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"assert test does not parse: {exc}") from exc
    cases = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Assert):
            raise ValueError(f"only assert statements are supported in assert tests, got: {ast.unparse(stmt)[:200]!r}")
        cases.append(_parse_assert(stmt.test))
    return cases


def _parse_assert(test: ast.expr) -> tuple[dict[str, Any], _Expected]:
    unsupported = ValueError(
        f"unsupported assert form {ast.unparse(test)[:200]!r}: use `EXPR == LITERAL`, `EXPR is None/True/False`, "
        "`f(...)`, `not f(...)`, `math.isclose(EXPR, LITERAL)` or `abs(EXPR - LITERAL) < TOL`"
    )
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if isinstance(op, ast.Eq):
            for expr, lit in ((left, right), (right, left)):
                ok, value = _literal(lit)
                if ok:
                    return _expr_case(expr), _Expected(value)
        if isinstance(op, ast.Is) and isinstance(right, ast.Constant) and right.value in (None, True, False):
            return _expr_case(left), _Expected(right.value)
        if isinstance(op, (ast.Lt, ast.LtE)):  # abs(EXPR - LITERAL) < TOL
            ok_tol, tol = _literal(right)
            inner = left.args[0] if _is_call_to(left, "abs") and len(left.args) == 1 else None
            if ok_tol and isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Sub):
                for expr, lit in ((inner.left, inner.right), (inner.right, inner.left)):
                    ok, value = _literal(lit)
                    if ok and isinstance(value, (int, float)) and isinstance(tol, (int, float)):
                        return _expr_case(expr), _Expected(float(value), rel_tol=0.0, abs_tol=float(tol))
        raise unsupported
    if _is_call_to(test, "isclose", module="math") and len(test.args) == 2:
        kw = {k.arg: _literal(k.value) for k in test.keywords}
        if set(kw) <= {"rel_tol", "abs_tol"} and all(ok for ok, _ in kw.values()):
            for expr, lit in ((test.args[0], test.args[1]), (test.args[1], test.args[0])):
                ok, value = _literal(lit)
                if ok and isinstance(value, (int, float)):
                    rel, abs_ = kw.get("rel_tol", (True, 1e-9))[1], kw.get("abs_tol", (True, 0.0))[1]
                    return _expr_case(expr), _Expected(float(value), rel_tol=float(rel), abs_tol=float(abs_))
        raise unsupported
    # A bare call's result must be exactly True (or False under `not`). Only a call to a plain name: with
    # `g(f(x), 4)` for an arbitrary g the comparison itself would run, and could be patched, in the sandbox.
    negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    target = test.operand if negated else test
    if isinstance(target, ast.Call) and isinstance(target.func, ast.Name):
        return _expr_case(target), _Expected(not negated)
    raise unsupported


def _is_call_to(node: ast.expr, name: str, module: str | None = None) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if module is None:
        return isinstance(func, ast.Name) and func.id == name
    return (
        isinstance(func, ast.Attribute)
        and func.attr == name
        and isinstance(func.value, ast.Name)
        and func.value.id == module
    )


# ---------------------------------------------------------------------------- comparing results


class BadResult(ValueError):
    """A tagged value from the sandbox that does not decode (only a forged or truncated stream does that)."""


def decode_value(tagged: Any, depth: int = 0) -> Any:
    """Rebuild a plain Python value from the harness's `[tag, payload]` encoding, validating every node."""
    if depth > 100 or not isinstance(tagged, list) or len(tagged) != 2 or not isinstance(tagged[0], str):
        raise BadResult("malformed tagged value")
    tag, payload = tagged
    try:
        if tag == "none" and payload is None:
            return None
        if tag == "bool" and type(payload) is bool:
            return payload
        if tag == "int" and isinstance(payload, str) and len(payload) <= 100_000:
            return int(payload, 16)
        if tag == "float" and isinstance(payload, str) and len(payload) <= 40:
            return float(payload)
        if tag == "complex" and isinstance(payload, list) and len(payload) == 2:
            return complex(float(payload[0][:40]), float(payload[1][:40]))
        if tag == "str" and isinstance(payload, str):
            return bytes.fromhex(payload).decode("utf-8", "surrogatepass")
        if tag == "bytes" and isinstance(payload, str):
            return bytes.fromhex(payload)
        if tag in ("list", "tuple", "set", "frozenset") and isinstance(payload, list):
            items = [decode_value(v, depth + 1) for v in payload]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and isinstance(payload, list):
            pairs = []
            for pair in payload:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise BadResult("malformed dict item")
                pairs.append((decode_value(pair[0], depth + 1), decode_value(pair[1], depth + 1)))
            return dict(pairs)
    except (TypeError, ValueError) as exc:  # bad hex or UTF-8, unhashable set member or dict key
        raise BadResult(f"bad {tag} payload: {exc}") from exc
    raise BadResult(f"unknown tag {tag!r}")


def _typed(value: Any) -> Any:
    """A hashable key that distinguishes 1, 1.0 and True (dict keys / set members compare with ==)."""
    if isinstance(value, tuple):
        return (tuple, tuple(_typed(v) for v in value))
    if isinstance(value, frozenset):
        return (frozenset, frozenset(_typed(v) for v in value))
    return (type(value), value)


def values_match(got: Any, want: Any, *, rel_tol: float, abs_tol: float, tuple_is_list: bool = False) -> bool:
    """Strict structural equality (see the module docstring). Pure; `got` is a decoded plain value."""
    if type(want) is float:
        if type(got) is not float:
            return False
        if math.isnan(want) or math.isnan(got):
            return math.isnan(want) and math.isnan(got)
        return got == want or math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol)
    tw, tg = type(want), type(got)
    if tw is not tg and not (tuple_is_list and {tw, tg} == {list, tuple}):
        return False
    kw = {"rel_tol": rel_tol, "abs_tol": abs_tol, "tuple_is_list": tuple_is_list}
    if tw in (list, tuple):
        return len(got) == len(want) and all(values_match(g, w, **kw) for g, w in zip(got, want))
    if tw is dict:
        if len(got) != len(want):
            return False
        by_key = {_typed(k): v for k, v in got.items()}
        if len(by_key) != len(got):
            return False
        return all(_typed(k) in by_key and values_match(by_key[_typed(k)], v, **kw) for k, v in want.items())
    if tw in (set, frozenset):
        return {_typed(v) for v in got} == {_typed(v) for v in want}
    return bool(got == want)  # int, str, bytes, bool, None, complex: exact types already checked


def normalize_output(text: str) -> list[str]:
    """Lines with trailing whitespace stripped, trailing blank lines dropped ("\\r\\n" counts as "\\n")."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


# ---------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class CaseResult:
    """One test case. `status` is the sandbox's ("ok", "timeout", "exited", "error", "module_error",
    "output_limit", "skipped", "protocol_error") or "bad_result"; `value` is the decoded return value
    (call mode) and `stdout` the captured output (stdio mode, at most max_output_bytes)."""

    passed: bool
    status: str
    value: Any = None
    stdout: str | None = None
    detail: str = ""


class CodeScore(Score):
    """A Score that also carries the per-case results (`cases`) and the sandbox's stderr tail."""

    __slots__ = ("cases", "sandbox_stderr")
    cases: tuple[CaseResult, ...]
    sandbox_stderr: str

    def __new__(
        cls,
        value: float,
        reason: str = "",
        answer: str | None = None,
        cases: tuple[CaseResult, ...] = (),
        sandbox_stderr: str = "",
    ) -> CodeScore:
        obj = super().__new__(cls, value, reason, answer)
        obj.cases = cases
        obj.sandbox_stderr = sandbox_stderr
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (CodeScore, (float(self), self.reason, self.answer, self.cases, self.sandbox_stderr))

    def __repr__(self) -> str:
        passed = sum(c.passed for c in self.cases)
        return f"CodeScore({float(self)!r}, reason={self.reason!r}, passed={passed}/{len(self.cases)})"


class CodeVerifier:
    """`verifier(completion, **example) -> CodeScore` in [0, 1]; see the module docstring.

    Options: `tests_column` (where the tests are), `partial` (pass fraction instead of all-or-nothing),
    `timeout` (seconds per case), `sandbox` ("bwrap", or "none" to run unisolated: explicit opt-in, logged),
    `bwrap_path`, `python` (interpreter used inside), `uid`/`gid` (the unprivileged ids the launcher drops to
    when run as root), `workers` (concurrent sandboxes in `batch`), resource limits (`memory_mb`, `file_size_mb`,
    `tmpfs_mb`, `max_procs`, `max_open_files`, `max_output_bytes`), `float_rel_tol` / `float_abs_tol`.
    Raises SandboxUnavailable at construction when bubblewrap is missing or broken. Its answer to a row (maj@k,
    the diversity metrics, the report) is the program's output signature: `extract_row_answers`, `gold_answer`.
    """

    name = "code"

    def __init__(
        self,
        *,
        tests_column: str = "tests",
        partial: bool = False,
        timeout: float = 2.0,
        sandbox: Backend = "bwrap",
        bwrap_path: str = "bwrap",
        python: str | None = None,
        uid: int = 65534,
        gid: int = 65534,
        workers: int | None = None,
        memory_mb: int = 1024,
        file_size_mb: int = 16,
        tmpfs_mb: int = 64,
        max_procs: int = 32,
        max_open_files: int = 64,
        max_output_bytes: int = 1 << 20,
        float_rel_tol: float = 1e-6,
        float_abs_tol: float = 1e-9,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.tests_column = tests_column
        self.partial = partial
        self.timeout = float(timeout)
        self.workers = workers if workers is not None else min(32, 4 * (os.cpu_count() or 1))
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.float_rel_tol = float_rel_tol
        self.float_abs_tol = float_abs_tol
        limits = SandboxLimits(
            memory_mb=memory_mb,
            file_size_mb=file_size_mb,
            tmpfs_mb=tmpfs_mb,
            max_procs=max_procs,
            max_open_files=max_open_files,
            max_output_bytes=max_output_bytes,
            max_total_output_bytes=max(8 * max_output_bytes, 8 << 20),
        )
        self.sandbox = Sandbox(sandbox, bwrap_path=bwrap_path, python=python, uid=uid, gid=gid, limits=limits)
        self._ran: dict[str, tuple[CaseResult, ...]] = {}  # recent complete runs by `_run_key` (insertion order)
        self._lock = threading.Lock()

    def __call__(self, completion: str, **example: Any) -> CodeScore:
        if self.tests_column not in example:
            raise ValueError(
                f"the example has no {self.tests_column!r} column (CodeVerifier(tests_column=...) names it)"
            )
        return self.score(completion, example[self.tests_column])

    def score(self, completion: Any, tests: Any) -> CodeScore:
        """Score one completion (text, or TRL's list of chat messages) against one test spec."""
        plan = parse_tests(tests)
        program = extract_program(as_text(completion))
        if not program.strip():
            return CodeScore(0.0, "no_code", program)
        return self._run(plan, program, fail_fast=not self.partial, remember=True)

    def _run(self, plan: TestPlan, program: str, *, fail_fast: bool, remember: bool = False) -> CodeScore:
        job = {"mode": plan.mode, "program": program, "cases": list(plan.cases), "fail_fast": fail_fast}
        report = self.sandbox.run(job, self.timeout)
        score = self._grade(plan, program, report)
        # The RL diagnostics read the answers of the completions just scored: a run that reported every case
        # is remembered (a digest, not the text), so that reading them does not run each program twice.
        if remember and report.results is not None and all(c.status != "skipped" for c in score.cases):
            with self._lock:
                self._ran[_run_key(plan, program)] = score.cases
                while len(self._ran) > _REMEMBERED_RUNS:
                    self._ran.pop(next(iter(self._ran)))
        return score

    def batch(self, completions: Sequence[str], tests: Sequence[Any]) -> list[CodeScore]:
        """Score `completions[i]` against `tests[i]`, running up to `workers` sandboxes at once."""
        if len(completions) != len(tests):
            raise ValueError(f"{len(completions)} completions but {len(tests)} test specs")
        if len(completions) <= 1:
            return [self.score(c, t) for c, t in zip(completions, tests)]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(completions))) as pool:
            return list(pool.map(self.score, completions, tests))

    def score_batch(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> list[CodeScore]:
        """The batch protocol of `posttrain.rewards.base.score_all`."""
        for ex in examples:
            if self.tests_column not in ex:
                raise ValueError(f"an example has no {self.tests_column!r} column")
        return self.batch(completions, [ex[self.tests_column] for ex in examples])

    # ------------------------------------------------------------------------ the answer

    def extract_row_answers(
        self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
    ) -> list[str | None]:
        """Each completion's program's output signature on its row's tests (`output_signature`): what maj@k
        votes over, the diversity metrics count and the report shows as "got". Each program runs once, every
        case (no fail-fast), up to `workers` at once; one this verifier has just scored is not run again."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} rows")
        for ex in examples:
            if self.tests_column not in ex:
                raise ValueError(f"an example has no {self.tests_column!r} column")
        if len(completions) <= 1:
            return [self._answer(c, ex) for c, ex in zip(completions, examples)]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(completions))) as pool:
            return list(pool.map(self._answer, completions, examples))

    def _answer(self, completion: str, example: Mapping[str, Any]) -> str | None:
        plan = parse_tests(example[self.tests_column])
        program = extract_program(as_text(completion))
        if not program.strip():
            return None
        with self._lock:
            cases = self._ran.get(_run_key(plan, program))
        if cases is None:
            cases = self._run(plan, program, fail_fast=False).cases
        return output_signature(plan.mode, cases)

    def gold_answer(self, example: Mapping[str, Any]) -> str | None:
        """The signature of a program that outputs what the row's tests expect; None without readable tests."""
        try:
            return expected_signature(parse_tests(example[self.tests_column]))
        except (KeyError, ValueError):
            return None

    # ------------------------------------------------------------------------ grading

    def _grade(self, plan: TestPlan, program: str, report: SandboxReport) -> CodeScore:
        if report.results is None:
            cases = tuple(CaseResult(False, report.error or "no_report") for _ in plan.cases)
            return CodeScore(0.0, report.error or "no_report", program, cases, report.stderr[-2000:])
        grade = self._grade_stdio if plan.mode == "stdio" else self._grade_call
        cases = tuple(grade(r, e) for r, e in zip(report.results, plan.expected))
        passed = sum(c.passed for c in cases)
        if passed == len(cases):
            value, reason = 1.0, "passed"
        else:
            first = next(c for c in cases if not c.passed)
            value = passed / len(cases) if self.partial else 0.0
            reason = "wrong_answer" if first.status == "ok" else first.status
        return CodeScore(value, reason, program, cases, report.stderr[-2000:])

    def _grade_stdio(self, result: Mapping[str, Any], expected: str) -> CaseResult:
        status = str(result.get("status"))
        raw = result.get("stdout", b"")
        stdout = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
        stderr = str(result.get("stderr", ""))[-_DETAIL_CHARS:]
        if status != "ok":
            return CaseResult(False, status, stdout=stdout, detail=stderr)
        if result.get("exit") != 0:
            return CaseResult(False, "exited", stdout=stdout, detail=f"exit {result.get('exit')}: {stderr}")
        passed = normalize_output(stdout) == normalize_output(expected)
        return CaseResult(passed, "ok", stdout=stdout, detail="" if passed else "output differs")

    def _grade_call(self, result: Mapping[str, Any], expected: _Expected) -> CaseResult:
        status = str(result.get("status"))
        if status != "ok":
            detail = str(result.get("error") or result.get("stderr") or result.get("exit", ""))
            return CaseResult(False, status, detail=detail[-_DETAIL_CHARS:])
        try:
            raw = result.get("value")
            if not isinstance(raw, bytes):
                raise BadResult("no value")
            value = decode_value(json.loads(raw))
        except (BadResult, ValueError, RecursionError) as exc:
            return CaseResult(False, "bad_result", detail=str(exc)[:_DETAIL_CHARS])
        passed = values_match(
            value,
            expected.value,
            rel_tol=self.float_rel_tol if expected.rel_tol is None else expected.rel_tol,
            abs_tol=self.float_abs_tol if expected.abs_tol is None else expected.abs_tol,
            tuple_is_list=expected.json_source,
        )
        return CaseResult(passed, "ok", value=value, detail="" if passed else f"got {repr(value)[:_DETAIL_CHARS]}")


# ---------------------------------------------------------------------------- the answer: an output signature


def _plain(value: Any) -> Any:
    """A JSON spelling of a decoded value in which values the comparison accepts as equal mostly spell alike:
    tuples as lists (expected values from JSON have no tuples), floats to 12 significant digits, sets and dict
    items sorted; types stay apart (1, 1.0, True and "1" differ, as they do in `values_match`)."""
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.12g}")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((_plain(v) for v in value), key=json.dumps)}
    if isinstance(value, dict):
        return {"dict": sorted(([_plain(k), _plain(v)] for k, v in value.items()), key=json.dumps)}
    if isinstance(value, (complex, bytes)):
        return {type(value).__name__: repr(value)}
    return value  # None, bool, int, str


def _signature(outputs: list[Any]) -> str:
    text = json.dumps(outputs, ensure_ascii=False, separators=(",", ":"))
    if len(text) <= _SIGNATURE_CHARS:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{text[: _SIGNATURE_CHARS - 30]}... sha256:{digest}"


def output_signature(mode: str, cases: Sequence[CaseResult]) -> str | None:
    """A program's answer to a row: canonical JSON of what it output on each case (stdio: the output lines as
    they are compared; call: the returned value, `_plain`), a failed case as {"failed": status}; long ones
    end in a hash of the whole. None when no case ran to the end: a program that never ran is no answer,
    as a completion without a boxed answer is none."""
    if not any(c.status == "ok" for c in cases):
        return None
    outputs = [
        {"failed": c.status}
        if c.status != "ok"
        else "\n".join(normalize_output(c.stdout or ""))
        if mode == "stdio"
        else _plain(c.value)
        for c in cases
    ]
    return _signature(outputs)


def _run_key(plan: TestPlan, program: str) -> str:
    return hashlib.sha256(json.dumps([program, plan.mode, plan.cases], default=repr).encode()).hexdigest()


def expected_signature(plan: TestPlan) -> str:
    """The signature of a program that outputs exactly what the tests expect (the row's gold answer)."""
    if plan.mode == "stdio":
        return _signature(["\n".join(normalize_output(e)) for e in plan.expected])
    return _signature([_plain(e.value) for e in plan.expected])


# ---------------------------------------------------------------------------- benchmark


def bench_code(
    n: int = 400, *, workers: int | None = None, timeout: float = 1.0, timeout_every: int = 50
) -> dict[str, Any]:
    """Sandboxed runs per second on a mix of small programs (function, assert and stdin/stdout tests, right and
    wrong), one infinite loop every `timeout_every` runs to exercise the kill path. Each run is one bwrap launch.
    Returns the figures and `mismatches`: runs whose score differs from the known right answer (should be 0)."""
    add_fn = {"fn_name": "add", "inputs": [[1, 2], [5, 7], [-3, 3]], "outputs": [3, 12, 0]}
    add_asserts = ["assert add(1, 2) == 3", "assert add(5, 7) == 12"]
    sum_io = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    io_right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    io_wrong = "```python\nprint(0)\n```"
    loop = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    kinds = [
        (right, add_fn, 1.0),
        (wrong, add_fn, 0.0),
        (right, add_asserts, 1.0),
        (io_right, sum_io, 1.0),
        (io_wrong, sum_io, 0.0),
    ]
    completions, tests, want = [], [], []
    for i in range(n):
        c, t, w = (
            (loop, add_fn, 0.0) if timeout_every and i % timeout_every == timeout_every - 1 else kinds[i % len(kinds)]
        )
        completions.append(c)
        tests.append(t)
        want.append(w)
    verifier = CodeVerifier(timeout=timeout, workers=workers)
    verifier.batch(completions[:4], tests[:4])  # warm the page cache
    start = time.perf_counter()
    scores = verifier.batch(completions, tests)
    seconds = time.perf_counter() - start
    return {
        "runs": n,
        "seconds": round(seconds, 3),
        "runs_per_s": round(n / seconds, 1),
        "workers": verifier.workers,
        "timeout_runs": sum(1 for c in completions if c is loop),
        "timeout_s": timeout,
        "mismatches": sum(float(s) != w for s, w in zip(scores, want)),
        "cpu_count": os.cpu_count(),
    }
