"""Running the CLI as a real process tree and killing it mid-run (recovery tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """The CLI's own local 2-CPU Ray, not the test session's."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["SBERTRAY_RAY_NUM_CPUS"] = "2"
    return env


def sbertray_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sbertray", *args]


def _start_and_wait(
    cmd: list[str], ready: Callable[[], bool], what: str, timeout_s: float, **popen
) -> subprocess.Popen:
    """Starts ``cmd`` in its own process group and returns once ``ready()``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), start_new_session=True, **popen)
    deadline = time.time() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.time() < deadline, f"no {what} within {timeout_s:.0f}s"
            time.sleep(0.1)
    except BaseException:
        _kill_tree(proc)
        raise
    return proc


def _kill_tree(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGKILLs the run's whole process tree and waits until every process of it is gone.

    Killing the driver's process group is not enough: Ray (2.60) starts each worker in a process
    group of its own, and a worker outlives its raylet for a moment, long enough to finish
    writing a checkpoint the test then thinks was cut off."""
    _signal_group(proc.pid, signal.SIGSTOP)  # the raylet starts no new worker from here on
    tree = _descendants(proc.pid)
    for child in tree:
        _signal(child, signal.SIGSTOP)
    tree += [p for p in _descendants(proc.pid) if p not in tree]
    _signal_group(proc.pid, signal.SIGKILL)
    for child in tree:
        _signal(child, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    assert not alive, f"{[p.pid for p in alive]} still there {timeout_s:.0f}s after SIGKILL"
    _wait_until_gone(proc.pid, timeout_s)


def _signal(process: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):  # it ended on its own meanwhile
        process.send_signal(sig)


# A run that ended by itself (the caller saw it end, and so reaped its driver) has no tree left
# to list and maybe no group: nothing to kill, and the caller's own error is the one to show.
def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def kill_when(
    cmd: list[str], ready: Callable[[], bool], *, what: str, timeout_s: float = 300
) -> None:
    """Starts ``cmd``, waits until ``ready()``, then SIGKILLs the driver and every Ray process
    it started, and waits for them to be gone before the test looks at their output."""
    proc = _start_and_wait(
        cmd, ready, what, timeout_s, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _kill_tree(proc)


def _wait_until_gone(group: int, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.killpg(group, 0)  # any process of the group left (a zombie counts until reaped)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {group} still there {timeout_s:.0f}s after SIGKILL")


def terminate_when(
    cmd: list[str], ready: Callable[[], bool], *, what: str, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """Starts ``cmd``, waits until ``ready()``, then sends the driver alone SIGTERM (as `kill`,
    `ray job stop` or Kubernetes do) and returns what it printed until it ended."""
    proc = _start_and_wait(
        cmd, ready, what, timeout_s, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run(cmd: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout_s
    )
