"""Tests start children only with a time bound, and a hung child fails its test with its last output."""
import ast
import os
import sys
import time
from pathlib import Path

import pytest

import subprocesses

TESTS = Path(__file__).resolve().parent
UNBOUNDED = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}

HANGING_CHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("grandchild", grandchild.pid, flush=True)
print("waiting for the extension lock", flush=True)
print("stuck in the build", file=sys.stderr, flush=True)
time.sleep(600)
"""


def test_a_hung_child_fails_its_test_with_its_last_output_and_leaves_nothing_running():
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        subprocesses.run([sys.executable, "-c", HANGING_CHILD], what="a child stuck on a lock", timeout=5)
    assert time.monotonic() - t0 < 30  # the grandchild holds the pipes too: without the group kill this never ends
    message = str(failure.value)
    assert "a child stuck on a lock: still running after 5 s" in message
    assert "waiting for the extension lock" in message and "stuck in the build" in message
    grandchild = int(message.split("grandchild ")[1].split()[0])
    for _ in range(100):  # killed with the group; reaped by init
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {grandchild} still running")


def test_a_finished_child_gives_its_output_and_exit_status():
    done = subprocesses.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); "
                             "sys.exit(3)"], what="a short child", timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_no_test_starts_a_child_without_a_bound():
    """Every subprocess call in tests/ goes through subprocesses.run / start + finish."""
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "subprocesses.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr in UNBOUNDED and \
                    isinstance(node.value, ast.Name) and node.value.id == "subprocess":
                offenders.append(f"{path.name}:{node.lineno}: subprocess.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "subprocess" and \
                    {a.name for a in node.names} & UNBOUNDED:
                offenders.append(f"{path.name}:{node.lineno}: from subprocess import ...")
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                offenders.append(f"{path.name}:{node.lineno}: os.{node.attr}")
    assert not offenders, "children started without a time bound (use tests/subprocesses.py):\n" + \
        "\n".join(offenders)
    assert os.path.basename(subprocesses.__file__) == "subprocesses.py"
