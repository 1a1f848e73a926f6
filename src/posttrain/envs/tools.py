"""Tools are plain typed Python functions; a ``Toolbox`` turns a set of them into JSON schemas for the chat
template and runs the calls a parser read from a policy turn.

    def get_weather(city: str, unit: str = "C") -> str:
        '''The current weather in a city.

        Args:
            city: The city's name.
            unit: "C" or "F".
        '''
    box = Toolbox([get_weather, calculator])      # or Toolbox.from_object(env): its public methods
    tokenizer.apply_chat_template(messages, tools=box.schemas)
    output, error = box.call(ToolCall("get_weather", {"city": "Oslo"}))

A schema comes from the signature and the Google-style docstring through ``transformers.utils.get_json_schema``,
the format ``apply_chat_template(tools=...)`` itself uses, so what the policy is shown and what is checked here
are the same record. Model-written calls are untrusted input: an unknown tool, a missing or unexpected
argument, an argument of the wrong JSON type and an exception inside the tool all become an error string the
policy can read (``"error: ..."``), never an exception in the trainer. A tool reports a failure of its own
(a traceback, a refused expression) by raising ``ToolError(text)``: ``text`` is then the observation, verbatim.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers.utils import get_json_schema

from posttrain.envs.base import ToolCall

# Names an object-based toolbox never exposes as tools: the Environment protocol's own methods.
LIFECYCLE_METHODS = frozenset({"reset", "step", "close", "tools"})
DEFAULT_MAX_OUTPUT_CHARS = 8192


class ToolError(Exception):
    """Raised by a tool for a failure the policy should read: ``str(exc)`` is the observation, verbatim."""


class ToolTimeout(ToolError):
    """A tool ran out of its wall-clock budget (counted as ``timeouts`` in an episode's info)."""


@dataclass(frozen=True)
class Tool:
    """One tool: its name, the callable and the JSON schema the chat template shows the policy."""

    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, description: str | None = None) -> Tool:
        """The schema from ``fn``'s type hints and Google-style docstring (every argument needs a line under
        ``Args:``); ``description`` replaces the docstring's summary when given."""
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"tool {_fn_name(fn)!r} is async; tools are called synchronously, pass a plain function")
        try:
            schema = get_json_schema(fn)
        except Exception as exc:  # noqa: BLE001 - DocstringParsingException / TypeHintParsingException
            raise ValueError(
                f"cannot build a tool schema for {_fn_name(fn)!r}: {exc}. A tool needs a type hint on every "
                "argument and a Google-style docstring with a line per argument under 'Args:'"
            ) from exc
        if description is not None:
            schema["function"]["description"] = description
        return cls(schema["function"]["name"], fn, schema)


@dataclass(frozen=True)
class ToolResult:
    """What one call produced: ``output`` is the observation text (already capped), ``error`` whether the call
    failed (the policy still reads ``output``), ``timeout`` whether it failed by running out of time."""

    output: str
    error: bool = False
    timeout: bool = False


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, keeping its head and tail around a visible marker."""
    if len(text) <= max_chars:
        return text
    cut = len(text) - max_chars
    while True:  # the marker names how much was cut, and its own length changes that number
        marker = f"\n... [{cut} characters truncated] ...\n"
        keep = max_chars - len(marker)
        if keep <= 0:
            return text[:max_chars]
        if len(text) - keep == cut:
            break
        cut = len(text) - keep
    head = keep - keep // 3  # more head than tail: a traceback's last line is in the tail, the context in the head
    tail = keep - head
    return text[:head] + marker + (text[-tail:] if tail else "")


class Toolbox:
    """Named tools with their schemas; ``call`` runs one model-written call and never raises.

    ``tools``: functions (or ``Tool`` records for a custom description). ``max_output_chars``: observations
    longer than this are cut (head and tail kept, with a marker). Thread-safe when the tools are: it keeps no
    state of its own between calls.
    """

    def __init__(self, tools: Sequence[Callable[..., Any] | Tool], *, max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS):
        if max_output_chars < 64:
            raise ValueError(f"max_output_chars must be at least 64, got {max_output_chars}")
        self.max_output_chars = max_output_chars
        self._tools: dict[str, Tool] = {}
        for item in tools:
            tool = item if isinstance(item, Tool) else Tool.from_function(item)
            if tool.name in self._tools:
                raise ValueError(f"two tools are named {tool.name!r}; tool names must be unique")
            self._tools[tool.name] = tool

    @classmethod
    def from_object(cls, obj: Any, *, max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS) -> Toolbox:
        """A toolbox of ``obj``'s public methods (a stateful environment is a class whose methods are tools).
        Names starting with "_" and the lifecycle methods (reset, step, close) are not tools."""
        methods = [
            getattr(obj, name)
            for name, member in inspect.getmembers(type(obj))
            if not name.startswith("_") and name not in LIFECYCLE_METHODS and inspect.isfunction(member)
        ]
        if not methods:
            raise ValueError(f"{type(obj).__name__} has no public methods to offer as tools")
        return cls(methods, max_output_chars=max_output_chars)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """The JSON schemas, as ``apply_chat_template(messages, tools=...)`` takes them."""
        return [t.schema for t in self._tools.values()]

    def call(self, call: ToolCall) -> tuple[str, bool]:
        """(output, error) for one model-written call; see ``run``."""
        result = self.run(call)
        return result.output, result.error

    def run(self, call: ToolCall) -> ToolResult:
        """Check ``call`` against the tool's schema, run it, and return the capped observation. Every failure is
        an ``error`` result whose text names the problem."""
        tool = self._tools.get(call.name)
        if tool is None:
            return self._error(f"error: unknown tool {call.name!r}; available: {', '.join(self._tools) or '(none)'}")
        problem = check_arguments(tool.schema, call.arguments)
        if problem is not None:
            return self._error(f"error: {tool.name}: {problem}")
        try:
            value = tool.fn(**call.arguments)
        except ToolTimeout as exc:
            return ToolResult(truncate(str(exc), self.max_output_chars), error=True, timeout=True)
        except ToolError as exc:
            return self._error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a failing tool is an observation, not a crash of the trainer
            return self._error(f"error: {tool.name} raised {type(exc).__name__}: {exc}")
        try:
            text = _as_text(value)
        except Exception as exc:  # noqa: BLE001 - e.g. a __str__ that raises
            return self._error(f"error: {tool.name} returned a {type(value).__name__} that cannot be shown: {exc}")
        return ToolResult(truncate(text, self.max_output_chars))

    def _error(self, text: str) -> ToolResult:
        return ToolResult(truncate(text, self.max_output_chars), error=True)


def _as_text(value: Any) -> str:
    """A tool's return value as the observation: strings as they are, containers as JSON, None as ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


