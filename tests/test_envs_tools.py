"""Tools as typed functions (schemas, every error path of a call), the exact calculator, ToolEnv, the
guess-the-number game and env_factory."""

from __future__ import annotations

import shutil
import sys
import uuid
from fractions import Fraction

import pytest

from posttrain.envs.base import ParsedTurn, ToolCall
from posttrain.envs.builtin import MAX_DIGITS, PythonTool, calculator, format_number
from posttrain.envs.games import GuessNumberEnv, read_guess
from posttrain.envs.parsers import get_parser
from posttrain.envs.registry import env_factory
from posttrain.envs.tool_env import ToolEnv
from posttrain.envs.tools import Tool, Toolbox, ToolError, truncate
from posttrain.rewards.sandbox import SandboxUnavailable

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make system-deps)")


def get_weather(city: str, days: int = 1, unit: str = "C") -> str:
    """The weather forecast for a city.

    Args:
        city: The city's name.
        days: How many days ahead.
        unit: The temperature unit, "C" or "F".
    """
    return f"{city}: sunny for {days} day(s), 20 {unit}"


def scale(values: list[float], factor: float, tags: dict[str, int] | None = None) -> list[float]:
    """Multiply every value.

    Args:
        values: The numbers.
        factor: The factor.
        tags: Optional labels.
    """
    return [v * factor for v in values]


def broken(x: int) -> str:
    """Always fails.

    Args:
        x: Anything.
    """
    raise KeyError(f"no entry {x}")


def chatty(n: int) -> str:
    """Says a lot.

    Args:
        n: How many characters.
    """
    return "a" * (n // 2) + "b" * (n - n // 2)


# ---------------------------------------------------------------------------- schemas


def test_schema_comes_from_the_signature_and_the_docstring() -> None:
    schema = Tool.from_function(get_weather).schema
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "get_weather"
    assert fn["description"] == "The weather forecast for a city."
    assert fn["parameters"]["properties"] == {
        "city": {"type": "string", "description": "The city's name."},
        "days": {"type": "integer", "description": "How many days ahead."},
        "unit": {"type": "string", "description": 'The temperature unit, "C" or "F".'},
    }
    assert fn["parameters"]["required"] == ["city"]  # arguments with defaults are optional
    assert Toolbox([get_weather]).schemas == [schema]


def test_a_tool_without_docstring_or_hints_is_refused_at_construction() -> None:
    def undocumented(x: int) -> int:
        return x

    def unhinted(x):  # noqa: ANN001
        """Nothing.

        Args:
            x: Anything.
        """

    for fn in (undocumented, unhinted):
        with pytest.raises(ValueError, match=fn.__name__):
            Toolbox([fn])
    with pytest.raises(ValueError, match="unique"):
        Toolbox([get_weather, get_weather])


def test_toolbox_from_an_object_offers_its_public_methods() -> None:
    class Counter:
        def __init__(self) -> None:
            self.count = 0

        def add(self, n: int) -> int:
            """Add to the counter.

            Args:
                n: How much.
            """
            self.count += n
            return self.count

        def reset(self, row: dict) -> None:
            self.count = 0

        def _private(self) -> None:
            pass

    counter = Counter()
    box = Toolbox.from_object(counter)
    assert box.names == ["add"]  # not reset (lifecycle), not _private
    assert box.call(ToolCall("add", {"n": 2})) == ("2", False)
    assert box.call(ToolCall("add", {"n": 3})) == ("5", False)
    assert counter.count == 5  # the state lives on the object


# ---------------------------------------------------------------------------- every error path of a call


def test_unknown_tool_names_the_available_ones() -> None:
    box = Toolbox([calculator, get_weather])
    output, error = box.call(ToolCall("foo", {}))
    assert error and output == "error: unknown tool 'foo'; available: calculator, get_weather"


def test_missing_and_unexpected_arguments() -> None:
    box = Toolbox([get_weather])
    output, error = box.call(ToolCall("get_weather", {"days": 2}))
    assert error and "missing required argument(s) 'city'" in output and "city, days, unit" in output
    output, error = box.call(ToolCall("get_weather", {"city": "Oslo", "country": "NO"}))
    assert error and "unexpected argument(s) 'country'" in output
    output, error = box.call(ToolCall("get_weather", ["Oslo"]))  # type: ignore[arg-type]
    assert error and "arguments must be a JSON object, got array" in output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"city": 42}, "argument 'city' must be string, got integer (42)"),
        ({"city": "Oslo", "days": "3"}, "argument 'days' must be integer, got string"),
        ({"city": "Oslo", "days": 2.5}, "argument 'days' must be integer, got number"),
        ({"city": "Oslo", "days": True}, "argument 'days' must be integer, got boolean"),
        ({"city": None}, "argument 'city' must be string, got null"),
    ],
)
def test_arguments_of_the_wrong_json_type(arguments: dict, message: str) -> None:
    output, error = Toolbox([get_weather]).call(ToolCall("get_weather", arguments))
    assert error and message in output


