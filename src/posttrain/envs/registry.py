"""``env_factory(spec, options)``: an environment by name, or a user's class or tool functions by "module:name".

Built-in names:
- "tools": a ``ToolEnv`` over the tools named in ``options["tools"]`` (default ["calculator", "python"];
  an entry may also be a user tool function, "module:function"); parser "hermes" by default.
- "calculator": a ``ToolEnv`` with only the calculator (parser "hermes").
- "python": a ``ToolEnv`` with only the python tool, parser "code" (ToRL / ReTool style fenced blocks).
- "guess_number": ``GuessNumberEnv`` (options ``low``, ``high``: the range when a row gives none).

Options of every ``ToolEnv``: ``parser``, ``max_output_chars``, ``max_calls_per_turn``, ``prompt_column``,
``system_prompt``; with the python tool also its limits: ``timeout``, ``memory_mb``, ``max_output_bytes``,
``max_procs``, ``file_size_mb``, ``tmpfs_mb``, ``sandbox``, ``bwrap_path``, ``python`` (see ``PythonTool``).

User specs, resolved like reward functions ("module:name", the module looked for on sys.path, then in the
current directory and the config's directory: ``posttrain.rewards.registry.import_object``):
- "module:Class" with ``reset`` and ``step``: an Environment; each episode gets ``Class(**options)``.
- "module:Class" otherwise: a stateful tool class; each episode gets ``Class(**options)`` (the ``ToolEnv``
  options above taken out first) and its public methods are the tools (``ToolEnv(state=...)``).
- "module:function" or "module:f1,f2": tool functions (or "module:TOOLS", a list of them) in a ``ToolEnv``.

The factory returns one new environment per call (one per trajectory); what is costly and shareable (the
sandbox, the schemas) is built once, here, so a missing bubblewrap or a tool without a docstring fails before
the run starts. Every problem with the spec or its options is a ValueError naming them.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from posttrain.envs.base import Environment
from posttrain.envs.builtin import PythonTool, calculator
from posttrain.envs.games import GuessNumberEnv
from posttrain.envs.parsers import CodeParser, get_parser
from posttrain.envs.tool_env import ToolEnv
from posttrain.envs.tools import DEFAULT_MAX_OUTPUT_CHARS, LIFECYCLE_METHODS, Tool, Toolbox
from posttrain.rewards.registry import VerifierLoadError, import_object

BUILTIN_ENVS = ("tools", "calculator", "python", "guess_number")
BUILTIN_TOOLS = ("calculator", "python")
TOOL_ENV_OPTIONS = ("parser", "max_output_chars", "max_calls_per_turn", "prompt_column", "system_prompt")
PYTHON_OPTIONS = tuple(inspect.signature(PythonTool).parameters)
_ENV_KWARGS = ("max_calls_per_turn", "prompt_column", "system_prompt")

EnvFactory = Callable[[], Environment]


def env_factory(spec: str, options: Mapping[str, Any] | None = None) -> EnvFactory:
    """A zero-argument callable making one environment per call (see the module docstring)."""
    opts = dict(options or {})
    if spec == "tools":
        names = opts.pop("tools", list(BUILTIN_TOOLS))
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(
                f"environment 'tools': option 'tools' must be a non-empty list of tool names, got {names!r}"
            )
        return _tool_env(spec, list(names), opts, "hermes")
    if spec == "calculator":
        return _tool_env(spec, ["calculator"], opts, "hermes")
    if spec == "python":
        return _tool_env(spec, ["python"], opts, "code")
    if spec == "guess_number":
        _check_kwargs(spec, GuessNumberEnv, opts)
        GuessNumberEnv(**opts)  # a bad range fails here, not in the first episode
        return lambda: GuessNumberEnv(**opts)
    if ":" not in spec:
        raise ValueError(
            f"unknown environment {spec!r}; built-ins are {', '.join(BUILTIN_ENVS)}, or pass 'module:Class' / "
            "'module:function' (a user environment class, tool class or tool functions)"
        )
    return _user_env(spec, opts)


def _tool_env(spec: str, names: list[str], opts: dict[str, Any], default_parser: str) -> EnvFactory:
    has_python = "python" in names
    allowed = TOOL_ENV_OPTIONS + (PYTHON_OPTIONS if has_python else ())
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        extra = "" if has_python else " (the python tool's limits apply only when it is among the tools)"
        raise ValueError(
            f"environment {spec!r}: unknown option(s) {unknown}; its options are {', '.join(allowed)}{extra}"
        )
    python_tool = PythonTool(**{k: opts[k] for k in PYTHON_OPTIONS if k in opts}) if has_python else None
    tools: list[Callable[..., Any] | Tool] = []
    for name in names:
        if name == "calculator":
            tools.append(calculator)
        elif name == "python":
            assert python_tool is not None
            tools.append(python_tool.tool())
        elif isinstance(name, str) and ":" in name:
            tools.extend(_import_tools(name))
        else:
            raise ValueError(
                f"environment {spec!r}: unknown tool {name!r}; built-in tools are {', '.join(BUILTIN_TOOLS)}, "
                "or name a tool function as 'module:function'"
            )
    toolbox = Toolbox(tools, max_output_chars=opts.get("max_output_chars", DEFAULT_MAX_OUTPUT_CHARS))
    parser = _parser(spec, opts.get("parser", default_parser), toolbox)
    kwargs = {k: opts[k] for k in _ENV_KWARGS if k in opts}
    ToolEnv(toolbox, parser, **kwargs)  # a bad option value fails here
    return lambda: ToolEnv(toolbox, parser, **kwargs)  # the toolbox is stateless: every episode shares it


def _parser(spec: str, name: Any, toolbox: Toolbox) -> Any:
    try:
        parser = get_parser(name)
    except ValueError as exc:
        raise ValueError(f"environment {spec!r}: {exc}") from None
    if isinstance(parser, CodeParser) and parser.tool_name not in toolbox.names:
        raise ValueError(
            f"environment {spec!r}: parser 'code' calls the tool {parser.tool_name!r}, which is not among its "
            f"tools ({', '.join(toolbox.names)}); use parser 'hermes' or 'llama3_json'"
        )
    return parser


def _import(spec: str) -> Any:
    try:
        return import_object(spec)
    except VerifierLoadError as exc:
        raise ValueError(f"environment {spec!r}: {exc}") from exc


def _import_tools(spec: str) -> list[Callable[..., Any]]:
    """The functions "module:f" or "module:f1,f2" names ("module:TOOLS" may be a list of them)."""
    module, _, attrs = spec.partition(":")
    found: list[Callable[..., Any]] = []
    for attr in (a.strip() for a in attrs.split(",")):
        obj = _import(f"{module}:{attr}")
        items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        for item in items:
            if inspect.isclass(item) or not callable(item):
                raise ValueError(
                    f"environment {spec!r}: {module}:{attr} is a {type(item).__name__}, not a tool function"
                )
            found.append(item)
    return found


def _is_environment_class(cls: type) -> bool:
    return callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))


def _user_env(spec: str, opts: dict[str, Any]) -> EnvFactory:
    obj = _import(spec) if "," not in spec.partition(":")[2] else None
    if obj is not None and inspect.isclass(obj):
        if _is_environment_class(obj):
            _check_kwargs(spec, obj, opts)
            return lambda: obj(**opts)
        return _tool_class_env(spec, obj, opts)
    if obj is not None and _is_environment_class(type(obj)):
        raise ValueError(
            f"environment {spec!r} is an instance of {type(obj).__name__}; name its class (each trajectory gets "
            "its own environment)"
        )
    unknown = sorted(set(opts) - set(TOOL_ENV_OPTIONS))
    if unknown:
        raise ValueError(
            f"environment {spec!r}: unknown option(s) {unknown}; its options are {', '.join(TOOL_ENV_OPTIONS)}"
        )
    toolbox = Toolbox(_import_tools(spec), max_output_chars=opts.get("max_output_chars", DEFAULT_MAX_OUTPUT_CHARS))
    parser = _parser(spec, opts.get("parser", "hermes"), toolbox)
    kwargs = {k: opts[k] for k in _ENV_KWARGS if k in opts}
    ToolEnv(toolbox, parser, **kwargs)
    return lambda: ToolEnv(toolbox, parser, **kwargs)


def _tool_class_env(spec: str, cls: type, opts: dict[str, Any]) -> EnvFactory:
    """A stateful tool class: a fresh instance per episode, its public methods the tools."""
    env_opts = {k: opts.pop(k) for k in TOOL_ENV_OPTIONS if k in opts}
    _check_kwargs(spec, cls, opts, also=TOOL_ENV_OPTIONS)
    max_chars = env_opts.get("max_output_chars", DEFAULT_MAX_OUTPUT_CHARS)
    # The schemas are checked now, on the class's methods bound to a stand-in (no instance is made before the run).
    stand_in = object()
    methods = [
        Tool.from_function(types.MethodType(member, stand_in))
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and name not in LIFECYCLE_METHODS and inspect.isfunction(member)
    ]
    probe = Toolbox(methods, max_output_chars=max_chars)
    if not probe.names:
        raise ValueError(f"environment {spec!r}: {cls.__name__} has no public methods to offer as tools")
    parser = _parser(spec, env_opts.get("parser", "hermes"), probe)
    kwargs = {k: env_opts[k] for k in _ENV_KWARGS if k in env_opts}

    def make() -> ToolEnv:
        state = cls(**opts)
        return ToolEnv(Toolbox.from_object(state, max_output_chars=max_chars), parser, state=state, **kwargs)

    return make


def _check_kwargs(spec: str, target: Callable[..., Any], opts: Mapping[str, Any], also: Sequence[str] = ()) -> None:
    """Unknown option names for ``target``'s keyword parameters are an error naming the valid ones."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        valid = ", ".join([*known, *also]) or "(none)"
        raise ValueError(f"environment {spec!r}: unknown option(s) {unknown}; its options are {valid}")


__all__ = ["BUILTIN_ENVS", "BUILTIN_TOOLS", "EnvFactory", "env_factory"]
