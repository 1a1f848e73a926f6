"""The driver that runs *inside* the code sandbox as `python -c <this file's text> NONCE_FD`. Stdlib only,
Python >= 3.8, nothing from posttrain (the sandbox sees none of the project). It imports only builtin or
tiny C modules (no json, signal, types, ctypes packages: those pull in re/enum and cost ~15 ms a launch).

Trust layout (sandbox.py has the outside half):

  supervisor (this process)  never executes model code. Reads the job (marshal, written by the trusted host)
                             from stdin, sets the rlimits, makes itself non-dumpable (so same-uid processes can
                             neither ptrace it nor open its /proc/<pid>/fd or /proc/<pid>/mem), then forks a
                             child per program run.
  child                      fresh fds 0/1/2 (stdin from a memfd, stdout/stderr to capped pipes) and, in call
                             mode, fd 3 for results; every other fd is closed before the model's code runs.
                             Untrusted from then on.

Only data crosses back: captured bytes (stdio mode) or tagged JSON values (call mode), which the supervisor
never parses; it relays them base64-encoded. No verdict is computed in here and the expected outputs never
enter the sandbox, so a child that forges its pipe can only claim values it could have returned honestly.
After every child is dead (kill(-1) in the sandbox's pid namespace), the supervisor reads the per-run nonce
from NONCE_FD and writes NONCE + report JSON + NONCE on fd 1; the host rejects anything else there.

Child -> supervisor frames on fd 3: b"<K> <index> <length>\\n" + payload, K in
  R ready (module executed)   M module error (text)   O ok (tagged JSON value)   E case error (text).
"""

import sys

# `python -c` puts the (writable) working directory first on sys.path; nothing is imported from there.
sys.path[:] = [p for p in sys.path if p not in ("", ".")]

import _signal  # noqa: E402
import binascii  # noqa: E402
import builtins  # noqa: E402
import marshal  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import time  # noqa: E402

_READ = 65536
_STDERR_CAP = 4096
_HEADER_CAP = 64
_MAX_DEPTH = 100
_ModuleType = type(sys)


# ---------------------------------------------------------------- value encoding (child side)


def encode(value, depth=0):
    """A return value as tagged JSON text `["tag", payload]`, built without the json module. Exact types
    only (`type(x) is int`): subclasses, e.g. an int whose `__eq__` always returns True, are refused, and no
    method of the value's own class is called. Strings travel as UTF-8 hex, so nothing needs escaping."""
    if depth > _MAX_DEPTH:
        raise TypeError("result nested too deeply")
    t = type(value)
    if value is None:
        return '["none",null]'
    if t is bool:
        return '["bool",true]' if value else '["bool",false]'
    if t is int:
        return '["int","' + int.__format__(value, "x") + '"]'  # hex: linear time, no digit limit
    if t is float:
        return '["float","' + float.__repr__(value) + '"]'
    if t is complex:
        return '["complex",["' + float.__repr__(value.real) + '","' + float.__repr__(value.imag) + '"]]'
    if t is str:
        return '["str","' + str.encode(value, "utf-8", "surrogatepass").hex() + '"]'
    if t is bytes:
        return '["bytes","' + bytes.hex(value) + '"]'
    if t is list or t is tuple or t is set or t is frozenset:
        return '["' + t.__name__ + '",[' + ",".join([encode(v, depth + 1) for v in value]) + "]]"
    if t is dict:
        items = [("[" + encode(k, depth + 1) + "," + encode(v, depth + 1) + "]") for k, v in dict.items(value)]
        return '["dict",[' + ",".join(items) + "]]"
    raise TypeError("unserializable result of type " + t.__name__)


# ---------------------------------------------------------------- report encoding (supervisor side)


def _b64(data):
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _report_json(results):
    """Hand-written JSON: every string is a fixed status name or base64, every number an int."""
    parts = []
    for result in results:
        fields = []
        for key, value in result.items():
            if type(value) is int:
                fields.append('"%s":%d' % (key, value))
            else:
                fields.append('"%s":"%s"' % (key, value))
        parts.append("{" + ",".join(fields) + "}")
    return '{"results":[' + ",".join(parts) + "]}"


