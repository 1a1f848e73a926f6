"""Run untrusted Python in a bubblewrap sandbox and get back a report the program cannot forge.

One `Sandbox.run(job, timeout)` is one bwrap launch:

    host (trusted)                          sandbox (bwrap: new user/pid/net/ipc/uts/cgroup namespaces)
    Popen(bwrap, user=65534) ----------->   pid 1: bwrap's init
      stdin : the job as JSON                 supervisor (_harness.py; never runs model code)
      fd N  : a pipe holding a fresh nonce      forks one child per program run (the untrusted part)
      stdout: NONCE + report JSON + NONCE   <- written by the supervisor after every child is dead

Isolation, and why each piece is there (see /work/shared/reference/verifiers.md §2.7):
- The launcher drops root to `uid`/`gid` (default 65534, no supplementary groups) *before* bwrap, through
  Popen's `user=`/`group=`/`extra_groups=` (no preexec_fn, so launching from a thread pool is safe). As root,
  the kernel exempts the processes from RLIMIT_NPROC; as 65534, a sandbox escape is worth nothing.
- Unprivileged bwrap: `--unshare-all --unshare-user --disable-userns --cap-drop ALL`: no network (only a
  down loopback), no nested namespaces, no capabilities. Inside a user namespace RLIMIT_NPROC counts only
  that namespace's processes, so one sandbox's fork bomb cannot starve its neighbours of the shared uid.
- The filesystem is an empty root with read-only binds of /usr (+ the /bin, /lib* links or dirs) and, when it
  lives elsewhere, the Python installation prefix; a private size-capped tmpfs on /tmp is the only writable
  place; `--remount-ro /`. Nothing else of the host (no /root, /home, /etc, project or test files) exists.
- `--clearenv` plus a minimal environment; `--new-session` (no terminal injection); `--die-with-parent`.
- rlimits (address space, CPU, file size, open files, processes, no core files) are set by the supervisor
  on itself before forking, so every child inherits them and cannot raise the hard limits.
- Wall clock: the supervisor enforces per-case deadlines; the host enforces a backstop deadline by killing
  bwrap's process group, which (through --die-with-parent) tears down the whole pid namespace.
- Output: the host reads stdout/stderr through a capped reader and kills the sandbox at the cap.

The Python used inside: the host's base interpreter when its installation prefix is reachable by `uid`
(bound read-only at its own path); otherwise (e.g. a pyenv under a 0700 /root) the system interpreter of
the same minor version under /usr. Binding a path under an unreadable directory is impossible for an
unprivileged bwrap (it resolves the source as `uid`), and running bwrap as root would void the uid drop.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import marshal
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Backend = Literal["bwrap", "none"]

_HARNESS_SOURCE = (Path(__file__).with_name("_harness.py")).read_text(encoding="utf-8")
# Once the health probe has handed back the harness compiled by the sandbox's interpreter, launches send that
# code object ahead of the job on stdin and run this loader instead of compiling ~20 kB of source each time.
_BOOTSTRAP = """import marshal, os, sys
n = int(sys.argv[2])
b = b""
while len(b) < n:
    c = os.read(0, n - len(b))
    if not c:
        raise SystemExit("short harness")
    b += c
exec(marshal.loads(b))
"""
_STDERR_CAP = 64 * 1024
_STARTUP_SLACK_S = 5.0
_INSTALL_HINT = (
    "install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu; `make system-deps` does it), "
    "`dnf install bubblewrap` (Fedora), `pacman -S bubblewrap` (Arch). To run model code WITHOUT isolation "
    "(never on untrusted output), pass sandbox='none'."
)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (bubblewrap missing or not working); the message says how to fix it."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox run. Memory is RLIMIT_AS (virtual), per process."""

    memory_mb: int = 1024
    file_size_mb: int = 16
    tmpfs_mb: int = 64
    max_procs: int = 32
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20  # per case: captured stdout (stdio) or one encoded result (calls)
    max_total_output_bytes: int = 8 << 20  # per run, all cases together

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value}")
        if self.max_procs < 4:
            raise ValueError("SandboxLimits.max_procs must be at least 4 (init, supervisor, child, one spare)")


@dataclass(frozen=True)
class SandboxReport:
    """What came back from one run. `results` holds one dict per case (written by the supervisor); it is None
    when no valid report came back, and `error` then says why: "timeout", "output_limit", "no_report"."""

    results: list[dict[str, Any]] | None
    error: str | None
    returncode: int | None
    stderr: str
    stdout_bytes: int
    wall_s: float


