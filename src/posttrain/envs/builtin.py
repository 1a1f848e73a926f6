"""The built-in tools: an exact ``calculator`` and a ``python`` interpreter in the code sandbox.

Both take model-written input, so both are built for hostile input:
- ``calculator`` never evaluates anything: it walks the ``ast`` of the expression, accepts only numeric
  literals, the arithmetic operators and parentheses, and computes with ``fractions.Fraction`` (exact: 0.1 + 0.2
  is 0.3). Sizes are bounded before they are computed (``2**10**10`` is refused, not attempted).
- ``python`` runs the code in the bubblewrap sandbox of ``posttrain.rewards.sandbox`` (no network, no host
  files, rlimits, an unprivileged uid), one fresh interpreter per call, with wall-clock, memory and output limits.
"""

from __future__ import annotations

import ast
import re
import signal
from fractions import Fraction

from posttrain.envs.tools import Tool, ToolError, ToolTimeout
from posttrain.rewards.sandbox import Backend, Sandbox, SandboxLimits, SandboxReport

# ---------------------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 2000
MAX_DIGITS = 1000  # of a numerator or denominator, for every intermediate result
MAX_EXPONENT = 10_000
_MAX_BITS = int(MAX_DIGITS * 3.33) + 1  # 10**1000 < 2**3330
# A decimal literal as written ("0.1", "1e-3", "2.5E+4", "1_000.5"): read from the source text, since the float
# Python would make of it is already rounded.
_DECIMAL_RE = re.compile(r"(?P<mantissa>[0-9_]*\.?[0-9_]*)(?:[eE](?P<exp>[+-]?[0-9_]+))?")
_BINOPS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}
_REFUSED_NODES = {
    ast.Name: "names are not allowed",
    ast.Call: "function calls are not allowed",
    ast.Attribute: "attributes are not allowed",
    ast.Subscript: "subscripts are not allowed",
    ast.Compare: "comparisons are not allowed",
    ast.BoolOp: "boolean operators are not allowed",
    ast.Lambda: "lambdas are not allowed",
}


# The schema the policy sees is kept short (a tiny model's prompt holds it; tasks.toolcalc's SFT rows carry the
# same record), and the return type is left out of the signature so that get_json_schema writes no "return" key.
# What it accepts: numeric literals, + - * / // % **, unary + -, parentheses; the result is an integer, an exact
# decimal (0.125) or, when the decimal expansion does not end, a fraction ("1/3").
def calculator(expression: str):
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. (12+3)*4.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"error: expression too long ({len(expression)} characters; at most {MAX_EXPRESSION_CHARS})")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"error: invalid expression: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):  # deeply nested parentheses; a NUL byte
        raise ToolError("error: invalid expression: too deeply nested or unreadable") from None
    try:
        value = _Evaluator(expression.strip()).eval(tree.body)
    except RecursionError:
        raise ToolError("error: expression too deeply nested") from None
    return format_number(value)