# ---------------------------------------------------------------- supervisor helpers


def _exit_code(status):
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return -1


def _set_limits(limits, pid_namespace):
    nproc = limits["max_procs"]
    if not pid_namespace:
        # Without a user namespace RLIMIT_NPROC counts every process of this uid on the host.
        nproc += _count_own_processes()
    # RLIMIT_FSIZE is set in each child only (_child_limits): the supervisor writes stdin memfds of any size.
    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_NOFILE", limits["max_open_files"]),
        ("RLIMIT_NPROC", nproc),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_CPU", limits["cpu_seconds"]),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def _count_own_processes():
    uid = str(os.getuid())
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/" + entry + "/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            n += line.split()[1] == uid
                            break
            except OSError:
                pass
    return n


def _child_limits(cpu_seconds, file_size_bytes):
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_bytes, file_size_bytes))


def _make_undumpable():
    """prctl(PR_SET_DUMPABLE, 0) through the bare _ctypes module (the ctypes package costs ~5 ms)."""
    import _ctypes  # noqa: PLC0415 - runs in the sandbox, where each import costs launch time

    prctl = _ctypes.dlsym(_ctypes.dlopen(None, 0), "prctl")
    PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
    _ctypes.call_function(prctl, (PR_SET_DUMPABLE, 0, 0, 0, 0))
    if _ctypes.call_function(prctl, (PR_GET_DUMPABLE, 0, 0, 0, 0)) != 0:
        raise OSError("prctl(PR_SET_DUMPABLE, 0) did not take effect")


class Stopped(Exception):
    pass