def test_nested_types_are_checked_and_ints_count_as_numbers() -> None:
    box = Toolbox([scale])
    assert box.call(ToolCall("scale", {"values": [1, 2.5], "factor": 2})) == ("[2, 5.0]", False)
    assert box.call(ToolCall("scale", {"values": [1], "factor": 2, "tags": None}))[1] is False  # nullable
    output, error = box.call(ToolCall("scale", {"values": [1, "2"], "factor": 2}))
    assert error and "argument 'values'[1] must be number, got string" in output
    output, error = box.call(ToolCall("scale", {"values": [1], "factor": 2, "tags": {"a": 1.5}}))
    assert error and "argument 'tags'['a'] must be integer, got number" in output


def test_an_exception_inside_the_tool_becomes_an_observation() -> None:
    output, error = Toolbox([broken]).call(ToolCall("broken", {"x": 3}))
    assert error and output == "error: broken raised KeyError: 'no entry 3'"


def test_tool_error_text_is_the_observation_verbatim() -> None:
    def refuse(x: int) -> str:
        """Refuses.

        Args:
            x: Anything.
        """
        raise ToolError(f"cannot do {x}")

    assert Toolbox([refuse]).call(ToolCall("refuse", {"x": 1})) == ("cannot do 1", True)


def test_output_is_capped_with_a_visible_marker() -> None:
    box = Toolbox([chatty], max_output_chars=200)
    output, error = box.call(ToolCall("chatty", {"n": 10_000}))
    assert not error and len(output) <= 200
    assert "characters truncated]" in output
    cut = int(output.split("[")[1].split(" ")[0])
    kept = len(output) - len(output[output.index("\n...") : output.index("...\n") + 4])
    assert kept + cut == 10_000  # the marker says exactly how much is missing
    assert output.startswith("a") and output.endswith("b")  # head and tail both kept
    assert box.call(ToolCall("chatty", {"n": 150})) == ("a" * 75 + "b" * 75, False)
    assert truncate("x" * 50, 50) == "x" * 50
    with pytest.raises(ValueError, match="max_output_chars"):
        Toolbox([chatty], max_output_chars=10)


# ---------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("123456789*987654321", "121932631112635269"),
        ("1/3", "1/3"),
        ("2**-2", "0.25"),
        ("0.1+0.2", "0.3"),  # exact: not 0.30000000000000004
        ("0.1 + 0.2 - 0.3", "0"),
        ("1/8", "0.125"),
        ("-7 / 4", "-1.75"),
        ("(2 + 3) * 7 / 4", "8.75"),
        ("-7 // 2", "-4"),
        ("-7 % 3", "2"),
        ("7.5 % 2", "1.5"),
        ("+-+3", "-3"),
        ("2 ** 10", "1024"),
        ("(1/3) * 3", "1"),
        ("2/3 + 1/6", "5/6"),
        ("1.5e-3 * 2", "0.003"),
        ("1_000 * 3", "3000"),
        ("0x10", "16"),
        ("(-1) ** 1000001", "-1"),
        ("0 ** 0", "1"),
        ("10 ** 999", "1" + "0" * 999),
        ("3.14159", "3.14159"),
    ],
)
def test_calculator_is_exact(expression: str, result: str) -> None:
    assert calculator(expression) == result
    assert Toolbox([calculator]).call(ToolCall("calculator", {"expression": expression})) == (result, False)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "names are not allowed: 'x'"),
        ("__import__('os').system('id')", "function calls are not allowed"),
        ("abs(-2)", "function calls are not allowed: 'abs(-2)'"),
        ("math.pi * 2", "attributes are not allowed: 'math.pi'"),
        ("'a' * 3", "strings are not allowed: \"'a'\""),
        ("[1, 2][0]", "subscripts are not allowed"),
        ("1 < 2", "comparisons are not allowed"),
        ("True + 1", "bool literals are not allowed"),
        ("1j * 2", "complex literals are not allowed"),
        ("2 ^ 3", "operator '^' is not supported (in '2 ^ 3'); use ** for powers"),
        ("1 / 0", "division by zero in '1 / 0'"),
        ("5 // (2 - 2)", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("10 ** 10 ** 10", "result too large in '10 ** 10 ** 10'"),
        ("2 ** 100000", "result too large"),
        ("(1/3) ** 100000", "result too large"),
        ("10 ** 1000", "result too large"),  # 1001 digits
        ("9" * 600 + " * " + "9" * 600, "result too large"),
        ("1e1000000000", "number too large or too small"),
        ("2 ** 0.5", "non-integer exponent"),
        ("(1", "invalid expression"),
        ("", "invalid expression"),
        ("1; 2", "invalid expression"),
        ("(" * 500 + "1" + ")" * 500, "invalid expression"),
        ("1 +" * 1000, "expression too long"),
    ],
)
def test_calculator_refuses_with_an_error_naming_the_piece(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match="^error: ") as info:
        calculator(expression)
    assert message in str(info.value)
    output, error = Toolbox([calculator]).call(ToolCall("calculator", {"expression": expression}))
    assert error and message in output


