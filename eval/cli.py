"""python -m eval generate --model DIR [--adapter DIR] --questions Q.jsonl --image-folder F --out answers.jsonl
   python -m eval score TASK --pred PREDICTIONS.jsonl --gt GROUND_TRUTH [--out results.json]
   python -m eval score TASK --pred PREDICTIONS.jsonl --dataset SPLIT (save_to_disk folder, parquet, cached hub id)
   python -m eval submit TASK --pred PREDICTIONS.jsonl --questions QUESTIONS --out FILE
   python -m eval merge --questions Q.jsonl --out answers.jsonl PART0.jsonl ... PARTN-1.jsonl
   python -m eval tasks
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .answer_log import merge_shards
from .dataset_splits import add_dataset_arguments
from .captions import METRICS as CAPTION_METRICS
from .files import InputError, check_writable, write_text
from .submission import ANSWER_PARSINGS, SUBMISSIONS
from .tasks import TASKS, TVC_PROTOCOLS, VQA_PROTOCOLS, Preread, TaskOptions, score


def _flatten(value: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in value.items():
        rows += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return rows


def _print_scores(result: dict) -> None:
    cov = result["coverage"]
    print(f"{result['task']}: {result['score']:.2f}  ({result['metric']})")
    print(f"  coverage: {cov['predicted']}/{cov['expected']} questions"
          + (f", {cov['missing']} MISSING: partial score" if cov["missing"] else "")
          + (f", {cov['empty_answers']} empty answers" if cov["empty_answers"] else ""))
    for note in result.get("notes", []):
        print(f"  note: {note}")
    for key, value in _flatten(result["scores"]):
        if isinstance(value, float):
            # fractions are printed x100; caption metrics are already x100
            shown = value if key.split(".")[-1] in CAPTION_METRICS else 100 * value
            print(f"  {key:<40} {shown:8.2f}")
        else:
            print(f"  {key:<40} {value!s:>8}")


def _tasks_table() -> str:
    lines = [f"{'task':<13} {'split':<28} {'metric':<58} scored by"]
    for t in TASKS.values():
        lines.append(f"{t.name:<13} {t.split:<28} {t.metric:<58} {t.where}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Score benchmark predictions the way "
                                     "the official scorers do, or write server submission files.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score a prediction file against ground truth")
    s.add_argument("task", choices=sorted(TASKS))
    s.add_argument("--pred", required=True, type=Path, help="predictions JSONL: {question_id, text} per line")
    s.add_argument("--gt", type=Path, help="ground truth in the benchmark's official format")
    add_dataset_arguments(s, "the split as a dataset instead of --gt (textvqa, vqav2, gqa, pope, mmbench, scienceqa)")
    s.add_argument("--out", type=Path, help="write the scores here as JSON")
    s.add_argument("--allow-partial", action="store_true",
                   help="score only the predicted questions when some are missing (coverage is reported)")
    s.add_argument("--prediction-processing", choices=["evalai", "none"], default=TaskOptions.prediction_processing,
                   help="vqav2/vizwiz: pass predictions through the EvalAI answer processor first, as LLaVA and "
                        "lmms-eval do before submitting (default), or score the raw text (official scorer only)")
    s.add_argument("--protocol", choices=VQA_PROTOCOLS, default=TaskOptions.protocol,
                   help="vqav2: 'gt-vision' (default: GT-Vision-Lab's vqaEval.py, after --prediction-processing) or "
                        "'vlt5' (VL-T5's VQAEvaluator.evaluate_raw, which scored the VL-BART papers' VQAv2 numbers: "
                        "the prediction always normalised, the human answers only punctuation-processed and only when "
                        "they disagree; its 2-decimal rounding). Both numbers are printed with vlt5.")
    s.add_argument("--split", default="test", help="scienceqa: pid_splits split; coco_caption: Karpathy split")
    s.add_argument("--splits", help="scienceqa: pid_splits.json when it is not next to problems.json")
    s.add_argument("--circular", action="store_true",
                   help="mmbench: for a TSV without rotated copies, add them (prediction ids index + k*1000000); "
                        "the official dev TSV holds them already and is always scored circularly")
    s.add_argument("--lenient-answers", action="store_true",
                   help="nlvr2/tvqa/how2qa: also accept 'True.', 'yes', '1' / 'A3', '3', 'a3.' (not the official "
                        "rule, which counts only 'true'/'false' and 'a{k}'); non-canonical answers are counted either way")
    s.add_argument("--tvc-protocol", choices=TVC_PROTOCOLS, default=TaskOptions.tvc_protocol,
                   help="tvc/yc2c: 'value' (default: the VALUE scorer, which scored the paper's test numbers on its "
                        "server: one item per clip, all its descriptions as references, non-ASCII characters as "
                        "spaces) or 'per-description' (NVlabs/DoRA's VL-BART validation during training: every "
                        "description an item with itself as the reference)")
    s.add_argument("--no-meteor", action="store_true", help="captions: skip METEOR (its java process)")
    s.add_argument("--questions", help="pope: LLaVA's llava_pope_test.jsonl, which says each prediction id's "
                                       "category and question (the official label files reuse ids across categories)")

    w = sub.add_parser("submit", help="write a submission file for a server-only split")
    w.add_argument("task", choices=sorted(SUBMISSIONS))
    w.add_argument("--pred", required=True, type=Path)
    w.add_argument("--questions", required=True, type=Path,
                   help="vqav2: v2_OpenEnded_mscoco_test2015_questions.json (or LLaVA's jsonl); vizwiz: test.json; "
                        "mmbench: the test TSV; tvqa/how2qa/tvc/yc2c: VALUE's test JSONL (tvqa_test_release.jsonl, ...)")
    w.add_argument("--out", required=True, type=Path)
    w.add_argument("--circular", action="store_true",
                   help="mmbench: for a TSV without rotated copies, add them (predictions needed for index + k*1000000)")
    w.add_argument("--answer-parsing", choices=ANSWER_PARSINGS, default="exact",
                   help="tvqa/how2qa: 'exact' (default: only 'a{k}' is an answer, anything else is written as -1) or "
                        "'official' (NVlabs/DoRA's int(text[1]), 0 when that fails: 'a3.' -> 3, as the paper's "
                        "submissions were made)")

    sub.add_parser("tasks", help="list the tasks, their splits and metrics")

    g = sub.add_parser("generate", help="answer a question file with a LLaVA model (needs torch)")
    from .generate import add_arguments  # imports no torch until it runs
    add_arguments(g)

    m = sub.add_parser("merge", help="the answer files of `generate --shard i/N` runs, in the question file's order")
    m.add_argument("parts", nargs="+", type=Path, help="the N answer files, in shard order (0/N first)")
    m.add_argument("--questions", type=Path, help="the question file the shards answered")
    m.add_argument("--task", choices=sorted(TASKS), help="with --dataset: the benchmark layout the shards read")
    add_dataset_arguments(m, "the split the shards answered (`generate --dataset`), instead of --questions")
    m.add_argument("--out", required=True, type=Path)
    return parser


def _merge(args) -> int:
    if (args.questions is None) == (args.dataset is None):
        raise InputError("give the questions the shards answered as --questions FILE or as --dataset SPLIT --task T")
    if args.dataset is None:
        return merge_shards(args.questions, args.parts, args.out)
    if args.task is None:
        raise InputError("--dataset needs --task (which benchmark's layout the shards read)")
    from .dataset_splits import dataset_fingerprint, read_questions
    questions, _ = read_questions(args.task, args.dataset, args.dataset_split, args.dataset_config, open_images=False)
    fingerprint = dataset_fingerprint(args.dataset, args.dataset_split, args.dataset_config, args.task)
    return merge_shards(args.dataset, args.parts, args.out, questions=questions,
                        source=("dataset_fingerprint", fingerprint))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            check_writable(args.out)  # before loading a model
            from .generate import run
            return run(args)
        if args.command == "merge":
            check_writable(args.out)
            n = _merge(args)
            print(json.dumps({"answers": n, "file": str(args.out)}))
        elif args.command == "tasks":
            print(_tasks_table())
        elif args.command == "score":
            if args.out:
                check_writable(args.out)  # before the (possibly long) scoring
            options = TaskOptions(allow_partial=args.allow_partial, prediction_processing=args.prediction_processing,
                                  split=args.split, splits=args.splits, circular=args.circular,
                                  meteor=not args.no_meteor, questions=args.questions,
                                  lenient_answers=args.lenient_answers, tvc_protocol=args.tvc_protocol,
                                  protocol=args.protocol)
            if (args.gt is None) == (args.dataset is None):
                raise InputError("give the ground truth as --gt FILE or as --dataset SPLIT (one of them)")
            if args.dataset is not None:
                from .dataset_splits import read_truth
                truth = read_truth(args.task, args.dataset, args.dataset_split, args.dataset_config)
                result = score(args.task, args.pred, Preread(truth, args.dataset), options)
            else:
                result = score(args.task, args.pred, args.gt, options)
            _print_scores(result)
            if args.out:
                write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        elif args.command == "submit":
            check_writable(args.out)
            extra = {"circular": args.circular} if args.task == "mmbench" else {}
            if args.task in ("tvqa", "how2qa"):
                extra["answer_parsing"] = args.answer_parsing
            elif args.answer_parsing != "exact":
                raise InputError(f"--answer-parsing applies to tvqa and how2qa, not {args.task}")
            info = SUBMISSIONS[args.task](args.pred, args.questions, args.out, **extra)
            print(json.dumps(info))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
