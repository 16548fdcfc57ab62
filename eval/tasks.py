"""Every benchmark of the paper's VL tables: its ground-truth reader, scorer, and what docs/evaluation.md says of it.

`score(task, predictions_path, ground_truth_path, options)` returns
    {"task", "metric", "score" (the headline number, x100), "scores" (all numbers), "coverage", "notes"}.
Recipes that hold predictions in memory call the scorers in vqa / choice / mmbench / captions directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import captions, choice, mmbench, vqa
from .files import InputError
from .predictions import Coverage, Predictions, match_ids, read_prediction_records, read_predictions
from .readers import (
    read_coco_captions,
    read_gqa,
    read_nlvr2,
    read_pope_labels,
    read_scienceqa,
    read_textvqa,
    read_value_captions,
    read_value_qa,
    read_vizwiz_answers,
    read_vqav2_answers,
)
from .textvqa import match_textvqa

TVC_PROTOCOLS = ("value", "per-description")
# VQAv2: "gt-vision" (GT-Vision-Lab's vqaEval.py, as LLaVA's numbers) or "vlt5" (VL-T5's evaluate_raw, which
# scored the VL-BART papers' VQAv2 numbers)
VQA_PROTOCOLS = ("gt-vision", "vlt5")


@dataclass(frozen=True)
class TaskOptions:
    allow_partial: bool = False
    prediction_processing: str = "evalai"  # VQAv2 / VizWiz: "evalai" (as LLaVA submits) or "none" (raw)
    split: str = "test"  # ScienceQA pid_splits split, Karpathy split of dataset_coco.json
    splits: Optional[str] = None  # ScienceQA pid_splits.json, when not next to problems.json
    circular: bool = False  # MMBench: a TSV without rotated copies gets them (prediction ids index + k*1e6)
    meteor: bool = True  # captions: METEOR needs a java subprocess
    questions: Optional[str] = None  # POPE: the question file that maps prediction ids to category and question
    lenient_answers: bool = False  # NLVR2 / TVQA / How2QA: accept non-canonical answers (opt-in deviation)
    # TVC / YC2C: "value" (the VALUE server, which scored the paper's video table) or "per-description" (what
    # NVlabs/DoRA's VL-BART code reports on val during training)
    tvc_protocol: str = "value"
    protocol: str = "gt-vision"  # vqav2 only: VQA_PROTOCOLS


@dataclass
class Outcome:
    scores: dict
    headline: float
    coverage: Coverage
    notes: list[str] = field(default_factory=list)
    headline_x100: Optional[float] = None  # the score exactly as an official scorer rounds it, when it does


@dataclass(frozen=True)
class Task:
    name: str
    split: str
    ground_truth: str
    metric: str
    where: str  # "local" or the server that scores the official split
    run: Callable[[Path, Path, TaskOptions], Outcome]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@dataclass(frozen=True)
class Preread:
    """Ground truth already read (from a dataset split, or built by an `evaluate` metric) in the form the task's
    file reader returns; `source` names it in messages and results."""
    value: object
    source: str

    def __str__(self) -> str:
        return self.source


def _read(gt, reader, *args):
    return gt.value if isinstance(gt, Preread) else reader(gt, *args)


# ------------------------------------------------------------------------------------------------ VQA family
def _vqa_like(reader):
    def run(pred, gt, opt):
        answers, aliases = _read(gt, reader)
        matched, cov = match_ids(read_predictions(pred), answers, opt.allow_partial, aliases)
        gt_vision = _mean(vqa.vqa_score(matched[q], answers[q], opt.prediction_processing) for q in matched)
        if opt.protocol == "gt-vision":
            return Outcome({"accuracy": gt_vision, "prediction_processing": opt.prediction_processing}, gt_vision, cov)
        # summed in prediction-file order, as evaluate_raw sums its dict of predictions: the rounding is its own
        per_question = [vqa.vlt5_vqa_score(matched[q], answers[q]) for q in matched]
        acc = _mean(per_question)
        return Outcome({"accuracy": acc, "protocol": "vlt5", "gt_vision_accuracy": gt_vision,
                        "gt_vision_prediction_processing": opt.prediction_processing}, acc, cov,
                       headline_x100=vqa.vlt5_overall(per_question))
    return run



def _run_textvqa(pred, gt, opt):
    questions = _read(gt, read_textvqa)
    matched, cov, how = match_textvqa(pred, read_prediction_records(pred), questions, opt.allow_partial)
    answers = {q["question_id"]: q["answers"] for q in questions}
    acc = _mean(vqa.textvqa_score(matched[q], answers[q]) for q in matched)
    return Outcome({"accuracy": acc, "matched_by": how}, acc, cov)


def _run_gqa(pred, gt, opt):
    kind, truth = _read(gt, read_gqa)
    predictions = read_predictions(pred)
    if kind == "vlt5":
        matched, cov = match_ids(predictions, truth, opt.allow_partial)
        acc = choice.vlt5_label_accuracy(matched, {q: truth[q] for q in matched})
        return Outcome({"accuracy": acc, "ground_truth_format": "VL-T5 labels"}, acc, cov)
    balanced = [q for q, v in truth.items() if v.balanced]
    ignored = [q for q in predictions.text if q in truth and not truth[q].balanced]
    kept = Predictions(predictions.path, {q: t for q, t in predictions.text.items() if q not in ignored},
                       predictions.line_of, [q for q in predictions.empty if q not in ignored])
    matched, cov = match_ids(kept, balanced, opt.allow_partial)
    scores = choice.gqa_scores(matched, {q: truth[q] for q in matched})
    notes = []
    if len(balanced) < len(truth):
        notes.append(f"{len(truth) - len(balanced)} questions of the file are not balanced: GQA's eval.py does "
                     f"not score them ({len(ignored)} predictions for them ignored)")
    return Outcome(scores, scores["accuracy"], cov, notes)


# ------------------------------------------------------------------------------------------------ closed form
def _run_pope(pred, gt, opt):
    labels, categories = _read(gt, read_pope_labels, opt.questions)
    matched, cov = match_ids(read_predictions(pred), labels, opt.allow_partial)
    scores = choice.pope_scores(matched, {q: labels[q] for q in matched}, categories)
    return Outcome(scores, scores["mean_f1"], cov)


def _run_scienceqa(pred, gt, opt):
    problems = _read(gt, read_scienceqa, opt.split, opt.splits)
    matched, cov = match_ids(read_predictions(pred), problems, opt.allow_partial)
    scores = choice.scienceqa_scores(matched, {q: problems[q] for q in matched})
    return Outcome(scores, scores["img_accuracy"], cov)


def _run_mmbench(pred, gt, opt):
    questions = _read(gt, mmbench.read_mmbench)
    notes = []
    if opt.circular and not mmbench.has_circular_copies(questions):
        questions = mmbench.circular_copies(questions)
        notes.append("the TSV had no rotated copies: added copy k of each question (index + k*1e6)")
    elif opt.circular:
        notes.append("the TSV already holds its rotated copies: --circular adds none")
    predictions = read_predictions(pred)
    missing_copies = [q for q in questions if q not in predictions.text and int(q) >= mmbench.MMBENCH_OFFSET]
    if missing_copies and not opt.allow_partial:
        raise InputError(f"{pred}: {len(missing_copies)} rotated copies (index + k*1e6, e.g. {missing_copies[:3]}) "
                         f"of {gt} have no prediction; answer every row of the TSV (or --allow-partial)")
    matched, cov = match_ids(predictions, questions, opt.allow_partial)
    scores = mmbench.mmbench_scores(matched, {q: questions[q] for q in matched})
    return Outcome(scores, scores["circular_accuracy"], cov, notes)


def _non_canonical_note(scores: dict, canonical: str) -> list[str]:
    n = scores["non_canonical_answers"]
    if not n:
        return []
    how = "accepted by --lenient-answers" if scores["answer_parsing"] == "lenient" else \
        "scored wrong, as the official rule does (--lenient-answers accepts variants)"
    numeric = f" ({scores['numeric_answers']} of them '1'/'0')" if scores.get("numeric_answers") else ""
    return [f"{n} answers are not {canonical}{numeric}: {how}"]


def _run_nlvr2(pred, gt, opt):
    labels = _read(gt, read_nlvr2)
    matched, cov = match_ids(read_predictions(pred), labels, opt.allow_partial)
    scores = choice.nlvr2_scores(matched, {q: labels[q] for q in matched}, opt.lenient_answers)
    return Outcome(scores, scores["accuracy"], cov, _non_canonical_note(scores, "'true'/'false'"))


def _multiple_choice(n_choices):
    def run(pred, gt, opt):
        answers, shows = _read(gt, read_value_qa, n_choices)
        matched, cov = match_ids(read_predictions(pred), answers, opt.allow_partial)
        scores = choice.multiple_choice_scores(matched, {q: answers[q] for q in matched}, n_choices,
                                               {q: shows[q] for q in matched} if shows else None, opt.lenient_answers)
        return Outcome(scores, scores["accuracy"], cov, _non_canonical_note(scores, f"'a0'..'a{n_choices - 1}'"))
    return run


# ------------------------------------------------------------------------------------------------ captions
def _run_coco_caption(pred, gt, opt):
    refs, aliases = _read(gt, read_coco_captions, opt.split)
    matched, cov = match_ids(read_predictions(pred), refs, opt.allow_partial, aliases)
    scores = captions.coco_caption_scores(matched, {q: refs[q] for q in refs if q in matched}, opt.meteor)
    return Outcome(scores, scores["CIDEr"] / 100, cov)


def _run_value_captions(pred, gt, opt):
    if opt.tvc_protocol not in TVC_PROTOCOLS:
        raise InputError(f"--tvc-protocol must be one of {TVC_PROTOCOLS}, got {opt.tvc_protocol!r}")
    refs = _read(gt, read_value_captions)
    matched, cov = match_ids(read_predictions(pred), refs, opt.allow_partial)  # in submission order
    refs = {c: refs[c] for c in refs if c in matched}  # in ground-truth order
    if opt.tvc_protocol == "value":
        scores = captions.value_caption_scores(matched, refs, opt.meteor)
    else:
        scores = captions.per_description_caption_scores(matched, refs, opt.meteor)
    return Outcome({**scores, "protocol": opt.tvc_protocol}, scores["CIDEr"] / 100, cov)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("vqav2", "val (test-dev: server)", "v2_mscoco_val2014_annotations.json, or VL-T5 karpathy_test.json",
         "VQA accuracy (official; --protocol vlt5: VL-T5's)", "EvalAI server for test-dev",
         _vqa_like(lambda gt: (read_vqav2_answers(gt), {}))),
    Task("vizwiz", "val (test: server)", "VizWiz val.json (question id = image file name)",
         "VQA accuracy (official)", "EvalAI server for test", _vqa_like(read_vizwiz_answers)),
    Task("textvqa", "val", "TextVQA_0.5.1_val.json", "VQA accuracy, EvalAI-normalised answers", "local",
         _run_textvqa),
    Task("gqa", "testdev_balanced", "testdev_balanced_questions.json, or VL-T5 testdev.json",
         "exact-match accuracy (balanced questions)", "local", _run_gqa),
    Task("pope", "adversarial/popular/random", "directory of coco_pope_<category>.json + --questions",
         "F1 (mean over categories); acc/precision/recall/yes-ratio", "local", _run_pope),
    Task("scienceqa", "test (IMG subset headline)", "problems.json (+ pid_splits.json beside it)",
         "IMG accuracy; overall accuracy", "local", _run_scienceqa),
    Task("mmbench", "dev (test: server)", "mmbench_dev_*.tsv", "circular accuracy (VLMEvalKit exact matching)",
         "OpenCompass server for test", _run_mmbench),
    Task("nlvr2", "test-P", "test1.json (official JSON lines) or VL-T5 test.json", "accuracy; consistency",
         "local", _run_nlvr2),
    Task("coco_caption", "Karpathy test", "dataset_coco.json (Karpathy) or COCO caption annotations",
         "CIDEr-D x100; BLEU-4, METEOR, ROUGE-L", "local", _run_coco_caption),
    Task("tvqa", "val", "tvqa_val.jsonl (VALUE release) or tvqa_val_solution.json", "accuracy (5 choices), per show",
         "VALUE server for test", _multiple_choice(5)),
    Task("how2qa", "val", "how2qa_val_release.jsonl (VALUE release)", "accuracy (4 choices)",
         "VALUE server for test", _multiple_choice(4)),
    Task("tvc", "val", "tvc_val_release.jsonl (VALUE release)", "CIDEr-D x100 (--tvc-protocol); BLEU-4, METEOR, ROUGE-L",
         "VALUE server for test", _run_value_captions),
    Task("yc2c", "val", "yc2c_val_release.jsonl (VALUE release)", "CIDEr-D x100 (--tvc-protocol); BLEU-4, METEOR, ROUGE-L",
         "VALUE server for test", _run_value_captions),
]}


def score(task: str, predictions: Path, ground_truth: "Path | Preread", options: TaskOptions = TaskOptions()) -> dict:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    t = TASKS[task]
    if options.protocol not in VQA_PROTOCOLS:
        raise InputError(f"--protocol must be one of {VQA_PROTOCOLS}, got {options.protocol!r}")
    if options.protocol != TaskOptions.protocol and task != "vqav2":
        raise InputError(f"--protocol {options.protocol} applies to vqav2 only, not {task}")  # not silently ignored
    outcome = t.run(Path(predictions), ground_truth if isinstance(ground_truth, Preread) else Path(ground_truth),
                    options)
    headline = outcome.headline_x100 if outcome.headline_x100 is not None else 100 * outcome.headline
    metric = "VQA accuracy (VL-T5 evaluate_raw)" if outcome.scores.get("protocol") == "vlt5" else t.metric
    return {"task": task, "metric": metric, "score": headline, "scores": outcome.scores,
            "coverage": outcome.coverage.to_dict(), "notes": outcome.notes, "predictions": str(predictions),
            "ground_truth": str(ground_truth)}