def test_format_number() -> None:
    assert format_number(Fraction(-1, 3)) == "-1/3"
    assert format_number(Fraction(1, 1024)) == "0.0009765625"
    assert format_number(Fraction(-3, 200)) == "-0.015"
    assert format_number(Fraction(7, 1)) == "7"
    assert MAX_DIGITS == 1000


# ---------------------------------------------------------------------------- ToolEnv


def hermes_turn(*calls: str, content: str = "") -> ParsedTurn:
    text = content + "".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls)
    return get_parser("hermes").parse(text)


def test_tool_env_runs_calls_in_order_and_ends_on_a_turn_without_calls() -> None:
    env = ToolEnv(Toolbox([calculator, get_weather]), "hermes")
    assert env.tools == Toolbox([calculator, get_weather]).schemas
    assert env.reset({"prompt": "What is 2+2?"}) == [{"role": "user", "content": "What is 2+2?"}]
    turn = hermes_turn(
        '{"name": "calculator", "arguments": {"expression": "2+2"}}',
        '{"name": "nope", "arguments": {}}',
        '{"name": "calculator", "arguments": {"expression": "1/0"}}',
        "{not json}",
        content="Let me compute.\n",
    )
    out = env.step(turn)
    assert not out.done and out.reward is None
    assert out.messages == [
        {"role": "tool", "name": "calculator", "content": "4"},
        {"role": "tool", "name": "nope", "content": "error: unknown tool 'nope'; available: calculator, get_weather"},
        {"role": "tool", "name": "calculator", "content": "error: division by zero in '1/0'"},
        {"role": "tool", "content": "error: " + turn.errors[0]},
    ]
    assert out.info == {"tool_calls": 3, "tool_errors": 2, "parse_errors": 1, "timeouts": 0}
    final = env.step(hermes_turn(content="The answer is 4."))
    assert final.done and final.messages == [] and final.reward is None
    assert final.info["tool_calls"] == 0


def test_tool_env_prompt_forms_and_options() -> None:
    env = ToolEnv(Toolbox([calculator]), "hermes", system_prompt="Use tools.", reward_fn=lambda t, row: 0.5)
    messages = [{"role": "user", "content": "hi"}]
    assert env.reset({"prompt": messages}) == [{"role": "system", "content": "Use tools."}, *messages]
    assert env.step(hermes_turn(content="done")).reward == 0.5
    with pytest.raises(ValueError, match="no 'prompt' column"):
        env.reset({"question": "?"})
    with pytest.raises(ValueError, match="string or a list of chat messages"):
        env.reset({"prompt": 3})
    capped = ToolEnv(Toolbox([calculator]), "hermes", max_calls_per_turn=1)
    out = capped.step(hermes_turn(*['{"name": "calculator", "arguments": {"expression": "1+1"}}'] * 3))
    assert [m["content"] for m in out.messages][0] == "2"
    assert all("too many tool calls" in m["content"] for m in out.messages[1:])
    assert out.info["tool_errors"] == 2


