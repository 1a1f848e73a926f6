"""CodeVerifier behaviour: the three test formats, strict comparison, partial credit, and the reward hacks of
/work/shared/reference/verifiers.md §3 (each must score 0). Sandbox escapes are in test_sandbox.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

import pytest

from posttrain.rewards.code import CodeVerifier, extract_program, parse_tests, values_match
from posttrain.rewards.sandbox import SandboxUnavailable

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make system-deps)")


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed (make system-deps)")
    return CodeVerifier(timeout=2.0)


@pytest.fixture(scope="module")
def partial_verifier() -> CodeVerifier:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed (make system-deps)")
    return CodeVerifier(timeout=2.0, partial=True)


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


SQUARE_FN = {"fn_name": "square", "inputs": [[2], [3], [-4]], "outputs": [4, 9, 16]}
SQUARE_ASSERTS = ["assert square(2) == 4", "assert square(3) == 9", "assert square(-4) == 16"]
SUM_IO = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]


# ---------------------------------------------------------------------------- extraction and parsing


def test_extract_program_prefers_the_last_python_block() -> None:
    text = "```python\nfirst\n```\n```text\nnot code\n```\n```py\nsecond\n```\n```\nplain\n```"
    assert extract_program(text) == "second\n"
    assert extract_program("```\nonly plain\n```") == "only plain\n"
    assert extract_program("print(1)") == "print(1)"


def test_assert_expected_side_never_enters_the_sandbox() -> None:
    plan = parse_tests(["assert square(2) == 4", "assert 9 == square(3)", "assert is_even(8)", "assert not is_even(7)"])
    assert plan.mode == "call"
    assert [c["expr"] for c in plan.cases] == ["square(2)", "square(3)", "is_even(8)", "is_even(7)"]
    assert [e.value for e in plan.expected] == [4, 9, True, False]
    assert "4" not in json.dumps(plan.cases[0]) and "9" not in json.dumps(plan.cases[1])


def test_function_tests_send_no_outputs() -> None:
    plan = parse_tests(json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [987654321]}))
    assert "987654321" not in json.dumps(plan.cases)


def test_unsupported_assert_is_a_dataset_error() -> None:
    with pytest.raises(ValueError, match="unsupported assert"):
        parse_tests(["assert f(1) != 2"])
    with pytest.raises(ValueError, match="mix"):
        parse_tests([SUM_IO[0], "assert f(1) == 2"])


def test_strict_comparison_rules() -> None:
    tol = {"rel_tol": 1e-6, "abs_tol": 1e-9}
    assert not values_match(1, True, **tol) and not values_match(True, 1, **tol)
    assert not values_match(1, 1.0, **tol) and not values_match(1.0, 1, **tol)
    assert not values_match("1", 1, **tol)
    assert values_match(0.1 + 0.2, 0.3, **tol)
    assert not values_match(0.31, 0.3, **tol)
    assert not values_match((1, 2), [1, 2], **tol)
    assert values_match((1, 2), [1, 2], **tol, tuple_is_list=True)
    assert not values_match({1: "a"}, {True: "a"}, **tol)
    assert values_match({"a": [1.0, {2, 3}]}, {"a": [1.0, {3, 2}]}, **tol)


# ---------------------------------------------------------------------------- the three formats


@needs_bwrap
def test_stdio_correct_passes_and_wrong_fails(verifier: CodeVerifier) -> None:
    right = fenced("a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()")  # trailing spaces / blank line
    assert verifier(right, tests=SUM_IO) == 1.0
    assert verifier(fenced("print(3)"), tests=SUM_IO) == 0.0
    # JSON string form of the column, and APPS-style inputs/outputs
    assert verifier(right, tests=json.dumps({"inputs": ["2 2\n"], "outputs": ["4\n"]})) == 1.0


@needs_bwrap
def test_stdio_compares_every_line(verifier: CodeVerifier) -> None:
    tests = [{"input": "", "output": "1\n2\n3\n"}]
    assert verifier(fenced("print(1)\nprint(2)\nprint(3)"), tests=tests) == 1.0
    assert verifier(fenced("print(1)"), tests=tests) == 0.0  # a prefix of the answer is not the answer
    assert verifier(fenced("print(1)\nprint(2)\nprint(3)\nprint(4)"), tests=tests) == 0.0
    assert verifier(fenced(" print(1)"), tests=[{"input": "", "output": " 1"}]) == 0.0  # IndentationError


@needs_bwrap
def test_stdio_nonzero_exit_fails(verifier: CodeVerifier) -> None:
    score = verifier(fenced("print(3)\nraise ValueError('late')"), tests=[{"input": "", "output": "3"}])
    assert score == 0.0 and score.cases[0].status == "exited"


@needs_bwrap
def test_function_call_format(verifier: CodeVerifier) -> None:
    assert verifier(fenced("def square(x):\n    return x * x"), tests=SQUARE_FN) == 1.0
    assert verifier(fenced("def square(x):\n    return x + x"), tests=SQUARE_FN) == 0.0
    leetcode = "class Solution:\n    def square(self, x):\n        return x ** 2"
    assert verifier(fenced(leetcode), tests=SQUARE_FN) == 1.0
    tuple_out = {"fn_name": "pair", "inputs": [[1]], "outputs": [[1, 2]]}
    assert verifier(fenced("def pair(x):\n    return (x, x + 1)"), tests=tuple_out) == 1.0


@needs_bwrap
def test_assert_format(verifier: CodeVerifier) -> None:
    assert verifier(fenced("def square(x):\n    return x * x"), tests=SQUARE_ASSERTS) == 1.0
    assert verifier(fenced("def square(x):\n    return 4"), tests=SQUARE_ASSERTS) == 0.0
    block = "assert square(2) == 4\nassert square(5) == 25, 'message'\nassert math.isclose(root(2.0), 1.41421356, rel_tol=1e-6)"
    program = "import math\ndef square(x):\n    return x * x\ndef root(x):\n    return math.sqrt(x)"
    assert verifier(fenced(program), tests=block) == 1.0
    assert verifier(fenced("def square(x):\n    return float(x * x)"), tests=SQUARE_ASSERTS) == 0.0  # 4.0 != 4


@needs_bwrap
def test_wrong_types_fail(verifier: CodeVerifier) -> None:
    tests = ["assert is_even(4) == True"]
    assert verifier(fenced("def is_even(x):\n    return x % 2 == 0"), tests=tests) == 1.0
    assert verifier(fenced("def is_even(x):\n    return 1"), tests=tests) == 0.0  # 1 is not True
    assert verifier(fenced("def is_even(x):\n    return 'True'"), tests=tests) == 0.0


@needs_bwrap
def test_partial_option_gives_the_pass_fraction(verifier: CodeVerifier, partial_verifier: CodeVerifier) -> None:
    two_of_three = fenced("def square(x):\n    return 16 if x == -4 else x * x if x == 2 else 0")
    assert partial_verifier(two_of_three, tests=SQUARE_FN) == pytest.approx(2 / 3)
    assert verifier(two_of_three, tests=SQUARE_FN) == 0.0
    one_of_two = fenced("a, b = map(int, input().split())\nprint(3)")
    assert partial_verifier(one_of_two, tests=SUM_IO) == pytest.approx(0.5)


@needs_bwrap
def test_a_crashing_case_does_not_sink_the_others_under_partial(partial_verifier: CodeVerifier) -> None:
    program = "import os\ndef square(x):\n    if x == 3:\n        os._exit(0)\n    return x * x"
    score = partial_verifier(fenced(program), tests=SQUARE_FN)
    assert score == pytest.approx(2 / 3)
    assert [c.status for c in score.cases] == ["ok", "exited", "ok"]


@needs_bwrap
def test_batch_runs_in_parallel_and_keeps_order(verifier: CodeVerifier) -> None:
    right, wrong = fenced("def square(x):\n    return x * x"), fenced("def square(x):\n    return -1")
    scores = verifier.batch([right, wrong, right, wrong, right], [SQUARE_FN] * 5)
    assert [float(s) for s in scores] == [1.0, 0.0, 1.0, 0.0, 1.0]
    rows = [{"tests": SQUARE_ASSERTS}, {"tests": SUM_IO}]
    assert [float(s) for s in verifier.score_batch([right, fenced("print(3)")], rows)] == [1.0, 0.0]


@needs_bwrap
def test_missing_tests_column_raises(verifier: CodeVerifier) -> None:
    with pytest.raises(ValueError, match="tests"):
        verifier(fenced("print(1)"), prompt="no tests here")


# ---------------------------------------------------------------------------- reward hacks: all score 0

HACKS = {
    "sys_exit_module_level": "import sys\nsys.exit(0)\ndef square(x):\n    return x * x",
    "os_exit_module_level": "import os\nos._exit(0)",
    "raise_systemexit_module_level": "raise SystemExit(0)",
    "sys_exit_in_function": "import sys\ndef square(x):\n    sys.exit(0)",
    "os_exit_in_function": "import os\ndef square(x):\n    os._exit(0)",
    "raise_systemexit_in_function": "def square(x):\n    raise SystemExit",
    "always_equal_object": "class Eq:\n    def __eq__(self, other):\n        return True\n"
    "    def __ne__(self, other):\n        return False\n"
    "def square(x):\n    return Eq()",
    "always_equal_int_subclass": "class Eq(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "def square(x):\n    return Eq(0)",
    "monkeypatch_builtins_type_and_isinstance": "import builtins\nclass Eq:\n    __eq__ = lambda s, o: True\n"
    "builtins.type = lambda *a: int\nbuiltins.isinstance = lambda *a: True\ndef square(x):\n    return Eq()",
    "monkeypatch_json_print_stdout": (
        "import builtins, json, sys\n"
        'fake = \'{"results": [{"status": "ok", "passed": true}], "passed": true}\'\n'
        "json.dumps = lambda *a, **k: fake\njson.loads = lambda *a, **k: {'passed': True}\n"
        "builtins.print = lambda *a, **k: sys.__stdout__.write(fake + '\\n')\n"
        "sys.stdout.write = lambda s: 0\n"
        "print('PASSED')\n"
        "def square(x):\n    print('all tests passed')\n    return None"
    ),
    "forge_result_fds": (
        "import os\n"
        'fake = b\'R 0 0\\n{"results":[{"status":"ok","passed":true}]}\\nPASSED\\n\'\n'
        "for fd in range(1, 64):\n"
        "    try:\n        os.write(fd, fake)\n    except OSError:\n        pass\n"
        "os._exit(0)"
    ),
    "forge_supervisor_stdout_via_proc": (
        "import os\n"
        "def square(x):\n"
        "    for fd in range(0, 16):\n"
        "        try:\n"
        "            w = os.open(f'/proc/{os.getppid()}/fd/{fd}', os.O_WRONLY)\n"
        '            os.write(w, b\'{"results":[{"status":"ok","value":"WyJpbnQiLCI0Il0="}]}\')\n'
        "        except OSError:\n            pass\n"
        "    os._exit(0)"
    ),
    "fork_and_exit_parent": "import os, time\nif os.fork() > 0:\n    os._exit(0)\ntime.sleep(30)",
    "subprocess_runs_a_fake_harness": (
        "import subprocess, sys\n"
        "def square(x):\n"
        "    subprocess.run([sys.executable, '-c', 'import os; os.write(3, b\"O 0 13\\\\n\")'], pass_fds=(3,))\n"
        "    return subprocess.run(['true']).returncode"
    ),
    "sleep_past_timeout": "import time\ndef square(x):\n    time.sleep(30)\n    return x * x",
}


@needs_bwrap
@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hack_scores_zero(name: str) -> None:
    verifier = CodeVerifier(timeout=1.0)
    tests = {"fn_name": "square", "inputs": [[2]], "outputs": [4]}
    score = verifier(fenced(HACKS[name]), tests=tests)
    assert score == 0.0, (name, score.cases)
    assert not score.cases[0].passed


@needs_bwrap
def test_hack_scores_zero_on_asserts_too(verifier: CodeVerifier) -> None:
    for name in (
        "sys_exit_module_level",
        "os_exit_in_function",
        "always_equal_object",
        "monkeypatch_json_print_stdout",
    ):
        assert verifier(fenced(HACKS[name]), tests=["assert square(2) == 4"]) == 0.0, name


@needs_bwrap
def test_exit_before_printing_fails_stdio(verifier: CodeVerifier) -> None:
    for program in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"):
        assert verifier(fenced(program + "\nprint(3)"), tests=SUM_IO[:1]) == 0.0


@needs_bwrap
def test_printing_the_expected_output_does_not_pass_function_tests(verifier: CodeVerifier) -> None:
    program = 'print(4)\nprint(\'["int", "4"]\')\ndef square(x):\n    print(4)\n    return None'
    assert verifier(fenced(program), tests=SQUARE_FN) == 0.0


@needs_bwrap
def test_the_expected_answer_is_nowhere_in_the_sandbox(verifier: CodeVerifier) -> None:
    # The program hunts for a distinctive expected value in its memory, stack and filesystem and returns it if
    # found: it can only pass by finding it, and it must not.
    program = """