class _Evaluator:
    def __init__(self, source: str) -> None:
        self.source = source

    def _piece(self, node: ast.AST) -> str:
        text = ast.get_source_segment(self.source, node) or ast.unparse(node)
        return text if len(text) <= 60 else text[:57] + "..."

    def eval(self, node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant):
            return self._literal(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self.eval(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                hint = "; use ** for powers" if isinstance(node.op, ast.BitXor) else ""
                symbol = {ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>"}
                raise ToolError(
                    f"error: operator {symbol.get(type(node.op), type(node.op).__name__)!r} is not supported"
                    f" (in {self._piece(node)!r}){hint}"
                )
            return _bounded(self._binop(op, self.eval(node.left), self.eval(node.right), node))
        why = next((text for kind, text in _REFUSED_NODES.items() if isinstance(node, kind)), None)
        raise ToolError(f"error: {why or 'unsupported syntax'}: {self._piece(node)!r}; only numbers, + - * / // % ** "
                        "and parentheses are allowed")  # fmt: skip

    def _literal(self, node: ast.Constant) -> Fraction:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "strings" if isinstance(value, (str, bytes)) else f"{type(value).__name__} literals"
            raise ToolError(f"error: {kind} are not allowed: {self._piece(node)!r}")
        if isinstance(value, int):
            return _bounded(Fraction(value))
        text = (ast.get_source_segment(self.source, node) or "").replace("_", "")
        match = _DECIMAL_RE.fullmatch(text)
        if not match or not match.group("mantissa").strip("."):
            raise ToolError(f"error: unreadable number: {self._piece(node)!r}")
        exponent = int(match.group("exp") or 0)
        if abs(exponent) > MAX_DIGITS:  # checked before Fraction builds 10**exponent
            raise ToolError(f"error: number too large or too small: {self._piece(node)!r}")
        return _bounded(Fraction(text))

    def _binop(self, op: str, a: Fraction, b: Fraction, node: ast.BinOp) -> Fraction:
        if op in ("/", "//", "%") and b == 0:
            raise ToolError(f"error: division by zero in {self._piece(node)!r}")
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b
        if op == "//":
            return Fraction(a // b)
        if op == "%":
            return a % b
        return self._power(a, b, node)

    def _power(self, base: Fraction, exponent: Fraction, node: ast.BinOp) -> Fraction:
        if exponent.denominator != 1:
            raise ToolError(f"error: non-integer exponent in {self._piece(node)!r}: roots are not exact")
        e = exponent.numerator
        if base == 0 and e < 0:
            raise ToolError(f"error: division by zero in {self._piece(node)!r} (0 to a negative power)")
        if base.denominator == 1 and abs(base.numerator) <= 1:  # 0, 1, -1: any exponent is cheap
            if e == 0 or base == 1:
                return Fraction(1)
            return base if base == 0 or e % 2 else Fraction(1)
        # |n**e| has at least (bits(n) - 1) * e + 1 bits: refuse what must exceed the cap without computing it.
        bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
        if abs(e) > MAX_EXPONENT or (bits - 1) * abs(e) > _MAX_BITS:
            raise ToolError(f"error: result too large in {self._piece(node)!r} (at most {MAX_DIGITS} digits)")
        return base**e


def _bounded(value: Fraction) -> Fraction:
    if max(abs(value.numerator).bit_length(), value.denominator.bit_length()) > _MAX_BITS:
        raise ToolError(f"error: result too large (at most {MAX_DIGITS} digits)")
    if len(str(abs(value.numerator))) > MAX_DIGITS or len(str(value.denominator)) > MAX_DIGITS:
        raise ToolError(f"error: result too large (at most {MAX_DIGITS} digits)")
    return value


def format_number(value: Fraction) -> str:
    """An integer ("42"), an exact decimal when the expansion ends ("0.125", "-2.5"), else a fraction ("1/3")."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


# ---------------------------------------------------------------------------- python


class PythonTool:
    """The ``python`` tool: runs model-written code in one shared ``Sandbox`` (thread-safe, so every episode of a
    run may share one instance) and returns what a REPL user would see: stdout, then the traceback (stderr's
    tail) when the program fails, or a line saying why it was stopped (timeout, output limit, a signal).

    Each call is a fresh interpreter: nothing (variables, files, imports) carries over between calls.
    ``timeout``: wall-clock seconds per call; ``memory_mb``: address-space limit per process;
    ``max_output_bytes``: stdout kept per call (the program is stopped past it); ``sandbox``: "bwrap", or "none"
    to run unisolated (an explicit, logged opt-in; never on untrusted output). Raises ``SandboxUnavailable`` at
    construction when bubblewrap is missing or broken, never per call.
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 64 * 1024,
        max_procs: int = 16,
        file_size_mb: int = 16,
        tmpfs_mb: int = 64,
        sandbox: Backend = "bwrap",
        bwrap_path: str = "bwrap",
        python: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.timeout = float(timeout)
        limits = SandboxLimits(
            memory_mb=memory_mb,
            file_size_mb=file_size_mb,
            tmpfs_mb=tmpfs_mb,
            max_procs=max_procs,
            max_output_bytes=max_output_bytes,
            max_total_output_bytes=max_output_bytes,
        )
        self.sandbox = Sandbox(sandbox, bwrap_path=bwrap_path, python=python, limits=limits)

    def python(self, code: str) -> str:
        """Run a Python program in a fresh, isolated interpreter and return its printed output (stdout), or the
        traceback if it fails.

        Nothing carries over between calls (define and import what you need each time); there is no network
        access. Use print() to see values.

        Args:
            code: The Python program to run.
        """
        report = self.sandbox.run({"mode": "stdio", "program": code, "cases": [""], "fail_fast": True}, self.timeout)
        return self.observation(report)

    def observation(self, report: SandboxReport) -> str:
        """The text the policy reads for one run; raises ToolError / ToolTimeout for a failed run."""
        timed_out = f"error: timed out after {self.timeout:g}s"
        if report.results is None:
            if report.error == "timeout":
                raise ToolTimeout(timed_out)
            if report.error == "output_limit":
                raise ToolError(
                    f"error: output exceeded {self.sandbox.limits.max_output_bytes} bytes; the program was stopped"
                )
            raise ToolError("error: the program brought down its interpreter (no result came back)")
        result = report.results[0]
        stdout = _text(result.get("stdout", b""))
        stderr = _text(result.get("stderr", ""))
        status = result.get("status")
        if status == "timeout":
            raise ToolTimeout(_join(stdout, timed_out))
        if status == "output_limit":
            limit = self.sandbox.limits.max_output_bytes
            raise ToolError(_join(stdout, f"error: output exceeded {limit} bytes; the program was stopped"))
        if status != "ok":
            raise ToolError(_join(stdout, f"error: the program did not run ({status})"))
        code = result.get("exit")
        if code == 0:
            return stdout
        if isinstance(code, int) and code < 0:
            raise ToolError(
                _join(stdout, _clean_traceback(stderr), f"error: the program was killed by {_signal_name(-code)}")
            )
        raise ToolError(_join(stdout, _clean_traceback(stderr) or f"error: exit status {code}"))

    def tool(self) -> Tool:
        """This tool as a ``Tool`` record (named "python", one argument ``code``), its description stating the
        time limit."""
        base = Tool.from_function(self.python)
        description = f"{base.schema['function']['description']} Each call may run for at most {self.timeout:g}s."
        return Tool.from_function(self.python, description=description)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _join(*parts: str) -> str:
    return "\n".join(p.rstrip("\n") for p in parts if p)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_DRIVER_FRAMES = ('  File "<posttrain-harness>"', '  File "<string>"')


def _clean_traceback(stderr: str) -> str:
    """The traceback as a REPL user sees it: without the frames of the sandbox's own driver (the harness)."""
    out: list[str] = []
    skip = False
    for line in stderr.splitlines():
        if line.startswith(_DRIVER_FRAMES):
            skip = True
            continue
        if skip and line.startswith("    "):  # the driver frame's source line
            continue
        skip = False
        out.append(line)
    return "\n".join(out)


__all__ = ["MAX_DIGITS", "MAX_EXPONENT", "PythonTool", "calculator", "format_number"]