def test_tool_env_with_a_stateful_tool_object() -> None:
    class Notebook:
        def __init__(self) -> None:
            self.notes: list[str] = []
            self.closed = False

        def reset(self, row: dict) -> str:
            self.notes = [row["first"]]
            return f"Notes start with {row['first']!r}."

        def write(self, text: str) -> str:
            """Append a note.

            Args:
                text: The note.
            """
            self.notes.append(text)
            return f"{len(self.notes)} notes"

        def close(self) -> None:
            self.closed = True

    state = Notebook()
    env = ToolEnv(Toolbox.from_object(state), "hermes", state=state)
    assert env.reset({"first": "a"}) == [{"role": "user", "content": "Notes start with 'a'."}]
    out = env.step(hermes_turn('{"name": "write", "arguments": {"text": "b"}}'))
    assert out.messages[0]["content"] == "2 notes" and state.notes == ["a", "b"]
    env.close()
    assert state.closed


# ---------------------------------------------------------------------------- guess the number


def test_read_guess() -> None:
    assert read_guess("I think it is 50. guess: 42") == 42
    assert read_guess("Guess = 7, not 8") == 7  # the explicit form wins over the last integer
    assert read_guess("maybe 10 or rather 20") == 20
    assert read_guess("<think>between 1 and 100, so 50?</think>My guess is 64.") == 64
    assert read_guess("<think>try 33") is None  # an unterminated thought is still thought
    assert read_guess("4.5 is not an integer") is None
    assert read_guess("no idea") is None
    assert read_guess("guess: -3") == -3


def test_guess_number_is_played_over_several_turns_to_done() -> None:
    env = GuessNumberEnv()
    messages = env.reset({"secret": 37, "low": 1, "high": 100})
    assert messages[0]["role"] == "user" and "1 and 100" in messages[0]["content"]
    low, high, turns, parse_errors = 1, 100, 0, 0
    # A scripted binary-search policy, with one unreadable turn thrown in.
    out = env.step(ParsedTurn("hmm", "hmm, let me think"))
    assert out.messages == [{"role": "user", "content": out.messages[0]["content"]}] and not out.done
    assert "could not find a guess" in out.messages[0]["content"]
    parse_errors += out.info["parse_errors"]
    while True:
        guess = (low + high) // 2
        text = f"<think>range {low}..{high}</think>guess: {guess}"
        out = env.step(ParsedTurn(text, text))
        turns += 1
        parse_errors += out.info["parse_errors"]
        if out.done:
            break
        reply = out.messages[0]["content"]
        assert reply in ("higher", "lower") and out.reward is None
        low, high = (guess + 1, high) if reply == "higher" else (low, guess - 1)
    assert guess == 37 and out.reward == 1.0 and out.messages == []
    assert 2 <= turns <= 7 and parse_errors == 1 and env.guesses == turns


def test_guess_number_row_checks() -> None:
    env = GuessNumberEnv(low=0, high=9)
    assert "0 and 9" in env.reset({"secret": 3})[0]["content"]
    with pytest.raises(ValueError, match="'secret' column"):
        env.reset({"answer": 3})
    with pytest.raises(ValueError, match="outside its range"):
        env.reset({"secret": 300})


# ---------------------------------------------------------------------------- env_factory


def test_builtin_factories() -> None:
    make = env_factory("calculator", {"max_output_chars": 500, "system_prompt": "Be exact."})
    a, b = make(), make()
    assert a is not b and [t["function"]["name"] for t in a.tools] == ["calculator"]
    assert a.reset({"prompt": "q"})[0] == {"role": "system", "content": "Be exact."}
    game = env_factory("guess_number", {"low": 1, "high": 10})()
    assert isinstance(game, GuessNumberEnv) and game.tools == []


@needs_bwrap
def test_builtin_factories_with_the_python_tool_share_one_sandbox() -> None:
    make = env_factory("tools", {"tools": ["calculator", "python"], "parser": "hermes", "timeout": 2})
    a, b = make(), make()
    assert [t["function"]["name"] for t in a.tools] == ["calculator", "python"]
    assert a.toolbox is b.toolbox  # stateless: built once, so is the sandbox behind it
    out = a.step(hermes_turn('{"name": "python", "arguments": {"code": "print(6 * 7)"}}'))
    assert out.messages == [{"role": "tool", "name": "python", "content": "42\n"}]
    py = env_factory("python", {"memory_mb": 256})()
    out = py.step(get_parser("code").parse("Compute:\n```python\nprint(sum(range(5)))\n```\n"))
    assert out.messages == [{"role": "tool", "name": "python", "content": "```output\n10\n```"}]