def read_capped(
    proc: subprocess.Popen[bytes], stdin_data: bytes, *, out_cap: int, err_cap: int, deadline: float, kill: Any
) -> tuple[bytes, bytes, str]:
    """Feed `stdin_data`, read stdout and stderr until both close, never holding more than the caps.

    Returns (stdout, stderr, how) with how in {"exited", "timeout", "output_limit"}. stdout past `out_cap`
    means a flood: `kill()` is called at once. stderr past `err_cap` is read and discarded.
    """
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out: list[bytes] = []
    err: list[bytes] = []
    sizes = {"out": 0, "err": 0}
    pending = memoryview(stdin_data)
    how = "exited"
    with selectors.DefaultSelector() as sel:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                how = "timeout"
                kill()
                break
            for key, _ in sel.select(remaining):
                if key.data == "in":
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]) :]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                name = key.data
                room = (out_cap if name == "out" else err_cap) - sizes[name]
                if room > 0:
                    (out if name == "out" else err).append(data[:room])
                sizes[name] += len(data)
                if name == "out" and sizes[name] > out_cap:
                    how = "output_limit"
                    kill()
                    return b"".join(out)[:out_cap], b"".join(err), how
    return b"".join(out), b"".join(err), how


def _reachable(path: str, uid: int, gid: int) -> bool:
    """Whether `uid`/`gid` (no supplementary groups) can reach and read `path`, judged from mode bits."""
    if os.geteuid() == uid:
        return os.access(path, os.R_OK)
    parts = Path(path).resolve().parts
    for i in range(1, len(parts) + 1):
        st = os.stat(os.path.join(*parts[:i]))
        need = stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else stat.S_IROTH
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        if not (st.st_mode >> shift) & need:
            return False
    return True


