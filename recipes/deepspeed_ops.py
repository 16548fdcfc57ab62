"""DeepSpeed's JIT-compiled ops in a folder of this environment's own, built once at set-up.

On CPU, `deepspeed.init_distributed` loads the op `deepspeed_shm_comm` (its shared-memory all-reduce), which
torch compiles on first use (1.5-2.5 minutes on 2 cores) into `~/.cache/torch_extensions/<py>_<cuda>/`. That folder
is shared by every environment of the user: two virtual environments (other include paths) rebuild it in turn, and
every DeepSpeed start in either waits silently behind one lock for those builds. And torch before 2.14 locks with a
file that blocks by its mere existence, so a build killed mid-way (a timeout, kill -9, Ctrl-C) makes every later
start wait forever after "Using ... as PyTorch extensions root".

So every DeepSpeed start of this project (`recipes.trainer.init_distributed`, the launch scripts, the tests) first
calls `prepare()`:
- TORCH_EXTENSIONS_DIR is this environment's own folder (`extensions_dir()`: `<venv>/torch_extensions`), unless
  the user set it;
- a lock left there by a killed build under such an older torch is an error naming the file and how to remove it.
`make env` builds the op once (`python -m recipes.deepspeed_ops build`), saying so; later starts load it in a
second. On GPUs DeepSpeed communicates over NCCL and needs no such op.

    python -m recipes.deepspeed_ops build    # at set-up (make env does it)
    python -m recipes.deepspeed_ops check    # the launch scripts' pre-flight: exit 2 with the stale lock named
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

SHM_OP = "deepspeed_shm_comm"
ENV = "TORCH_EXTENSIONS_DIR"


class StaleLockError(RuntimeError):
    """A build lock that no process holds, under a torch whose lock blocks by its existence."""


def extensions_dir() -> Path:
    """$TORCH_EXTENSIONS_DIR if set, else this environment's own folder: <sys.prefix>/torch_extensions (the
    virtual environment's), or, where that is not writable (a system Python), a folder named after the
    interpreter's prefix under ~/.cache/torch_extensions."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions"
    tag = hashlib.sha1(str(prefix.resolve()).encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "torch_extensions" / f"env-{tag}"


def lock_blocks_by_existence() -> bool:
    """torch < 2.14 guards a build with a lock file that blocks while it exists (FileBaton), and a killed build
    leaves it behind; torch 2.14 takes an OS lock on it, which the kernel releases when its holder dies."""
    import torch.utils.cpp_extension as cpp_extension
    return not hasattr(cpp_extension, "FileLock")


def lock_holders(path: Path) -> list[int]:
    """Pids of the processes that have `path` open (Linux /proc; a FileBaton holder keeps its lock file open for
    the whole build)."""
    target, pids = os.path.realpath(path), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.path.realpath(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or another user's
            continue
    return pids


def stale_locks(root: Optional[Path] = None) -> list[Path]:
    """Build locks under `root` (default: this environment's folder) that block every later build and that no
    process holds. Empty under torch >= 2.14, whose locks cannot go stale."""
    root = extensions_dir() if root is None else root
    if not root.is_dir() or not lock_blocks_by_existence():
        return []
    # exists() again after the scan: a build that ended meanwhile has removed its lock, which is then not stale
    return [lock for lock in sorted(root.glob("*/lock")) if not lock_holders(lock) and lock.exists()]


def prepare() -> Path:
    """Point torch's JIT extensions at this environment's folder (unless TORCH_EXTENSIONS_DIR is set) and refuse
    to start behind a stale build lock. Call before `deepspeed.init_distributed`. Returns the folder."""
    root = extensions_dir()
    os.environ[ENV] = str(root)
    stale = stale_locks(root)
    if stale:
        raise StaleLockError(
            f"{stale[0]} is the lock of a DeepSpeed op build that was killed (no process holds it); with this torch "
            f"(< 2.14) every DeepSpeed start would wait for it forever. Remove it: rm {' '.join(map(str, stale))}")
    return root


def needs_shm_op() -> bool:
    """DeepSpeed loads its shared-memory all-reduce op when it runs on the CPU (Linux only)."""
    import torch
    return sys.platform == "linux" and not torch.cuda.is_available()


def shm_op_file(root: Optional[Path] = None) -> Path:
    return (extensions_dir() if root is None else root) / SHM_OP / f"{SHM_OP}.so"


def build(verbose: bool = False) -> Optional[Path]:
    """Build (or load, when it is up to date) DeepSpeed's CPU communication op in this environment's folder,
    through the call DeepSpeed makes at start-up. Returns the op file, or None where the op is not used."""
    if not needs_shm_op():
        print("DeepSpeed ops: none to build (a GPU is present: DeepSpeed uses NCCL)", flush=True)
        return None
    root = prepare()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("DeepSpeed ops: this DeepSpeed has no CPU shared-memory op; nothing to build", flush=True)
        return None
    target = shm_op_file(root)
    fresh = not target.is_file()
    if fresh:
        print(f"DeepSpeed ops: building {SHM_OP} once for this environment into {root} (1-3 minutes on 2 cores; "
              f"DeepSpeed needs it on CPU)...", flush=True)
    t0 = time.monotonic()
    builder.load(verbose=verbose)
    if fresh:
        print(f"DeepSpeed ops: {SHM_OP} built in {time.monotonic() - t0:.0f} s", flush=True)
    else:
        print(f"DeepSpeed ops: {SHM_OP} up to date in {root}", flush=True)
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.deepspeed_ops",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("command", choices=("build", "check", "dir"),
                        help="build: compile DeepSpeed's CPU op for this environment (set-up); check: the launch "
                             "scripts' pre-flight (a stale build lock is an error), building the op if missing; "
                             "dir: print this environment's extension folder")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    try:
        if args.command == "dir":
            print(extensions_dir())
        elif args.command == "check":
            prepare()
            if needs_shm_op() and not shm_op_file().is_file():
                build(args.verbose)
        else:
            build(args.verbose)
    except StaleLockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
