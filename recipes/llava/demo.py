"""The built-in demo's two ends; `bash launch/llava_dora.sh` runs prepare, training, then finish.

    python -m recipes.llava.demo prepare [--root runs/demo]   # data, tokenizer, tiny LLM, CLIP tower, projector
    python -m recipes.llava.demo finish  [--root runs/demo] [--run RUN]   # merge, answer, score, report

finish answers the held-out questions with the base model (before training, ROOT/base) and with the run's merged
DoRA model (after, RUN/merged; RUN defaults to ROOT/run), scores both with the official VQA metric through
`python -m eval`, prints a table, and prints the results as JSON on its last line. Nothing here deletes a run: the
launch script trains a rerun in a new folder (recipes/demo.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from data.demo_shapes import COLOURS, SHAPES, write_demo_dataset
from recipes.llava.demo_models import corpus_from_llava_json, dialogues_from_llava_json, make_demo_checkpoints

CHANCE = (1 / len(COLOURS) + 1 / len(SHAPES) + 1 / 3) / 3  # color, shape, count questions in equal numbers


def prepare(root: Path, seed: int = 0) -> None:
    data, checkpoints = root / "data", root / "checkpoints"
    if not (data / "train.json").is_file():
        write_demo_dataset(data, seed=seed)
        print(f"wrote the demo dataset to {data}", flush=True)
    if not (checkpoints / "mm_projector.bin").is_file():
        make_demo_checkpoints(checkpoints, corpus_from_llava_json(data / "train.json"),
                              dialogues_from_llava_json(data / "train.json"), lm_steps=60, seed=seed)
        print(f"wrote the demo LLM, CLIP tower and stage-1 projector to {checkpoints}", flush=True)


def _eval(command: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "eval", *command], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m eval {' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def answer_and_score(model_dir: Path, root: Path, out: Path, name: str) -> dict:
    answers = out / f"answers_{name}.jsonl"
    scores = out / f"scores_{name}.json"
    _eval(["generate", "--model", str(model_dir), "--questions", str(root / "data" / "eval_questions.jsonl"),
           "--image-folder", str(root / "data" / "images"), "--out", str(answers), "--max-new-tokens", "8",
           "--restart"])  # a new run's model in the same folder: answer afresh
    _eval(["score", "vqav2", "--pred", str(answers), "--gt", str(root / "data" / "eval_annotations.json"),
           "--out", str(scores)])
    result = json.loads(scores.read_text())
    per_type = {}
    records = [json.loads(line) for line in (root / "data" / "eval_questions.jsonl").read_text().splitlines()]
    questions = {q["question_id"]: q["category"] for q in records}
    gts = {a["question_id"]: a["answers"][0]["answer"]
           for a in json.loads((root / "data" / "eval_annotations.json").read_text())["annotations"]}
    for line in answers.read_text().splitlines():
        a = json.loads(line)
        per_type.setdefault(questions[a["question_id"]], []).append(a["text"].strip().lower() == gts[a["question_id"]])
    result["per_question_type"] = {k: sum(v) / len(v) for k, v in sorted(per_type.items())}
    return result


def finish(root: Path, run: Optional[Path] = None) -> dict:
    from recipes.llava.merge import merge_run

    start = time.perf_counter()
    run = run or root / "run"
    merge_run(run, root / "base", with_adapter=False)
    merge_run(run, run / "merged", with_adapter=True)
    before = answer_and_score(root / "base", root, root, "before")
    after = answer_and_score(run / "merged", root, run, "after")
    return report(before, after, run, start)


def report(before: dict, after: dict, run: Path, start: float) -> dict:
    """The before / after table (with per-question-type rows when the scores have them) and the results JSON as the
    last line; the generic VLM demo reports the same way."""
    summary = json.loads((run / "train_summary.json").read_text())
    print()
    print(f"{'held-out accuracy (VQA metric)':<32} {'before':>8} {'after':>8}")
    print(f"{'all questions':<32} {before['score'] / 100:>8.3f} {after['score'] / 100:>8.3f}")
    for kind in after.get("per_question_type", {}):
        print(f"{'  ' + kind + ' questions':<32} {before['per_question_type'][kind]:>8.3f} "
              f"{after['per_question_type'][kind]:>8.3f}")
    print(f"{'chance':<32} {CHANCE:>8.3f}")
    print(f"training: {summary['steps']} steps, loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}, "
          f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters trained")
    result = {"before": round(before["score"] / 100, 4), "after": round(after["score"] / 100, 4),
              "chance": round(CHANCE, 4), "steps": summary["steps"], "final_loss": round(summary["losses"][-1], 4),
              "questions": after["coverage"]["expected"], "adapter": str(run / "adapter"),
              "merged_model": str(run / "merged"), "evaluation_seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "finish"])
    parser.add_argument("--root", type=Path, default=Path("runs/demo"))
    parser.add_argument("--run", type=Path, help="the training run to finish (default: ROOT/run)")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.root)
    else:
        finish(args.root, args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