def _python_for_sandbox(python: str | None, uid: int, gid: int) -> tuple[str, str | None]:
    """(interpreter path, installation prefix to bind or None when it is under /usr)."""
    if python is not None:
        exe = os.path.realpath(python)
        prefix = os.path.dirname(os.path.dirname(exe))
        if not _reachable(exe, uid, gid):
            raise SandboxUnavailable(
                f"python {python!r} is not readable by uid {uid}; make its prefix world-readable or pass another"
            )
    else:
        exe = os.path.realpath(sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
        if not exe.startswith(prefix + os.sep) or not _reachable(exe, uid, gid):
            version = f"python{sys.version_info.major}.{sys.version_info.minor}"
            fallback = next((p for p in (f"/usr/bin/{version}", "/usr/bin/python3") if os.path.exists(p)), None)
            if fallback is None:
                raise SandboxUnavailable(
                    f"the interpreter {exe} is not reachable by uid {uid} (a parent directory is not world-"
                    f"searchable) and there is no /usr/bin/{version}; install python3 from the system packages "
                    "or pass python=... pointing at a world-readable installation"
                )
            logger.info("code sandbox: %s is unreachable by uid %d; using the system %s", exe, uid, fallback)
            exe = os.path.realpath(fallback)
            prefix = "/usr"
    under_usr = prefix == "/usr" or prefix.startswith("/usr/")
    return exe, None if under_usr else prefix


def _bwrap_version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        return tuple(int(p) for p in out.split()[-1].split(".")[:3])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise SandboxUnavailable(f"{path} --version failed ({exc}); {_INSTALL_HINT}") from exc


def _root_links() -> list[str]:
    """bwrap args recreating /bin, /sbin and /lib* as on the host: symlinks into /usr or read-only binds."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{name}"
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    return args


_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",  # set iteration order, hence printed output, is the same on every run
    "PYTHONUTF8": "1",
    "PYTHONIOENCODING": "utf-8",
}


class Sandbox:
    """A configured launcher. Thread-safe: `run` keeps no state between calls, so a thread pool may call it
    concurrently (the work happens in child processes).

    `backend="none"` runs the same supervisor as a plain subprocess (rlimits, timeout, uid drop, separate
    process, but full view of the host filesystem and network): an explicit opt-in for machines without user
    namespaces, logged as a warning.
    """

    def __init__(
        self,
        backend: Backend = "bwrap",
        *,
        bwrap_path: str = "bwrap",
        python: str | None = None,
        uid: int = 65534,
        gid: int = 65534,
        limits: SandboxLimits = SandboxLimits(),
        probe: bool = True,
    ) -> None:
        if backend not in ("bwrap", "none"):
            raise ValueError(f"sandbox backend must be 'bwrap' or 'none', got {backend!r}")
        self.backend = backend
        self.limits = limits
        self.is_root = os.geteuid() == 0
        # Only root can switch uid; anyone else runs as themselves (still unprivileged).
        self.uid, self.gid = (uid, gid) if self.is_root else (os.geteuid(), os.getegid())
        self.bwrap = None
        self.bwrap_version: tuple[int, ...] = ()
        if backend == "bwrap":
            self.bwrap = shutil.which(bwrap_path)
            if self.bwrap is None:
                raise SandboxUnavailable(f"bubblewrap not found (looked for {bwrap_path!r}); {_INSTALL_HINT}")
            self.bwrap_version = _bwrap_version(self.bwrap)
            if self.bwrap_version < (0, 8):
                logger.warning(
                    "bubblewrap %s < 0.8: nested user namespaces stay possible inside the sandbox", self.bwrap_version
                )
        else:
            logger.warning(
                "code sandbox DISABLED (sandbox='none'): model-generated code runs with only rlimits, a timeout "
                "and uid %d; it can read the host filesystem and use the network. Never use this on untrusted output.",
                self.uid,
            )
        self.python, self.python_prefix = _python_for_sandbox(python, self.uid, self.gid)
        self._harness_code: bytes | None = None
        if probe:
            self._probe()

    # ------------------------------------------------------------------ launching

    def _bwrap_argv(self, nonce_fd: int) -> list[str]:
        assert self.bwrap is not None
        modern = self.bwrap_version >= (0, 8)  # --disable-userns and --size exist from 0.8 / 0.6 on
        argv = [
            self.bwrap,
            "--unshare-all", "--unshare-user", *(["--disable-userns"] if modern else []), "--cap-drop", "ALL",
            "--die-with-parent", "--new-session",
            "--uid", "65534", "--gid", "65534", "--hostname", "sandbox",
            "--clearenv",
        ]  # fmt: skip
        for key, value in _ENV.items():
            argv += ["--setenv", key, value]
        argv += ["--ro-bind", "/usr", "/usr", *_root_links()]
        if self.python_prefix is not None:
            argv += ["--ro-bind", self.python_prefix, self.python_prefix]
        argv += [
            "--proc", "/proc", "--dev", "/dev",
            *(["--size", str(self.limits.tmpfs_mb << 20)] if modern else []), "--tmpfs", "/tmp",
            "--remount-ro", "/", "--chdir", "/tmp",
            "--", *self._python_argv(nonce_fd),
        ]  # fmt: skip
        return argv

    def _python_argv(self, nonce_fd: int) -> list[str]:
        # -s -S: no user or site packages; -B: no .pyc writes. Not -I/-E: those would drop PYTHONHASHSEED.
        if self._harness_code is None:
            return [self.python, "-s", "-S", "-B", "-c", _HARNESS_SOURCE, str(nonce_fd)]
        return [self.python, "-s", "-S", "-B", "-c", _BOOTSTRAP, str(nonce_fd), str(len(self._harness_code))]

    def _job_payload(self, job: Mapping[str, Any], timeout: float, n_cases: int) -> bytes:
        lim = self.limits
        cpu_seconds = int(self._backstop(timeout, n_cases)) + 1
        payload = dict(job)
        payload.update(
            timeout=timeout,
            pid_namespace=self.backend == "bwrap",
            max_output_bytes=lim.max_output_bytes,
            max_total_output_bytes=lim.max_total_output_bytes,
            limits={
                "memory_bytes": lim.memory_mb << 20,
                "file_size_bytes": lim.file_size_mb << 20,
                "max_open_files": lim.max_open_files,
                "max_procs": lim.max_procs,
                "cpu_seconds": cpu_seconds,
            },
        )
        # marshal: the in-sandbox supervisor reads it without importing json (see _harness.py).
        return marshal.dumps(payload, 4)

    @staticmethod
    def _backstop(timeout: float, n_cases: int) -> float:
        # Call mode may re-run the module once per failing case: at most (2n + 1) per-case deadlines.
        return timeout * (2 * n_cases + 1) + _STARTUP_SLACK_S

    def run(self, job: Mapping[str, Any], timeout: float) -> SandboxReport:
        """Run one job (keys: mode "stdio"|"call", program, cases, fail_fast) with a per-case `timeout`."""
        n_cases = len(job["cases"])
        payload = self._job_payload(job, timeout, n_cases)
        if self._harness_code is not None:
            payload = self._harness_code + payload
        nonce = secrets.token_hex(16).encode("ascii")
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        workdir = None
        try:
            if self.backend == "bwrap":
                argv, cwd, env = self._bwrap_argv(nonce_r), "/", {}
            else:
                workdir = tempfile.mkdtemp(prefix="posttrain-code-")
                if self.is_root:
                    os.chown(workdir, self.uid, self.gid)
                argv, cwd, env = self._python_argv(nonce_r), workdir, dict(_ENV, HOME=workdir, TMPDIR=workdir)
            start = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(nonce_r,),
                cwd=cwd,
                env=env,
                start_new_session=True,
                **({"user": self.uid, "group": self.gid, "extra_groups": []} if self.is_root else {}),
            )
        finally:
            os.close(nonce_r)
        try:
            out_cap = self._report_cap(n_cases)
            deadline = start + self._backstop(timeout, n_cases)
            out, err, how = read_capped(
                proc, payload, out_cap=out_cap, err_cap=_STDERR_CAP, deadline=deadline, kill=lambda: self._kill(proc)
            )
            try:
                returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(proc)
                returncode = proc.wait()
                how = "timeout"
        finally:
            if proc.returncode is None:
                self._kill(proc)
                proc.wait()
            if self.backend == "none":
                self._kill(proc)  # stragglers of the session, if any
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        results, error = self._parse_report(out, nonce, n_cases) if how == "exited" else (None, how)
        return SandboxReport(
            results=results,
            error=error,
            returncode=returncode,
            stderr=err.decode("utf-8", "replace"),
            stdout_bytes=len(out),
            wall_s=time.monotonic() - start,
        )

    def _report_cap(self, n_cases: int) -> int:
        # stdout travels base64-encoded (4/3); each case also carries two small, JSON-escaped stderr tails.
        lim = self.limits
        return (lim.max_total_output_bytes * 4) // 3 + n_cases * (6 * 2 * 4096 + 1024) + 65536

    @staticmethod
    def _parse_report(out: bytes, nonce: bytes, n_cases: int) -> tuple[list[dict[str, Any]] | None, str | None]:
        """Accept exactly NONCE + JSON + NONCE holding one result dict per case; anything else is no report."""
        n = len(nonce)
        if len(out) < 2 * n or out[:n] != nonce or out[-n:] != nonce:
            return None, "no_report"
        try:
            body = json.loads(out[n:-n])
        except (ValueError, RecursionError):
            return None, "no_report"
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != n_cases or not all(isinstance(r, dict) for r in results):
            return None, "no_report"
        return [_decode_fields(r) for r in results], None

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill the launch's whole session. With bwrap, killing the outer bwrap makes the kernel kill the
        sandbox's pid 1 (--die-with-parent) and with it every process of the pid namespace."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.backend == "none":
            kill_session(proc.pid)

    # ------------------------------------------------------------------ health check

    def _probe(self) -> None:
        compiled = self.run({"mode": "compile", "source": _HARNESS_SOURCE, "cases": [None]}, timeout=10.0)
        if compiled.results is not None and compiled.results[0].get("status") == "ok":
            self._harness_code = compiled.results[0]["value"]
        job = {"mode": "stdio", "program": "print(input()[::-1])", "cases": ["ok"], "fail_fast": True}
        report = self.run(job, timeout=10.0)
        ok = (
            report.results is not None
            and report.results[0].get("status") == "ok"
            and report.results[0].get("stdout") == b"ko\n"
        )
        if not ok:
            detail = report.stderr.strip() or report.error or repr(report.results)
            hint = _INSTALL_HINT if self.backend == "bwrap" else ""
            raise SandboxUnavailable(
                f"the {self.backend!r} code sandbox does not work on this machine: {detail[-2000:]}. "
                "bwrap needs unprivileged user namespaces (sysctl user.max_user_namespaces > 0; on Ubuntu also "
                f"kernel.apparmor_restrict_unprivileged_userns=0). {hint}"
            )


_TEXT_FIELDS = ("stderr", "error")
_BYTES_FIELDS = ("stdout", "value")


def _decode_fields(result: dict[str, Any]) -> dict[str, Any]:
    """Undo the supervisor's base64: `stdout` and `value` (tagged JSON text in call mode) become bytes,
    `stderr` and `error` str. A field that does not decode turns the case into status "bad_result"."""
    out = dict(result)
    try:
        for key in _BYTES_FIELDS:
            if key in out:
                out[key] = base64.b64decode(out[key], validate=True)
        for key in _TEXT_FIELDS:
            if key in out:
                out[key] = base64.b64decode(out[key], validate=True).decode("utf-8", "replace")
    except (TypeError, ValueError, binascii.Error):
        return {"status": "bad_result"}
    return out


def kill_session(sid: int) -> int:
    """SIGKILL every process whose session id is `sid` (how sandbox='none' finds grandchildren); returns
    how many were signalled. Processes that called setsid() themselves escape: that backend isolates nothing."""
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def processes_of_uid(uid: int) -> list[int]:
    """Pids whose real uid is `uid` (tests use it to check that nothing outlives a sandbox)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids
