"""Where a built-in demo trains: never over a finished run.

    python -m recipes.demo run-dir DEFAULT [key=value ...]   # prints the folder the launch script trains in

The folder is `train.output_dir` when the overrides give one (the user's choice, used by training and by the
demo's finish alike); else DEFAULT, unless DEFAULT holds a finished run (train_summary.json), then the first free
DEFAULT_2, DEFAULT_3, ... so that a rerun keeps the earlier results, even when it fails. An unfinished run in
DEFAULT is resumed, as any run is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

FINISHED = "train_summary.json"


def run_dir(default: Path, overrides: Sequence[str] = ()) -> Path:
    chosen = [item.split("=", 1)[1] for item in overrides if item.startswith("train.output_dir=")]
    if chosen:
        return Path(chosen[-1])
    if not (default / FINISHED).is_file():
        return default
    n = 2
    while (default.with_name(f"{default.name}_{n}") / FINISHED).is_file():
        n += 1
    return default.with_name(f"{default.name}_{n}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.demo",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run-dir", help="print the folder a demo run trains in")
    p.add_argument("default", type=Path)
    p.add_argument("overrides", nargs="*", help="the key=value overrides given to the demo")
    args = parser.parse_args(argv)
    run = run_dir(args.default, args.overrides)
    if run != args.default and not any(o.startswith("train.output_dir=") for o in args.overrides):
        print(f"{args.default} holds a finished run, kept: this run trains in {run}", file=sys.stderr)
    print(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
