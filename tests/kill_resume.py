"""A training run killed with SIGKILL mid-run, for the resume tests (sft, ppo, multi-turn grpo): each then
resumes the killed run and compares it with an uninterrupted one."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from posttrain.models.checkpoint import latest_checkpoint
from posttrain.runtime.tracking import read_metrics


def kill_mid_run(cmd: list[str], run_dir: Path, steps_logged: int, *, env=None, timeout: float = 120) -> Path:
    """Start ``cmd`` (a training CLI writing ``run_dir``), SIGKILL it once ``steps_logged`` steps are in its
    metrics.jsonl, and return its newest checkpoint (asserting the kill landed before the run finished)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= steps_logged:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir} after the kill"
    return ckpt
