"""DeepSpeed's JIT ops live in this environment's own folder, built at set-up: another environment building in the
shared default folder does not hold up the project's runs, and a killed build's lock is named, not waited on."""
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import subprocesses
from recipes import deepspeed_ops

ROOT = Path(__file__).resolve().parents[1]

# What another environment's build of the op does to the default folder: it holds torch's build lock there.
HOLD_DEFAULT_LOCK = """
import sys, time
import torch.utils.cpp_extension as ce
folder = ce._get_build_directory("deepspeed_shm_comm", False)   # ~/.cache/torch_extensions/<py>_<cuda>/...
lock = folder + "/lock"
if hasattr(ce, "FileLock"):
    held = ce.FileLock(lock)   # kept referenced: a dropped FileLock releases its lock
    held.acquire()
else:
    from torch.utils.file_baton import FileBaton
    held = FileBaton(lock)
    assert held.try_acquire()
print("holding", lock, flush=True)
time.sleep(600)
"""

START_DEEPSPEED = """
import os, sys
sys.path.insert(0, {root!r})
from recipes.trainer import init_distributed, leave_process_group
import torch.distributed as dist
init_distributed()
print("extensions", os.environ.get("TORCH_EXTENSIONS_DIR"), flush=True)
dist.barrier()
leave_process_group()
"""


def test_another_environment_building_in_the_default_folder_does_not_delay_a_run(tmp_path):
    built = deepspeed_ops.shm_op_file()
    assert built.is_file(), ("DeepSpeed's CPU op is not built for this environment: set-up (make env) runs "
                             "`python -m recipes.deepspeed_ops build`")
    before = built.stat().st_mtime_ns
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    holder = subprocesses.start([sys.executable, "-c", HOLD_DEFAULT_LOCK], env=env)
    try:
        line = holder.stdout.readline()
        assert line.startswith("holding ") and str(home) in line, line
        t0 = time.monotonic()
        run = subprocesses.run([sys.executable, "-c", START_DEEPSPEED.format(root=str(ROOT))], env=env, cwd=ROOT,
                               what="a 1-process DeepSpeed start while another environment holds the build lock "
                                    "of the default extension folder", timeout=120)
        seconds = time.monotonic() - t0
        assert run.returncode == 0, subprocesses.output(run)
        assert holder.poll() is None, "the other environment's build was still going on"
    finally:
        holder.kill()
        subprocesses.finish(holder, what="the process holding the default folder's lock", timeout=30)
    assert f"extensions {Path(sys.prefix) / 'torch_extensions'}" in run.stdout
    assert built.stat().st_mtime_ns == before, "the run compiled the op: it must load the one built at set-up"
    assert seconds < 100


def test_set_up_builds_the_op_once_and_later_builds_only_load_it(capsys):
    built = deepspeed_ops.shm_op_file()
    before = built.stat().st_mtime_ns
    assert deepspeed_ops.main(["build"]) == 0
    assert f"deepspeed_shm_comm up to date in {deepspeed_ops.extensions_dir()}" in capsys.readouterr().out
    assert built.stat().st_mtime_ns == before


def test_the_extension_folder_is_the_environments_own_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert deepspeed_ops.extensions_dir() == Path(sys.prefix) / "torch_extensions"
    assert deepspeed_ops.prepare() == Path(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert deepspeed_ops.prepare() == tmp_path / "mine"


KILLED_BUILD = """
import os, signal, sys
from torch.utils.file_baton import FileBaton
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
assert FileBaton(sys.argv[1]).try_acquire()
print("building", flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)   # the build dies holding the lock
import time; time.sleep(600)
"""


def test_a_killed_builds_lock_is_named_under_a_torch_whose_lock_file_blocks(monkeypatch, tmp_path, capsys):
    """torch < 2.14 (FileBaton): the lock file of a killed build blocks every later start forever. The pre-flight
    names it with how to remove it; a lock held by a live build is not stale; under torch >= 2.14 (an OS lock) a
    left-over lock file blocks nothing and is not reported."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    killed = subprocesses.run([sys.executable, "-c", KILLED_BUILD, str(lock), "kill"], what="a build killed mid-way",
                              timeout=60)
    assert killed.returncode == -signal.SIGKILL and lock.is_file()

    if not deepspeed_ops.lock_blocks_by_existence():
        assert deepspeed_ops.stale_locks() == []  # torch >= 2.14: an OS lock, which died with its holder
    monkeypatch.setattr(deepspeed_ops, "lock_blocks_by_existence", lambda: True)  # an older torch's FileBaton
    assert deepspeed_ops.stale_locks() == [lock]
    with pytest.raises(deepspeed_ops.StaleLockError, match="rm " + str(lock)):
        deepspeed_ops.prepare()
    assert deepspeed_ops.main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {lock} is the lock of a DeepSpeed op build that was killed") and "Traceback" not in err

    lock.unlink()
    live = subprocesses.start([sys.executable, "-c", KILLED_BUILD, str(lock), "live"])
    try:
        assert live.stdout.readline().strip() == "building"
        assert deepspeed_ops.lock_holders(lock) == [live.pid]
        assert deepspeed_ops.stale_locks() == []  # a build in progress is waited for, as torch does
    finally:
        live.kill()
        subprocesses.finish(live, what="a build in progress", timeout=30)