import gc, os, sys
MARK = str(987654320 + 1)  # built at run time: no constant in the code holds it
def hunt():
    for obj in gc.get_objects():
        try:
            if MARK in repr(obj) and "MARK" not in repr(obj):
                return True
        except Exception:
            pass
    frame = sys._getframe()
    while frame:
        if MARK in repr(frame.f_locals) and "MARK" not in repr(frame.f_locals):
            return True
        frame = frame.f_back
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if not (root == "/" and d in ("proc", "sys", "usr", "dev"))]
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    if MARK.encode() in f.read(1 << 20):
                        return True
            except OSError:
                pass
    return False
def answer(x):
    return int(MARK) if hunt() else 0
"""
    tests = {"fn_name": "answer", "inputs": [[1]], "outputs": [987654321]}
    score = verifier(fenced(program), tests=tests)
    assert score == 0.0 and score.cases[0].value == 0
    assert verifier(fenced(program), tests=["assert answer(1) == 987654321"]) == 0.0


@needs_bwrap
def test_test_files_are_unreachable(verifier: CodeVerifier, tmp_path) -> None:
    tests_file = tmp_path / f"tests-{uuid.uuid4().hex}.json"
    tests_file.write_text(json.dumps(SQUARE_FN))
    os.chmod(tmp_path, 0o755)
    tests_file.chmod(0o666)  # even a world-writable file on the host stays out of reach
    program = f"""
