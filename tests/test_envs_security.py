"""The python tool treats model-written calls as hostile input: each attack below comes back as an error (or
a contained observation) within the time limit, the host is unaffected, and the next normal call still works.

The calls go through the whole environment path a trajectory takes (env_factory("python") -> ToolEnv.step ->
Toolbox -> PythonTool -> the shared bubblewrap Sandbox), so what is checked is what the policy would see.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posttrain.envs.base import ParsedTurn, ToolCall
from posttrain.envs.registry import env_factory
from posttrain.envs.tool_env import ToolEnv
from posttrain.rewards.sandbox import processes_of_uid

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make system-deps)")

TIMEOUT = 1.0
# The sandbox's own backstop is timeout * 3 + 5 s; anything past this bound means a limit did not hold.
WITHIN_S = TIMEOUT * 3 + 5 + 5
MAX_OUTPUT_CHARS = 4000
# Appears in this file only: if it shows up in an observation, the sandbox read the test's source.
THIS_FILE_MARKER = "marker-" + "5c1e0d9a-test-envs-security"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env() -> ToolEnv:
    make = env_factory(
        "python",
        {
            "timeout": TIMEOUT,
            "memory_mb": 512,
            "max_procs": 16,
            "max_output_bytes": 64 * 1024,
            "max_output_chars": MAX_OUTPUT_CHARS,
        },
    )
    return make()


def run(env: ToolEnv, code: str) -> tuple[str, dict, float]:
    """One tool call through ToolEnv.step: (the tool message's content, the step's info, seconds taken)."""
    start = time.monotonic()
    out = env.step(ParsedTurn("", "", (ToolCall("python", {"code": code}),)))
    elapsed = time.monotonic() - start
    assert not out.done and len(out.messages) == 1 and out.messages[0]["role"] == "tool"
    content = out.messages[0]["content"]
    assert content.startswith("```output\n") and content.endswith("\n```")
    return content[len("```output\n") : -len("\n```")], out.info, elapsed


def _sandbox_uid(env: ToolEnv) -> int | None:
    """The uid sandboxed processes run as on the host, when it is not ours (the launcher drops to it as root)."""
    return env.toolbox._tools["python"].fn.__self__.sandbox.uid if os.geteuid() == 0 else None


def attack(env: ToolEnv, code: str) -> tuple[str, dict, float]:
    """``run`` a hostile call, then check the host: we are alive (we are running), no process the call started
    outlives it, and a following normal call works. Returns what ``run`` did."""
    uid = _sandbox_uid(env)
    before = set(processes_of_uid(uid)) if uid is not None else set()
    output, info, elapsed = run(env, code)
    assert elapsed < WITHIN_S, f"the call took {elapsed:.1f}s"
    if uid is not None:
        # Other sandboxes (another test run on this machine) may share the uid: only processes alive right after
        # this call that were not there before it are suspects, and each must be gone within a few seconds.
        suspects = set(processes_of_uid(uid)) - before
        deadline = time.monotonic() + 5
        while suspects and time.monotonic() < deadline:
            time.sleep(0.05)
            suspects &= set(processes_of_uid(uid))
        assert not suspects, f"sandboxed processes outlived the call: {sorted(suspects)}"
    normal, normal_info, _ = run(env, "print(sum(range(10)))")
    assert normal == "45" and normal_info["tool_errors"] == 0
    return output, info, elapsed


def test_a_normal_call_and_a_traceback(env: ToolEnv) -> None:
    output, info, _ = run(env, "x = [1, 2, 3]\nprint(x[1] * 21)")
    assert output == "42" and info == {"tool_calls": 1, "tool_errors": 0, "parse_errors": 0, "timeouts": 0}
    output, info, _ = run(env, "print('before')\ndef f():\n    return 1 / 0\nf()")
    assert output.startswith("before\nTraceback (most recent call last):")
    assert 'File "<solution>", line 3, in f' in output and output.endswith("ZeroDivisionError: division by zero")
    assert "harness" not in output  # the sandbox driver's own frames are not shown
    assert info["tool_errors"] == 1


def test_infinite_loop(env: ToolEnv) -> None:
    output, info, _ = attack(env, "while True:\n    pass")
    assert output == f"error: timed out after {TIMEOUT:g}s"
    assert info["timeouts"] == 1 and info["tool_errors"] == 1


def test_fork_bomb(env: ToolEnv) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    output, info, _ = attack(env, bomb)
    assert output.startswith("error: ") and info["tool_errors"] == 1


def test_a_detached_child_does_not_outlive_the_call(env: ToolEnv) -> None:
    code = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\nprint('parent done')"
    output, _, _ = attack(env, code)
    assert "parent done" in output or output.startswith("error: timed out")


@pytest.mark.parametrize(
    "code",
    [
        "print('x' * 10**9)",  # a gigabyte in one string: over the memory limit
        "while True:\n    print('y' * 1000)",  # a flood: stopped at the output limit
        "import sys\nsys.stdout.write('z' * (10 * 1024 * 1024))",  # 10 MiB at once
    ],
)
def test_huge_output(env: ToolEnv, code: str) -> None:
    output, info, _ = attack(env, code)
    assert info["tool_errors"] == 1
    assert len(output) <= MAX_OUTPUT_CHARS
    assert "MemoryError" in output or "error: output exceeded" in output, output[-300:]


def test_memory_bomb(env: ToolEnv) -> None:
    output, info, _ = attack(env, "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))")
    assert output.endswith("MemoryError") and info["tool_errors"] == 1


def test_writes_outside_the_sandbox_do_not_reach_the_host(env: ToolEnv) -> None:
    host_tmp = f"/tmp/escape-{uuid.uuid4().hex}"
    project = str(REPO / f"escape-{uuid.uuid4().hex}")
    code = f"""