class Run:
    """One forked child and the pipes the supervisor reads from it."""

    def __init__(self, pid, streams, pid_namespace):
        self.pid = pid
        self.streams = dict(streams)  # fd -> handler(bytes); a handler raises Stopped to end the run
        self.pid_namespace = pid_namespace
        self.status = None
        self.pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError:
                self.pidfd = None

    def _reap(self, block):
        if self.status is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.status = status
        return self.status is not None

    def pump(self, deadline):
        """Read the child's pipes until it has exited and they are drained ("exited"), the deadline passes
        ("timeout") or a handler stops the run ("stopped"). `deadline` is a one-element list that handlers
        may move forward."""
        while True:
            if self.status is not None and not self.streams:
                return "exited"
            remaining = deadline[0] - time.monotonic()
            if remaining <= 0:
                return "timeout"
            watch = list(self.streams)
            if self.status is None and self.pidfd is not None:
                watch.append(self.pidfd)
            timeout = remaining if self.pidfd is not None or self.status is not None else min(remaining, 0.01)
            ready, _, _ = select.select(watch, [], [], timeout)
            if self.status is None and (self.pidfd is None or self.pidfd in ready):
                if self._reap(block=False):
                    # Descendants may still hold the pipes open; they die now so the pipes reach EOF.
                    self.kill_all()
            for fd in ready:
                if fd not in self.streams:
                    continue
                data = os.read(fd, _READ)
                if not data:
                    os.close(fd)
                    del self.streams[fd]
                    continue
                try:
                    self.streams[fd](data)
                except Stopped:
                    return "stopped"

    def kill_all(self):
        if self.pid_namespace:
            # Inside the sandbox's pid namespace this reaches every process but pid 1 and ourselves.
            try:
                os.kill(-1, _signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for kill, target in ((os.killpg, self.pid), (os.kill, self.pid)):
                try:
                    kill(target, _signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def finish(self):
        """Kill whatever is left, reap the child, close the pipes; return the child's exit code."""
        self.kill_all()
        self._reap(block=True)
        for fd in self.streams:
            os.close(fd)
        self.streams = {}
        if self.pidfd is not None:
            os.close(self.pidfd)
        return _exit_code(self.status)


class Capped:
    """Keep the first `cap` bytes; past it, call `on_overflow` (which may raise Stopped)."""

    def __init__(self, cap, on_overflow=None):
        self.cap = cap
        self.parts = []
        self.size = 0
        self.overflow = False
        self.on_overflow = on_overflow

    def __call__(self, data):
        room = self.cap - self.size
        if room > 0:
            self.parts.append(data[:room])
            self.size += min(room, len(data))
        if len(data) > room:
            self.overflow = True
            if self.on_overflow is not None:
                self.on_overflow()

    def value(self):
        return b"".join(self.parts)


def _stop():
    raise Stopped()


def _spawn(child_main, stdin_bytes, result_pipe, pid_namespace):
    """Fork a child: stdin from a memfd holding `stdin_bytes`, stdout/stderr on new pipes and, when
    `result_pipe`, fd 3 as the write end of one more pipe."""
    in_fd = os.memfd_create("stdin", 0)
    view = memoryview(stdin_bytes)
    while view:
        view = view[os.write(in_fd, view) :]
    os.lseek(in_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res_r, res_w = os.pipe() if result_pipe else (None, None)
    pid = os.fork()
    if pid == 0:
        try:
            _child_fds(in_fd, out_w, err_w, res_w)
            child_main()
        finally:
            os._exit(70)
    for fd in (in_fd, out_w, err_w, res_w):
        if fd is not None:
            os.close(fd)
    return pid, out_r, err_r, res_r


def _child_fds(in_fd, out_w, err_w, res_w):
    os.setpgid(0, 0)
    os.dup2(in_fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    keep = 2
    if res_w is not None:
        os.dup2(res_w, 3)
        keep = 3
    os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # the nonce fd among them
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # programs may print huge integers


def _fresh_module(name):
    module = _ModuleType(name)
    module.__builtins__ = builtins
    sys.modules[name] = module
    return module


def _describe(exc):
    return (type(exc).__name__ + ": " + str(exc))[:500]


# ---------------------------------------------------------------- stdio mode


def _stdio_child(program, cpu_seconds, file_size_bytes):
    def main():
        _child_limits(cpu_seconds, file_size_bytes)
        out = sys.stdout
        code = 0
        try:
            exec(compile(program, "<solution>", "exec"), _fresh_module("__main__").__dict__)
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code & 0xFF
            else:
                sys.stderr.write(str(exc.code) + "\n")
                code = 1
        except BaseException:
            import traceback  # noqa: PLC0415 - runs in the sandbox, where each import costs launch time

            traceback.print_exc()
            code = 1
        for stream in (out, sys.stdout):
            try:
                stream.flush()
            except BaseException:
                code = code or 1
        try:
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)

    return main


def run_stdio(job, budget, pid_namespace):
    results = []
    cap = job["max_output_bytes"]
    cpu = int(job["timeout"]) + 1
    cases = job["cases"]
    for i, text in enumerate(cases):
        if budget[0] <= 0 or (job["fail_fast"] and results and not _stdio_ok(results[-1])):
            results.extend({"status": "skipped"} for _ in range(len(cases) - i))
            break
        child = _stdio_child(job["program"], cpu, job["limits"]["file_size_bytes"])
        pid, out_r, err_r, _ = _spawn(child, text.encode("utf-8"), False, pid_namespace)
        out = Capped(min(cap, budget[0]), _stop)
        err = Capped(_STDERR_CAP)
        run = Run(pid, {out_r: out, err_r: err}, pid_namespace)
        how = run.pump([time.monotonic() + job["timeout"]])
        code = run.finish()
        budget[0] -= out.size
        status = {"exited": "ok", "timeout": "timeout", "stopped": "output_limit"}[how]
        results.append({"status": status, "exit": code, "stdout": _b64(out.value()), "stderr": _b64(err.value())})
    return results


def _stdio_ok(result):
    return result["status"] == "ok" and result["exit"] == 0


# ---------------------------------------------------------------- call mode


def _call_child(job, start, cpu_seconds):
    # Bind what the reporting path needs before the model's code can monkeypatch modules or builtins.
    write, encode_, describe, resolve = os.write, encode, _describe, _resolve
    BaseException_, SystemExit_, compile_, eval_, exec_, repr_ = BaseException, SystemExit, compile, eval, exec, repr

    def emit(kind, index, payload):
        data = (kind + " " + str(index) + " " + str(len(payload)) + "\n").encode("ascii") + payload
        while data:
            data = data[write(3, data) :]

    def main():
        _child_limits(cpu_seconds, job["limits"]["file_size_bytes"])
        module = _fresh_module("solution")
        try:
            exec_(compile_(job["program"], "<solution>", "exec"), module.__dict__)
        except SystemExit_ as exc:
            emit("M", 0, ("SystemExit: " + repr_(exc.code)[:200]).encode("utf-8", "replace"))
            os._exit(0)
        except BaseException_ as exc:
            emit("M", 0, describe(exc).encode("utf-8", "replace"))
            os._exit(0)
        emit("R", 0, b"")
        namespace = module.__dict__
        cases = job["cases"]
        for index in range(start, len(cases)):
            case = cases[index]
            try:
                if case["kind"] == "call":
                    value = resolve(namespace, case["fn"])(*case["args"])
                else:
                    value = eval_(compile_(case["expr"], "<test>", "eval"), namespace)
                kind, payload = "O", encode_(value).encode("ascii")
            except SystemExit_ as exc:
                kind, payload = "E", ("SystemExit: " + repr_(exc.code)[:200]).encode("utf-8", "replace")
            except BaseException_ as exc:
                kind, payload = "E", describe(exc).encode("utf-8", "replace")
            emit(kind, index, payload)
        os._exit(0)

    return main


def _resolve(namespace, name):
    fn = namespace.get(name)
    if fn is None and isinstance(namespace.get("Solution"), type):
        fn = getattr(namespace["Solution"](), name)  # LeetCode style: `class Solution: def name(self, ...)`
    if fn is None:
        raise NameError("the program defines no function " + repr(name))
    return fn


class _Frames:
    """Parse the child's frames strictly: R (or M) first, then O/E frames with consecutive indices.
    Payloads are kept as opaque bytes. Anything else stops the run as a protocol error."""

    def __init__(self, start, results, deadline, timeout, frame_cap, total_cap):
        self.next = start
        self.results = results
        self.deadline = deadline
        self.timeout = timeout
        self.frame_cap = frame_cap
        self.total_cap = total_cap
        self.total = 0
        self.buffer = b""
        self.ready = False
        self.module_error = None
        self.protocol_error = None

    def __call__(self, data):
        self.total += len(data)
        if self.total > self.total_cap:
            self._output_limit()
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n", 0, _HEADER_CAP)
            if end < 0:
                if len(self.buffer) >= _HEADER_CAP:
                    self._fail("bad frame header")
                return
            fields = self.buffer[:end].split(b" ")
            well_formed = len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit()
            if not well_formed or fields[0] not in (b"R", b"M", b"O", b"E"):
                self._fail("bad frame header")
            kind, index, length = fields[0].decode(), int(fields[1]), int(fields[2])
            if length > self.frame_cap:
                self._output_limit()
            if len(self.buffer) < end + 1 + length:
                return
            payload = self.buffer[end + 1 : end + 1 + length]
            self.buffer = self.buffer[end + 1 + length :]
            self._frame(kind, index, payload)

    def _output_limit(self):
        if self.ready and self.next < len(self.results):
            self.results[self.next] = {"status": "output_limit"}
            self.next += 1
            raise Stopped()
        self._fail("result stream over its size limit")

    def _fail(self, why):
        self.protocol_error = why
        raise Stopped()

    def _frame(self, kind, index, payload):
        if not self.ready:
            if kind == "R" and not payload:
                self.ready = True
                self.deadline[0] = time.monotonic() + self.timeout
                return
            if kind == "M":
                self.module_error = payload[:500]
                raise Stopped()
            self._fail("expected the ready frame")
        if kind not in ("O", "E") or index != self.next or index >= len(self.results):
            self._fail("unexpected frame")
        if kind == "O":
            self.results[index] = {"status": "ok", "value": _b64(payload)}
        else:
            self.results[index] = {"status": "error", "error": _b64(payload[:500])}
        self.next += 1
        self.deadline[0] = time.monotonic() + self.timeout


def run_calls(job, budget, pid_namespace):
    n = len(job["cases"])
    results = [None] * n
    start = 0
    while start < n and budget[0] > 0:
        cpu = int(job["timeout"] * (n - start + 1)) + 1
        pid, out_r, err_r, res_r = _spawn(_call_child(job, start, cpu), b"", True, pid_namespace)
        deadline = [time.monotonic() + job["timeout"]]
        frames = _Frames(start, results, deadline, job["timeout"], job["max_output_bytes"], budget[0])
        out, err = Capped(_STDERR_CAP), Capped(_STDERR_CAP)
        run = Run(pid, {res_r: frames, out_r: out, err_r: err}, pid_namespace)
        how = run.pump(deadline)
        code = run.finish()
        budget[0] -= frames.total
        stderr = _b64(err.value())
        if frames.module_error is not None or frames.protocol_error is not None or not frames.ready:
            if frames.module_error is not None:
                why = {"status": "module_error", "error": _b64(frames.module_error)}
            elif frames.protocol_error is not None:
                why = {"status": "protocol_error", "error": _b64(frames.protocol_error.encode())}
            else:
                why = {"status": "timeout" if how == "timeout" else "exited", "exit": code}
            why["stderr"] = stderr
            for i in range(frames.next, n):
                results[i] = dict(why)
            break
        if frames.next < n and results[frames.next] is None:
            # The child died or hung during this case: the case fails, the rest run in a fresh child.
            results[frames.next] = {
                "status": "timeout" if how == "timeout" else "exited",
                "exit": code,
                "stderr": stderr,
            }
            frames.next += 1
        start = frames.next
        if job["fail_fast"] and any(r is not None and r["status"] != "ok" for r in results):
            break
    return [r if r is not None else {"status": "skipped"} for r in results]


# ---------------------------------------------------------------- entry point


def _read_all(fd):
    parts = []
    while True:
        data = os.read(fd, _READ)
        if not data:
            return b"".join(parts)
        parts.append(data)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main():
    nonce_fd = int(sys.argv[1])
    job = marshal.loads(_read_all(0))  # written by the trusted host
    if job["mode"] == "compile":
        # Health probe: also hand back this file compiled by the sandbox's own interpreter, so later launches
        # skip compiling it (sandbox.py BOOTSTRAP). Only trusted code has run in this sandbox.
        code = marshal.dumps(compile(job["source"], "<posttrain-harness>", "exec"))
        nonce = _read_all(nonce_fd)
        _write_all(1, nonce + _report_json([{"status": "ok", "value": _b64(code)}]).encode("ascii") + nonce)
        os._exit(0)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    pid_namespace = job["pid_namespace"]
    _set_limits(job["limits"], pid_namespace)
    _make_undumpable()
    budget = [job["max_total_output_bytes"]]
    if job["mode"] == "stdio":
        results = run_stdio(job, budget, pid_namespace)
    else:
        results = run_calls(job, budget, pid_namespace)
    # Every child is dead (Run.finish killed and reaped them): only now is the nonce read.
    nonce = _read_all(nonce_fd)
    os.close(nonce_fd)
    _write_all(1, nonce + _report_json(results).encode("ascii") + nonce)
    os._exit(0)  # skip interpreter teardown: nothing is left to flush


if __name__ == "__main__":
    main()