import json
def square(x):
    try:
        spec = json.load(open({str(tests_file)!r}))
        return spec["outputs"][spec["inputs"].index([x])]
    except OSError:
        pass
    try:
        open({str(tests_file)!r}, "w").write('{{"fn_name": "square", "inputs": [], "outputs": []}}')
    except OSError:
        pass
    return -1
"""
    assert verifier(fenced(program), tests=SQUARE_FN) == 0.0
    assert json.loads(tests_file.read_text()) == SQUARE_FN


def test_missing_bwrap_says_how_to_install() -> None:
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        CodeVerifier(bwrap_path="/nonexistent/bwrap")


def test_sandbox_none_is_loud_but_still_limited(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards.sandbox"):
        verifier = CodeVerifier(sandbox="none", timeout=1.0)
    assert any("DISABLED" in r.getMessage() for r in caplog.records)
    assert verifier(fenced("def square(x):\n    return x * x"), tests=SQUARE_FN) == 1.0
    score = verifier(fenced("def square(x):\n    while True:\n        pass"), tests=SQUARE_FN)
    assert score == 0.0 and score.cases[0].status == "timeout"
    hog = (
        "def square(x):\n    try:\n        bytearray(8 << 30)\n        return 'allocated'\n"
        "    except MemoryError:\n        return 'capped'"
    )
    assert verifier(fenced(hog), tests=["assert square(1) == 1"]).cases[0].value == "capped"