# ---------------------------------------------------------------------------- argument checking


def _json_type(value: Any) -> str:
    """The JSON type name of a decoded JSON value ("integer" for ints, never for bools)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _matches(actual: str, wanted: str) -> bool:
    return actual == wanted or (wanted == "number" and actual == "integer")


def check_value(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """Why ``value`` does not fit ``schema`` (the subset ``get_json_schema`` writes: type, nullable, enum,
    items, prefixItems, additionalProperties), or None when it fits."""
    if value is None and schema.get("nullable"):
        return None
    wanted = schema.get("type")
    actual = _json_type(value)
    if wanted is not None:
        options = wanted if isinstance(wanted, list) else [wanted]
        if not any(_matches(actual, t) for t in options):
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"{where} must be {' or '.join(options)}, got {actual} ({shown})"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {json.dumps(schema['enum'])}, got {json.dumps(value, default=str)}"
    if actual == "array":
        prefix = schema.get("prefixItems")
        if prefix is not None:
            if len(value) != len(prefix):
                return f"{where} must have {len(prefix)} items, got {len(value)}"
            for i, (item, sub) in enumerate(zip(value, prefix)):
                problem = check_value(item, sub, f"{where}[{i}]")
                if problem:
                    return problem
        elif "items" in schema:
            for i, item in enumerate(value):
                problem = check_value(item, schema["items"], f"{where}[{i}]")
                if problem:
                    return problem
    if actual == "object" and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            problem = check_value(item, schema["additionalProperties"], f"{where}[{key!r}]")
            if problem:
                return problem
    return None


def check_arguments(schema: dict[str, Any], arguments: Any) -> str | None:
    """Why ``arguments`` cannot be passed to the tool ``schema`` describes (missing, unexpected or mistyped),
    or None."""
    params = schema["function"].get("parameters", {})
    properties: dict[str, Any] = params.get("properties", {})
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {_json_type(arguments)}"
    expected = ", ".join(properties) or "(none)"
    missing = [name for name in params.get("required", []) if name not in arguments]
    if missing:
        return f"missing required argument(s) {', '.join(map(repr, missing))}; its arguments are: {expected}"
    unexpected = [name for name in arguments if name not in properties]
    if unexpected:
        return f"unexpected argument(s) {', '.join(map(repr, unexpected))}; its arguments are: {expected}"
    for name, value in arguments.items():
        problem = check_value(value, properties[name], f"argument {name!r}")
        if problem:
            return problem
    return None


__all__ = [
    "DEFAULT_MAX_OUTPUT_CHARS",
    "Tool",
    "ToolError",
    "ToolResult",
    "ToolTimeout",
    "Toolbox",
    "check_arguments",
    "check_value",
    "truncate",
]
