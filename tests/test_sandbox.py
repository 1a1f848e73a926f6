"""Escape attempts from inside the code sandbox fail, and the host is untouched afterwards.

Each probe is a function the sandbox calls; it returns what it observed (a plain value that comes back through
the result channel), so the assertions are about what the program could and could not do.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from posttrain.rewards.code import CodeVerifier
from posttrain.rewards.sandbox import Sandbox, SandboxLimits, processes_of_uid, read_capped

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make system-deps)")

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    return CodeVerifier(timeout=TIMEOUT, max_procs=16, memory_mb=512, max_output_bytes=64 * 1024)


def observe(verifier: CodeVerifier, program: str, call: str = "probe()"):
    """Run `program` in the sandbox, return (value the call returned, case result, score)."""
    score = verifier(f"```python\n{program}\n```", tests=[f"assert {call} == 'never matches'"])
    case = score.cases[0]
    assert case.status == "ok", case  # the probe itself ran to completion
    return case.value, case, score


def wait_for_no_processes(uid: int, baseline: set[int], seconds: float = 3.0) -> set[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = set(processes_of_uid(uid)) - baseline
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_runs_as_unprivileged_uid_without_capabilities(verifier: CodeVerifier) -> None:
    program = """
import os
def probe():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return [status["CapEff"].strip(), status["NoNewPrivs"].strip(), sorted(os.environ), sorted(os.listdir("/"))]
"""
    (cap_eff, no_new_privs, env, root), _, _ = observe(verifier, program)
    assert int(cap_eff, 16) == 0 and no_new_privs == "1"
    allowed = {"PATH", "HOME", "TMPDIR", "LANG", "PWD", "LC_CTYPE"}
    assert set(env) <= allowed | {"PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "PYTHONUTF8", "PYTHONIOENCODING"}
    assert "root" not in root and "home" not in root and "etc" not in root and "work" not in root


def test_sandboxed_processes_run_as_the_dropped_uid_on_the_host(verifier: CodeVerifier) -> None:
    if os.geteuid() != 0:
        pytest.skip("the uid drop happens only when the launcher is root")
    uid = verifier.sandbox.uid
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in processes_of_uid(uid):
                try:
                    seen.append(int(open(f"/proc/{pid}/status").read().split("Uid:")[1].split()[0]))
                except (OSError, IndexError):
                    pass
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        observe(verifier, "import time\ndef probe():\n    time.sleep(0.5)\n    return 'slept'")
    finally:
        done.set()
        thread.join()
    assert seen and set(seen) == {uid}


def test_network_is_unreachable(verifier: CodeVerifier) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    program = f"""
import socket
def probe():
    out = []
    for address in [("127.0.0.1", {port}), ("1.1.1.1", 80), ("8.8.8.8", 53)]:
        try:
            socket.create_connection(address, timeout=1).close()
            out.append("connected")
        except OSError as exc:
            out.append(type(exc).__name__)
    return out
"""
    try:
        value, _, _ = observe(verifier, program)
        assert "connected" not in value, value
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the host's loopback
    finally:
        server.close()


def test_writes_outside_the_tmpfs_fail_and_leave_the_host_untouched(verifier: CodeVerifier) -> None:
    marker = f"/tmp/posttrain-escape-{uuid.uuid4().hex}"
    project_file = os.path.join(os.getcwd(), f"escape-{uuid.uuid4().hex}")
    program = f"""
def probe():
    out = {{}}
    for path in [{marker!r}, "/usr/escape", "/etc/escape", "/escape", {project_file!r}, "/proc/sys/kernel/hostname"]:
        try:
            with open(path, "w") as f:
                f.write("x")
            out[path] = "written"
        except OSError as exc:
            out[path] = type(exc).__name__
    return out
"""
    value, _, _ = observe(verifier, program)
    assert value[marker] == "written"  # the private tmpfs is writable...
    assert not os.path.exists(marker)  # ...and it is not the host's /tmp
    assert not os.path.exists(project_file)
    assert [p for p, v in value.items() if v == "written"] == [marker]


def test_root_home_is_unreadable(verifier: CodeVerifier) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to plant a file under /root")
    secret = f"secret-{uuid.uuid4().hex}"
    path = f"/root/posttrain-{uuid.uuid4().hex}.txt"
    with open(path, "w") as f:
        f.write(secret)
    try:
        program = f"""
import os
def probe():
    found = []
    for attempt in (lambda: os.listdir("/root"), lambda: open({path!r}).read(),
                    lambda: open("/proc/1/root{path}").read(), lambda: os.listdir("/proc/1/root/root")):
        try:
            found.append(repr(attempt()))
            print(found[-1])
        except OSError as exc:
            found.append(type(exc).__name__)
    return found
