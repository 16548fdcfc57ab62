"""Score a VL-BART run on its tasks' test splits: predictions in the official formats, scored by `eval`.

    python -m recipes.vlbart.evaluate RUN_DIR                 # the trained model (adapter merged in memory)
    python -m recipes.vlbart.evaluate RUN_DIR --no-adapter    # the model before training, same data and scorer
    python -m recipes.vlbart.evaluate RUN_DIR --tasks vqa,nlvr --out DIR --batch-size 64
    python -m recipes.vlbart.evaluate RUN_DIR --submit DIR    # server files for the tasks with a `submit` section

RUN_DIR is a training run's output_dir (config.yaml, tokenizer/, adapter/ or trainable.safetensors). For each task
with a `test` file and a `score` section it prints the settings its predictions run with (generation: each
setting pinned by the config or taken from the backbone), writes DIR/predictions_{task}.jsonl ({"question_id",
"text"}: the id is the question id, the NLVR2 identifier, or the image id for captions), scores it with `eval`'s
scorer for the task, prints a table and writes DIR/scores.json; the last line printed is the scores as JSON. A VQA
task scored with `protocol: vlt5` (the paper configs) reports VL-T5's number, the paper's column, with the
GT-Vision number beside it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data.vlbart import VLCollator
from recipes.config import load_config, section
from recipes.vlbart.tasks import (TaskConfig, generation_settings, predict_batch, prediction_rows, task_configs,
                                  task_dataset)


def load_run(run: Path, with_adapter: bool = True, device=None):
    """(model, tokenizer, config) of a training run, the trained weights applied (merged for DoRA)."""
    from dataclasses import fields

    from recipes.trainer import TrainConfig
    from recipes.vlbart.model import ADDED_TOKENS
    from recipes.vlbart.train import TRAINABLE_FILE, VLModelConfig, adapt, build_model

    config = load_config(run / "config.yaml")
    model_cfg = VLModelConfig(**section(config, "model", [f.name for f in fields(VLModelConfig)]))
    # the model as training built it: its random draws (the added tokens' rows; the same seed for runs written
    # before those rows were saved), then the trained weights
    torch.manual_seed(int((config.get("train") or {}).get("seed", TrainConfig.seed)))
    model, tokenizer = build_model(model_cfg)
    if (run / ADDED_TOKENS).is_file():
        model.load_added_tokens(run / ADDED_TOKENS)
    method = config.get("method", "dora")
    if with_adapter:
        if method == "dora":
            from dora import load_adapter, merge_dora
            load_adapter(model, run / "adapter")
            merge_dora(model)  # one GEMM per layer at inference
        else:
            from safetensors.torch import load_file
            adapt(model, config)
            state = load_file(str(run / TRAINABLE_FILE))
            missing = set(state) - {n for n, _ in model.named_parameters()}
            if missing:
                raise ValueError(f"{run / TRAINABLE_FILE}: parameters {sorted(missing)[:3]} are not in the model")
            model.load_state_dict(state, strict=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, config


def predict(model, tokenizer, task: TaskConfig, batch_size: int, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    dataset = task_dataset(task, tokenizer, "test", feat_dim=model.visual_config.feat_dim)
    if progress:
        print(f"predict {task.name}: {generation_settings(model, task)}", flush=True)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=VLCollator(tokenizer.pad_token_id))
    device = next(model.parameters()).device
    rows = []
    for batch in tqdm(loader, desc=f"predict {task.name}", disable=not progress, dynamic_ncols=True):
        if batch.get("empty"):
            continue
        rows += prediction_rows(batch["ids"], predict_batch(model, tokenizer, batch, task, device))
    return rows


def evaluate(run: Path, out: Path, tasks: list[str] | None = None, with_adapter: bool = True,
             batch_size: int = 64, allow_partial: bool = False) -> dict:
    """Predictions and scores per task. `allow_partial`: score the examples that could be predicted when some
    could not (no features for them), with the coverage reported, instead of refusing."""
    from eval.files import write_jsonl
    from eval.tasks import TaskOptions, score

    start = time.perf_counter()
    model, tokenizer, config = load_run(run, with_adapter)
    configs = task_configs(config)
    names = tasks or [n for n, t in configs.items() if t.test and t.score]
    results = {}
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        task = configs[name]
        if not task.score:
            raise ValueError(f"tasks.{name} has no score section (which eval task and ground truth)")
        rows = predict(model, tokenizer, task, batch_size)
        path = out / f"predictions_{name}.jsonl"
        write_jsonl(path, rows)
        options = {k: v for k, v in task.score.items() if k not in ("task", "gt")}
        options.setdefault("allow_partial", allow_partial)
        results[name] = score(task.score["task"], path, Path(task.score["gt"]), TaskOptions(**options))
        results[name]["predict"] = generation_settings(model, task)
    summary = {name: round(r["score"], 2) for name, r in results.items()}
    (out / "scores.json").write_text(json.dumps({"scores": summary, "details": results,
                                                 "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    return {"scores": summary, "details": results}


def write_submissions(run: Path, out: Path, batch_size: int = 64) -> dict:
    """For every task with a `submit` section ({questions: the test file, file: the name the server wants, and for
    TVQA / How2QA answer_parsing: official | exact}),
    predictions on the test file written as `python -m eval submit TASK` writes them: out/TASK/FILE (VALUE wants
    one folder per task, zipped)."""
    from dataclasses import replace

    from eval.files import write_jsonl
    from eval.submission import SUBMISSIONS

    model, tokenizer, config = load_run(run)
    written = {}
    for name, task in task_configs(config).items():
        if not task.submit:
            continue
        kind = task.score.get("task", name)
        if kind not in SUBMISSIONS:
            raise ValueError(f"tasks.{name}: no submission format for {kind!r} (known: {sorted(SUBMISSIONS)})")
        questions = Path(task.submit["questions"])
        rows = predict(model, tokenizer, replace(task, test=str(questions)), batch_size)
        write_jsonl(out / f"predictions_{name}_submit.jsonl", rows)
        extra = {"answer_parsing": task.submit["answer_parsing"]} if "answer_parsing" in task.submit else {}
        file = out / name / task.submit.get("file", f"{name}_test_predictions.json")
        written[name] = SUBMISSIONS[kind](out / f"predictions_{name}_submit.jsonl", questions, file, **extra)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.vlbart.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, help="default: RUN/eval (RUN/eval_base with --no-adapter)")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task with a test file)")
    parser.add_argument("--no-adapter", action="store_true", help="score the model before training")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--allow-partial", action="store_true",
                        help="score the examples that could be predicted when some could not (no features for them); "
                             "the coverage is reported")
    parser.add_argument("--submit", type=Path, metavar="DIR", help="write the server submission files instead")
    args = parser.parse_args(argv)
    if args.submit:
        print(json.dumps(write_submissions(args.run, args.submit, args.batch_size)))
        return 0
    out = args.out or args.run / ("eval_base" if args.no_adapter else "eval")
    result = evaluate(args.run, out, args.tasks.split(",") if args.tasks else None, not args.no_adapter,
                      args.batch_size, args.allow_partial)
    for name, r in result["details"].items():
        beside = r["scores"].get("gt_vision_accuracy")
        after = " after EvalAI processing" if r["scores"].get("gt_vision_prediction_processing") == "evalai" else ""
        also = f"   (GT-Vision vqaEval.py{after}: {100 * beside:.2f})" if beside is not None else ""
        print(f"{name:<10} {r['metric']:<45} {r['score']:8.2f}{also}")
    print(json.dumps(result["scores"]))
    return 0


if __name__ == "__main__":
    from data.features import StoreError
    from data.vlbart import TaskDataError
    from eval.files import InputError
    from recipes.cli import exit_on_user_errors
    from recipes.config import ConfigError
    exit_on_user_errors(main, (ConfigError, TaskDataError, StoreError, InputError))
