"""Every benchmark of the paper's VL tables: its ground-truth reader, scorer, and what the README says of it.

A Task turns (predictions file, ground-truth path, options) into a result dict:
    {"task", "metric", "score" (the headline number, x100), "scores" (all numbers), "coverage"}.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import choice, vqa
from .predictions import Coverage, InputError, match_ids, read_predictions
from .readers import (
    circular_copies,
    read_coco_captions,
    read_gqa_answers,
    read_mmbench,
    read_nlvr2,
    read_pope_labels,
    read_scienceqa,
    read_value_captions,
    read_value_qa,
    read_vizwiz_answers,
    read_vqa_answers,
)


@dataclass(frozen=True)
class TaskOptions:
    allow_partial: bool = False
    prediction_processing: str = "evalai"  # VQAv2 / VizWiz: "evalai" (as LLaVA submits) or "none" (raw)
    split: str = "test"  # ScienceQA pid_splits split, Karpathy split of dataset_coco.json
    splits: Optional[str] = None  # ScienceQA pid_splits.json, when not next to problems.json
    circular: bool = False  # MMBench: add the rotated copies of every question (prediction ids index + k*1e6)
    meteor: bool = True  # captions: METEOR needs a java subprocess
    questions: Optional[str] = None  # POPE: the question file that maps prediction ids to category and question


@dataclass(frozen=True)
class Task:
    name: str
    split: str
    ground_truth: str
    metric: str
    where: str  # "local" or the server that scores the official split
    run: Callable[[Path, Path, TaskOptions], tuple[dict, float, Coverage]]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _vqa_like(reader):
    def run(pred, gt, opt):
        answers, aliases = reader(gt)
        matched, cov = match_ids(read_predictions(pred), answers, opt.allow_partial, aliases)
        acc = _mean(vqa.vqa_score(matched[q], answers[q], opt.prediction_processing) for q in matched)
        return {"accuracy": acc, "prediction_processing": opt.prediction_processing}, acc, cov
    return run


def _run_textvqa(pred, gt, opt):
    answers = read_vqa_answers(gt)
    matched, cov = match_ids(read_predictions(pred), answers, opt.allow_partial)
    acc = _mean(vqa.textvqa_score(matched[q], answers[q]) for q in matched)
    return {"accuracy": acc}, acc, cov


def _run_gqa(pred, gt, opt):
    answers = read_gqa_answers(gt)
    matched, cov = match_ids(read_predictions(pred), answers, opt.allow_partial)
    acc = choice.exact_match_accuracy(matched, {q: answers[q] for q in matched})
    return {"accuracy": acc}, acc, cov


def _run_pope(pred, gt, opt):
    labels, categories = read_pope_labels(gt, opt.questions)
    matched, cov = match_ids(read_predictions(pred), labels, opt.allow_partial)
    scores = choice.pope_scores(matched, {q: labels[q] for q in matched}, categories)
    return scores, scores["mean_f1"], cov


def _run_scienceqa(pred, gt, opt):
    problems = read_scienceqa(gt, opt.split, opt.splits)
    matched, cov = match_ids(read_predictions(pred), problems, opt.allow_partial)
    scores = choice.scienceqa_scores(matched, {q: problems[q] for q in matched})
    return scores, scores["img_accuracy"], cov


def _run_mmbench(pred, gt, opt):
    questions = read_mmbench(gt)
    if opt.circular:
        questions = circular_copies(questions)
    matched, cov = match_ids(read_predictions(pred), questions, opt.allow_partial)
    scores = choice.mmbench_scores(matched, {q: questions[q] for q in matched})
    headline = scores["circular_accuracy"] if scores["rotations_per_question"] > 1 else scores["accuracy"]
    return scores, headline, cov


def _run_nlvr2(pred, gt, opt):
    labels = read_nlvr2(gt)
    matched, cov = match_ids(read_predictions(pred), labels, opt.allow_partial)
    scores = choice.nlvr2_scores(matched, {q: labels[q] for q in matched})
    return scores, scores["accuracy"], cov


def _captions(reader):
    def run(pred, gt, opt):
        refs, aliases = reader(gt, opt)
        matched, cov = match_ids(read_predictions(pred), refs, opt.allow_partial, aliases)
        from .captions import caption_scores
        scores = caption_scores(matched, {q: refs[q] for q in matched}, meteor=opt.meteor)
        return scores, scores["CIDEr"] / 100, cov
    return run


def _multiple_choice(n_choices):
    def run(pred, gt, opt):
        answers, shows = read_value_qa(gt)
        matched, cov = match_ids(read_predictions(pred), answers, opt.allow_partial)
        scores = choice.multiple_choice_accuracy(matched, {q: answers[q] for q in matched}, n_choices,
                                                 {q: shows[q] for q in matched} if shows else None)
        return scores, scores["accuracy"], cov
    return run


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("vqav2", "val (test-dev: server)", "v2_mscoco_val2014_annotations.json, or VL-T5 karpathy_test.json",
         "VQA accuracy (official)", "EvalAI server for test-dev",
         _vqa_like(lambda gt: (read_vqa_answers(gt), {}))),
    Task("vizwiz", "val (test: server)", "VizWiz val.json (question id = image file name)",
         "VQA accuracy (official)", "EvalAI server for test", _vqa_like(read_vizwiz_answers)),
    Task("textvqa", "val", "TextVQA_0.5.1_val.json", "VQA accuracy, EvalAI-normalised answers", "local",
         _run_textvqa),
    Task("gqa", "testdev_balanced", "testdev_balanced_questions.json, or VL-T5 testdev.json",
         "exact-match accuracy", "local", _run_gqa),
    Task("pope", "adversarial/popular/random", "directory of coco_pope_<category>.json + --questions",
         "F1 (mean over categories); acc/precision/recall/yes-ratio", "local", _run_pope),
    Task("scienceqa", "test (IMG subset headline)", "problems.json (+ pid_splits.json beside it)",
         "IMG accuracy; overall accuracy", "local", _run_scienceqa),
    Task("mmbench", "dev (test: server)", "mmbench_dev_*.tsv", "circular accuracy (letter by rule)",
         "OpenCompass server for test", _run_mmbench),
    Task("nlvr2", "test-P", "test1.json (official JSON lines) or VL-T5 test.json", "accuracy; consistency",
         "local", _run_nlvr2),
    Task("coco_caption", "Karpathy test", "dataset_coco.json (Karpathy) or COCO caption annotations",
         "CIDEr-D x100; BLEU-4, METEOR, ROUGE-L", "local",
         _captions(lambda gt, opt: read_coco_captions(gt, opt.split))),
    Task("tvqa", "val", "tvqa_val.jsonl (VALUE release)", "accuracy (5 choices)", "VALUE server for test",
         _multiple_choice(5)),
    Task("how2qa", "val", "how2qa_val_release.jsonl (VALUE release)", "accuracy (4 choices)",
         "VALUE server for test", _multiple_choice(4)),
    Task("tvc", "val", "tvc_val_release.jsonl (VALUE release)", "CIDEr-D x100 over clips; BLEU-4, METEOR, ROUGE-L",
         "VALUE server for test", _captions(lambda gt, opt: (read_value_captions(gt), {}))),
    Task("yc2c", "val", "yc2c_val_release.jsonl (VALUE release)", "CIDEr-D x100 over clips; BLEU-4, METEOR, ROUGE-L",
         "VALUE server for test", _captions(lambda gt, opt: (read_value_captions(gt), {}))),
]}


def score(task: str, predictions: Path, ground_truth: Path, options: TaskOptions = TaskOptions()) -> dict:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    t = TASKS[task]
    scores, headline, coverage = t.run(Path(predictions), Path(ground_truth), options)
    return {"task": task, "metric": t.metric, "score": 100 * headline, "scores": scores,
            "coverage": coverage.to_dict(), "predictions": str(predictions), "ground_truth": str(ground_truth)}