for path in [{host_tmp!r}, {project!r}, "/escape", "/usr/escape"]:
    try:
        with open(path, "w") as f:
            f.write("pwned")
        print(path, "written")
    except OSError as exc:
        print(path, type(exc).__name__)
"""
    output, _, _ = attack(env, code)
    lines = dict(line.rsplit(" ", 1) for line in output.splitlines())
    assert lines[host_tmp] == "written"  # the sandbox's private /tmp is writable ...
    assert not os.path.exists(host_tmp)  # ... and it is not the host's
    assert lines[project] == "FileNotFoundError" and not os.path.exists(project)
    assert lines["/escape"] != "written" and lines["/usr/escape"] != "written"


def test_no_network(env: ToolEnv) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = f"""
import socket
for address in [("127.0.0.1", {port}), ("1.1.1.1", 80), ("8.8.8.8", 53)]:
    try:
        socket.create_connection(address, timeout=0.5).close()
        print("connected")
    except OSError as exc:
        print(type(exc).__name__)
"""
    try:
        output, _, _ = attack(env, code)
        assert "connected" not in output and len(output.splitlines()) == 3
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the host's loopback
    finally:
        server.close()


def test_project_and_test_files_are_unreadable(env: ToolEnv) -> None:
    targets = [str(REPO / "pyproject.toml"), str(Path(__file__).resolve()), "/etc/passwd", "/work"]
    code = f"""
import os
for path in {targets!r}:
    try:
        print(path, open(path).read()[:200] if not os.path.isdir(path) else os.listdir(path))
    except OSError as exc:
        print(path, type(exc).__name__)
print(sorted(os.environ))
"""
    output, _, _ = attack(env, code)
    assert THIS_FILE_MARKER not in output and "[tool.ruff]" not in output and "root:" not in output
    for path in targets:
        assert f"{path} FileNotFoundError" in output, output
    assert "VIRTUAL_ENV" not in output and "OMP_NUM_THREADS" not in output  # no host environment


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.kill(os.getppid(), 9)",  # the sandbox's supervisor
        "import os\nos.kill(-1, 9)",  # everything the sandbox uid may signal
        "import os, signal\nos.killpg(0, signal.SIGKILL)",
        f"import os\nos.kill({os.getpid()}, 9)",  # the host's test process, by its host pid
        f"import os\nos.kill({os.getppid()}, 9)",  # and its parent
    ],
)
def test_killing_the_parent(env: ToolEnv, code: str) -> None:
    output, info, _ = attack(env, code)
    assert info["tool_errors"] == 1 and output.startswith(("error: ", "Traceback")), output
    os.kill(os.getpid(), 0)  # still here


def test_one_shared_sandbox_serves_concurrent_episodes(env: ToolEnv) -> None:
    """Trajectories step in parallel on a thread pool, each with its own env over the one shared sandbox: a
    hostile neighbour (a loop, a fork bomb) does not disturb the others' results."""
    make = env_factory("python", {"timeout": TIMEOUT, "max_procs": 16})
    envs = [make() for _ in range(4)]
    codes = [
        "while True:\n    pass",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "print(2 ** 20)",
        "print('ok')",
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, envs, codes))
    assert results[0][0].startswith("error: timed out") and results[1][0].startswith("error: ")
    assert results[2][0] == "1048576" and results[3][0] == "ok"
    assert attack(env, "print('still fine')")[0] == "still fine"