def test_a_missing_sandbox_fails_at_construction_not_per_call(tmp_path) -> None:
    with pytest.raises(SandboxUnavailable, match="bubblewrap not found"):
        PythonTool(bwrap_path=str(tmp_path / "no-bwrap"))
    with pytest.raises(SandboxUnavailable):
        env_factory("python", {"bwrap_path": str(tmp_path / "no-bwrap")})


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("nope", {}, "unknown environment 'nope'; built-ins are tools, calculator, python, guess_number"),
        ("calculator", {"timeout": 3}, "unknown option(s) ['timeout']"),
        ("calculator", {"parser": "xml"}, "unknown tool-call parser 'xml'; available: code, hermes, llama3_json"),
        ("calculator", {"parser": "code"}, "parser 'code' calls the tool 'python'"),
        ("calculator", {"max_calls_per_turn": 0}, "max_calls_per_turn"),
        ("tools", {"tools": ["calculator", "shell"]}, "unknown tool 'shell'; built-in tools are calculator, python"),
        ("tools", {"tools": "calculator"}, "must be a non-empty list"),
        ("guess_number", {"secret": 3}, "unknown option(s) ['secret']; its options are low, high"),
        ("guess_number", {"low": 5, "high": 1}, "low must be <= high"),
    ],
)
def test_factory_errors_name_the_spec_and_the_valid_choices(spec: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        env_factory(spec, options)
    assert message in str(info.value)


USER_MODULE = '''
def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: The key.
    """
    return {"a": "1"}.get(key, "missing")


def shout(text: str) -> str:
    """Shout.

    Args:
        text: What to shout.
    """
    return text.upper()


TOOLS = [lookup, shout]


class Dice:
    def __init__(self, sides: int = 6) -> None:
        self.sides = sides
        self.rolls = 0

    def roll(self) -> int:
        """Roll the die (always its highest face, for the test)."""
        self.rolls += 1
        return self.sides

    def count(self) -> int:
        """How many rolls so far."""
        return self.rolls


class Echo:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.tools = []

    def reset(self, row):
        return [{"role": "user", "content": self.prefix + row["prompt"]}]

    def step(self, turn):
        from posttrain.envs.base import StepResult
        return StepResult([], 1.0, True, {})

    def close(self):
        pass
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A user module in the working directory (found the way reward functions are: the cwd joins sys.path)."""
    name = f"user_envs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def test_user_tool_functions(user_module: str) -> None:
    for spec in (f"{user_module}:lookup,shout", f"{user_module}:TOOLS"):
        env = env_factory(spec, {"parser": "hermes"})()
        assert [t["function"]["name"] for t in env.tools] == ["lookup", "shout"]
        out = env.step(hermes_turn('{"name": "shout", "arguments": {"text": "hi"}}'))
        assert out.messages[0]["content"] == "HI"
    env = env_factory("tools", {"tools": ["calculator", f"{user_module}:lookup"]})()
    assert [t["function"]["name"] for t in env.tools] == ["calculator", "lookup"]


def test_user_tool_class_gets_one_instance_per_episode(user_module: str) -> None:
    make = env_factory(f"{user_module}:Dice", {"sides": 20, "max_calls_per_turn": 4})
    a, b = make(), make()
    assert [t["function"]["name"] for t in a.tools] == ["count", "roll"]
    out = a.step(hermes_turn(*['{"name": "roll", "arguments": {}}'] * 2, '{"name": "count", "arguments": {}}'))
    assert [m["content"] for m in out.messages] == ["20", "20", "2"]
    assert b.step(hermes_turn('{"name": "count", "arguments": {}}')).messages[0]["content"] == "0"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['faces'\]; its options are sides"):
        env_factory(f"{user_module}:Dice", {"faces": 20})


def test_user_environment_class(user_module: str) -> None:
    env = env_factory(f"{user_module}:Echo", {"prefix": "> "})()
    assert env.reset({"prompt": "x"}) == [{"role": "user", "content": "> x"}]
    assert env.step(ParsedTurn("a", "a")).reward == 1.0
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['parser'\]"):
        env_factory(f"{user_module}:Echo", {"parser": "hermes"})


def test_user_spec_errors(user_module: str) -> None:
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        env_factory(f"{user_module}:missing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        env_factory("no_such_module_xyz:f")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sides'\]"):
        env_factory(f"{user_module}:lookup", {"sides": 3})
