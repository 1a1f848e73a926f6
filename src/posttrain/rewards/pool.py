"""A process pool whose per-task timeout really kills.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot cancel a running task, and killing one of its
workers breaks the whole executor. math-verify's own timeout is SIGALRM-based, which cannot interrupt
long C-level work (big-integer powers inside sympy) and does not work off the main thread at all
(reference/verifiers.md §1.2). So each worker here has its own pipe; the parent tracks a deadline per busy
worker, SIGKILLs a worker that passes it, records a "timeout" outcome for that task and starts a fresh
worker in its place. The other workers keep going.

Workers are started with the "spawn" method by default: the trainer process usually holds torch threads
(and maybe CUDA), which "fork" copies unsafely.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

Status = Literal["ok", "timeout", "crashed"]


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one task. `value` is the function's return value when status is "ok"."""

    status: Status
    value: Any = None
    seconds: float = 0.0


class WorkerTaskError(RuntimeError):
    """The task function raised inside a worker; the message carries the worker's traceback."""


def default_workers() -> int:
    """Auto size: one worker per core this process may run on, at most 8 (checks are short and the
    trainer needs CPU too)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _limit_memory(memory_limit_mb: int | None) -> None:
    if memory_limit_mb is None:
        return
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(conn: Connection, initializer: Callable[[], None] | None, memory_limit_mb: int | None) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what to do, the workers just get killed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(memory_limit_mb)
    if initializer is not None:
        initializer()
    try:
        conn.send(("ready", "ok", None))
        while True:
            message = conn.recv()
            if message is None:
                return
            task_id, fn, args = message
            try:
                result = fn(*args)
            except BaseException:  # forwarded to the parent, which raises it: nothing is swallowed
                conn.send((task_id, "error", traceback.format_exc()))
            else:
                conn.send((task_id, "ok", result))
    except (EOFError, OSError):
        # The parent went away or dropped its end (a closed pipe with unread data resets the connection):
        # nobody is left to answer, so the worker ends quietly instead of printing a traceback.
        return


@dataclass
class _Worker:
    process: Any
    conn: Connection
    state: Literal["starting", "idle", "busy"]
    started_at: float
    task: int = -1
    deadline: float = math.inf
    dispatched_at: float = 0.0


class WorkerPool:
    """`size` worker processes; `run(fn, args_list)` maps `fn` over the argument tuples with a hard
    per-task timeout and returns outcomes in input order.

    `fn` and `initializer` must be module-level functions (they are pickled by reference). An exception
    raised by `fn` is re-raised in the parent as `WorkerTaskError` with the row index and the remote
    traceback. A timed-out task and a task whose worker died (segfault, out of memory) are outcomes, not
    exceptions: the caller scores them.
    """

    def __init__(
        self,
        size: int,
        *,
        timeout: float,
        initializer: Callable[[], None] | None = None,
        start_method: str = "spawn",
        memory_limit_mb: int | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.size = size
        self.timeout = float(timeout)
        self.startup_timeout = startup_timeout
        self._initializer = initializer
        self._memory_limit_mb = memory_limit_mb
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0  # workers killed for a timeout or found dead, then replaced
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._initializer, self._memory_limit_mb),
            daemon=True,  # dies with the trainer even if close() is never called
            name="posttrain-verifier",
        )
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn, state="starting", started_at=time.monotonic())

    def _kill(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()

    def _replace(self, worker: _Worker) -> _Worker:
        self._kill(worker)
        self.restarts += 1
        fresh = self._spawn()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def start(self) -> None:
        """Start the workers now (otherwise the first `run` does). Does not wait for them to be ready."""
        if self._closed:
            raise RuntimeError("pool is closed")
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

    def close(self) -> None:
        """Stop all workers: idle ones are asked to exit, busy or stuck ones are killed."""
        self._closed = True
        for worker in self._workers:
            if worker.state == "idle":
                try:
                    worker.conn.send(None)
                    worker.process.join(timeout=1)
                except (BrokenPipeError, OSError):
                    pass  # already gone; the kill below is a no-op then
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join(timeout=5)
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running --------------------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[TaskOutcome]:
        with self._lock:  # one batch at a time; callers from several threads queue here
            self.start()
            try:
                return self._run(fn, args_list)
            except BaseException:
                # A task raised (or the caller was interrupted) mid-batch: the busy workers would later
                # answer for tasks of this abandoned batch, so they are replaced before anything else runs.
                for worker in list(self._workers):
                    if worker.state == "busy":
                        self._replace(worker)
                raise

    def _run(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[TaskOutcome]:
        outcomes: list[TaskOutcome | None] = [None] * len(args_list)
        queue: deque[int] = deque(range(len(args_list)))
        remaining = len(args_list)
        while remaining:
            self._dispatch(fn, args_list, queue)
            now = time.monotonic()
            deadlines = [w.deadline for w in self._workers if w.state == "busy"]
            wait_for = max(0.0, min(deadlines) - now) if deadlines else 1.0
            ready = wait([w.conn for w in self._workers], timeout=wait_for)
            for conn in ready:
                worker = next((w for w in self._workers if w.conn is conn), None)
                if worker is None:  # replaced earlier in this round
                    continue
                remaining -= self._receive(worker, outcomes, queue)
            remaining -= self._enforce_deadlines(outcomes)
        return [o for o in outcomes if o is not None]

    def _dispatch(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]], queue: deque[int]) -> None:
        for worker in self._workers:
            if not queue:
                return
            if worker.state != "idle":
                continue
            index = queue.popleft()
            try:
                worker.conn.send((index, fn, args_list[index]))
            except (BrokenPipeError, OSError):
                # Died while idle (e.g. killed from outside): requeue the task on a fresh worker.
                queue.appendleft(index)
                self._replace(worker)
                continue
            worker.state = "busy"
            worker.task = index
            worker.dispatched_at = time.monotonic()
            worker.deadline = worker.dispatched_at + self.timeout

    def _receive(self, worker: _Worker, outcomes: list[TaskOutcome | None], queue: deque[int]) -> int:
        """Handle one message (or EOF) from `worker`; return how many tasks it completed (0 or 1)."""
        try:
            task_id, status, payload = worker.conn.recv()
        except (EOFError, OSError):
            return self._on_death(worker, outcomes)
        if task_id == "ready":
            worker.state = "idle"
            return 0
        worker.state = "idle"
        worker.deadline = math.inf
        elapsed = time.monotonic() - worker.dispatched_at
        if status == "error":
            raise WorkerTaskError(f"task {task_id} raised in a worker process:\n{payload}")
        outcomes[task_id] = TaskOutcome("ok", payload, elapsed)
        return 1

    def _on_death(self, worker: _Worker, outcomes: list[TaskOutcome | None]) -> int:
        if worker.state == "starting":
            worker.process.join(timeout=5)
            raise RuntimeError(
                f"a verifier worker died while starting (exit code {worker.process.exitcode}); "
                "its initializer failed, see the worker's stderr above"
            )
        task, was_busy = worker.task, worker.state == "busy"
        elapsed = time.monotonic() - worker.dispatched_at
        self._replace(worker)
        if was_busy:
            outcomes[task] = TaskOutcome("crashed", None, elapsed)
            return 1
        return 0

    def _enforce_deadlines(self, outcomes: list[TaskOutcome | None]) -> int:
        now = time.monotonic()
        done = 0
        for worker in list(self._workers):
            if worker.state == "busy" and now >= worker.deadline:
                outcomes[worker.task] = TaskOutcome("timeout", None, now - worker.dispatched_at)
                self._replace(worker)
                done += 1
            elif worker.state == "starting" and now - worker.started_at > self.startup_timeout:
                raise RuntimeError(f"a verifier worker did not become ready within {self.startup_timeout:.0f} s")
        return done
