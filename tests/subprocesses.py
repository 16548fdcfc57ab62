"""Child processes in tests, always with a time bound.

A test that waits on a child without a bound can hold the whole CI run until its own limit (a DeepSpeed rank
stuck on a lock, a decoder that hangs). Every test starts children through `run` or `start`/`finish`: each child
gets its own process group, so that a timeout kills the launcher *and* its ranks or DataLoader workers (killing
only the direct child leaves grandchildren holding the output pipes, and the wait for their end never returns),
and the test fails with what it waited for and the child's last output.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional, Sequence

import pytest

TAIL = 4000  # characters of each stream shown when a child fails


def tail(text: Optional[str], n: int = TAIL) -> str:
    return (text or "")[-n:]


def start(cmd: Sequence[str], **kwargs) -> subprocess.Popen:
    """Popen in a process group of its own (stdout/stderr are pipes unless given)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return subprocess.Popen(list(cmd), start_new_session=True, **kwargs)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (the child itself, ranks, workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def finish(proc: subprocess.Popen, *, what: str, timeout: float) -> subprocess.CompletedProcess:
    """Wait for `proc` at most `timeout` seconds and collect its output; past that, kill its process group and
    fail the test naming `what` it waited for, with the child's last output. Its group is killed in any case, so
    that no grandchild outlives the test."""
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        out, err = proc.communicate()
    finally:
        kill_group(proc)
    if timed_out:
        pytest.fail(f"{what}: still running after {timeout:g} s, killed with its process group.\n"
                    f"--- last stdout ---\n{tail(out)}\n--- last stderr ---\n{tail(err)}", pytrace=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: Sequence[str], *, what: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` with a bound (see `finish`)."""
    return finish(start(cmd, **kwargs), what=what, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    """The end of both streams, for an assertion message."""
    return f"--- stdout ---\n{tail(proc.stdout)}\n--- stderr ---\n{tail(proc.stderr)}"