"""
        value, case, score = observe(verifier, program)
        assert all(v in ("FileNotFoundError", "PermissionError") for v in value), value
        assert secret not in repr(score.cases) and secret not in score.sandbox_stderr
    finally:
        os.remove(path)


def test_supervisor_is_out_of_reach(verifier: CodeVerifier) -> None:
    program = """
import os
def probe():
    out = []
    for path, mode in [(f"/proc/{os.getppid()}/fd/1", os.O_WRONLY), (f"/proc/{os.getppid()}/mem", os.O_RDONLY),
                       (f"/proc/{os.getppid()}/environ", os.O_RDONLY)]:
        try:
            os.close(os.open(path, mode))
            out.append("opened")
        except OSError as exc:
            out.append(type(exc).__name__)
    return out
"""
    value, _, _ = observe(verifier, program)
    assert value == ["PermissionError"] * 3


def test_fork_count_is_bounded_by_rlimit_nproc(verifier: CodeVerifier) -> None:
    program = """
import os, time
def probe():
    children = 0
    while children < 1000:
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        children += 1
    return children
"""
    value, _, _ = observe(verifier, program)
    assert 0 < value <= verifier.sandbox.limits.max_procs


def test_fork_bomb_is_contained_and_cleaned_up(verifier: CodeVerifier) -> None:
    uid = verifier.sandbox.uid
    baseline = set(processes_of_uid(uid))
    host_procs_before = len([p for p in os.listdir("/proc") if p.isdigit()])
    bomb = (
        "import os\ndef square(x):\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass"
    )
    start = time.monotonic()
    score = verifier(f"```python\n{bomb}\n```", tests=["assert square(2) == 4"])
    elapsed = time.monotonic() - start
    assert score == 0.0 and score.cases[0].status == "timeout"
    assert elapsed < TIMEOUT + 5
    assert wait_for_no_processes(uid, baseline) == set()
    assert len([p for p in os.listdir("/proc") if p.isdigit()]) < host_procs_before + 10


def test_memory_bomb_hits_rlimit_as(verifier: CodeVerifier) -> None:
    # Anonymous mappings count against RLIMIT_AS without touching pages, so the probe is fast.
    program = """
import mmap
def probe():
    try:
        block = bytearray(2 << 30)
        return "allocated"
    except MemoryError:
        pass
    hoard = []
    try:
        while True:
            hoard.append(mmap.mmap(-1, 16 << 20))
    except OSError:
        return len(hoard) * 16
"""
    value, _, _ = observe(verifier, program)
    assert isinstance(value, int) and value <= verifier.sandbox.limits.memory_mb
    uncaught = "def square(x):\n    return len(bytearray(8 << 30))"
    assert verifier(f"```python\n{uncaught}\n```", tests=["assert square(2) == 4"]).cases[0].status == "error"


def test_infinite_loop_is_killed_with_its_process_group(verifier: CodeVerifier) -> None:
    uid = verifier.sandbox.uid
    baseline = set(processes_of_uid(uid))
    program = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\nwhile True:\n    pass"
    start = time.monotonic()
    score = verifier(f"```python\n{program}\n```", tests=[{"input": "", "output": "1"}])
    assert score == 0.0 and score.cases[0].status == "timeout"
    assert time.monotonic() - start < TIMEOUT + 5
    assert wait_for_no_processes(uid, baseline) == set()


def test_output_flood_is_capped(verifier: CodeVerifier) -> None:
    cap = verifier.sandbox.limits.max_output_bytes
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    start = time.monotonic()
    score = verifier(f"```python\n{flood}\n```", tests=[{"input": "", "output": "x"}])
    assert score == 0.0 and score.cases[0].status == "output_limit"
    assert len(score.cases[0].stdout) <= cap
    assert time.monotonic() - start < TIMEOUT + 5


def test_host_reader_caps_a_flooding_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys\nwhile True: sys.stdout.buffer.write(b'y' * 65536)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    out, err, how = read_capped(
        proc, b"", out_cap=100_000, err_cap=1000, deadline=time.monotonic() + 10, kill=proc.kill
    )
    proc.wait()
    assert how == "output_limit" and len(out) <= 100_000


def test_each_run_gets_a_fresh_tmpfs(verifier: CodeVerifier) -> None:
    program = """
import os
def probe():
    before = os.path.exists("/tmp/left-behind")
    open("/tmp/left-behind", "w").write("x")
    return before
"""
    assert observe(verifier, program)[0] is False
    assert observe(verifier, program)[0] is False


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_procs"):
        SandboxLimits(max_procs=2)
    with pytest.raises(ValueError, match="backend"):
        Sandbox("docker")
