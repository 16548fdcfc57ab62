"""Several recipes/vlm training runs in one interpreter, for the recipe test's families that are trained once each:
importing torch, transformers and DeepSpeed is most of a tiny run's time, and is paid once here.

    python tests/vlm_train_runs.py CONFIG.yaml [CONFIG.yaml ...]

Each run is `recipes/vlm/train.py CONFIG`'s own `main`, its output between "=== run K" and "=== exit CODE" lines.
The process group stays up from one run to the next (DeepSpeed keeps the groups it made from it for the whole
process, so a second group would not be its own) and is left after the last run, as a single run leaves it."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes import trainer  # noqa: E402
from recipes.vlm import train  # noqa: E402


def main(paths: list[str]) -> int:
    leave = trainer.leave_process_group
    trainer.leave_process_group = lambda: None  # Trainer.close's, between runs
    try:
        for k, path in enumerate(paths):
            print(f"=== run {k}: {path}", flush=True)
            code = train.main([path])
            print(f"=== exit {code}", flush=True)
            if code:
                return code
    finally:
        trainer.leave_process_group = leave
        leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
