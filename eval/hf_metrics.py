"""What the `evaluate` metrics in eval/metrics/<task>/<task>.py run: `python -m eval score <task>` on predictions
and references held in memory, so a Trainer's `compute_metrics` gets the numbers the CLI prints (the same code:
the references become the task's ground truth, the predictions a prediction file, and `tasks.score` scores them).

    metric = evaluate.load("eval/metrics/textvqa")          # a path in this repository; nothing is downloaded
    metric.compute(predictions=["nokia"], references=[["Nokia"] * 10])
    -> {"score": 100.0, "accuracy": 1.0, "matched_by": "question_id", "coverage": {...}}

`score` is the headline number x100 as the CLI prints it; the other keys are the CLI's `scores` (fractions; caption
metrics x100). Per task, a reference and the extra per-example arguments (lists as long as the predictions):

    vqav2, vizwiz          the human answers [str]; prediction_processing="evalai"|"none", protocol="gt-vision"|"vlt5"
    textvqa                the human answers [str]
    gqa                    the answer; balanced=[bool], structural=[str], semantic=[str] (optional)
    pope                   "yes" / "no"; categories=[str] (optional: one category "all")
    scienceqa              the answer's index; choices=[[str]] (required), has_image=[bool] (default all True)
    mmbench                the answer letter; choices=[{letter: text}] (required), indices=[int] (rotated copies as
                           index + k*1e6; default 0..n-1), categories=[str], l2_categories=[str]
    nlvr2                  the label (bool); identifiers=[str] (required: consistency groups), lenient_answers
    tvqa, how2qa           the answer index; groups=[str] (TVQA's show, optional), lenient_answers
    coco_caption           the reference captions [str]; meteor=True
    tvc, yc2c              the reference descriptions [str]; tvc_protocol="value"|"per-description", meteor=True
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .choice import GQAQuestion
from .files import write_jsonl
from .mmbench import MMBenchQuestion
from .tasks import TASKS, Preread, TaskOptions, score

REFERENCE = {  # the type of one reference
    "vqav2": "answers", "vizwiz": "answers", "textvqa": "answers", "coco_caption": "answers", "tvc": "answers",
    "yc2c": "answers", "gqa": "string", "pope": "string", "mmbench": "string", "scienceqa": "int",
    "tvqa": "int", "how2qa": "int", "nlvr2": "bool",
}
OPTION_KWARGS = ("prediction_processing", "protocol", "lenient_answers", "tvc_protocol", "meteor")


def metric_info(task: str, evaluate):
    import datasets
    kind = REFERENCE[task]
    reference = {"answers": datasets.Sequence(datasets.Value("string")), "string": datasets.Value("string"),
                 "int": datasets.Value("int32"), "bool": datasets.Value("bool")}[kind]
    t = TASKS[task]
    return evaluate.MetricInfo(
        description=f"{task} ({t.split}): {t.metric}, scored by this repository's `python -m eval score {task}`.",
        citation="", inputs_description=__doc__,
        features=datasets.Features({"predictions": datasets.Value("string"), "references": reference}))


def _per_example(name: str, values: Optional[Sequence], n: int, default=None, required: bool = False) -> list:
    if values is None:
        if required:
            raise ValueError(f"{name}=[...] is required, one per prediction")
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} predictions")
    return values


def _truth(task: str, references: list, n: int, kw: dict):
    """(ground truth in the form of the task's file reader, the id of each prediction)."""
    ids = [str(k) for k in range(n)]
    if task in ("vqav2", "vizwiz"):
        return ({i: list(r) for i, r in zip(ids, references)}, {}), ids
    if task == "textvqa":
        return [{"question_id": i, "image_id": f"image {i}", "question": "", "answers": list(r),
                 "where": f"reference {i}"} for i, r in zip(ids, references)], ids
    if task == "gqa":
        balanced = _per_example("balanced", kw.pop("balanced", None), n, True)
        structural = _per_example("structural", kw.pop("structural", None), n)
        semantic = _per_example("semantic", kw.pop("semantic", None), n)
        return ("official", {i: GQAQuestion(r, bool(b), s, m) for i, r, b, s, m in
                             zip(ids, references, balanced, structural, semantic)}), ids
    if task == "pope":
        categories = _per_example("categories", kw.pop("categories", None), n, "all")
        return ({i: str(r).strip().lower() for i, r in zip(ids, references)}, dict(zip(ids, categories))), ids
    if task == "scienceqa":
        choices = _per_example("choices", kw.pop("choices", None), n, required=True)
        images = _per_example("has_image", kw.pop("has_image", None), n, True)
        return {i: {"choices": list(c), "answer": int(r), "image": bool(im)}
                for i, r, c, im in zip(ids, references, choices, images)}, ids
    if task == "mmbench":
        choices = _per_example("choices", kw.pop("choices", None), n, required=True)
        indices = kw.pop("indices", None)
        indices = list(range(n)) if indices is None else [int(x) for x in _per_example("indices", indices, n)]
        categories = _per_example("categories", kw.pop("categories", None), n, "")
        l2 = _per_example("l2_categories", kw.pop("l2_categories", None), n, "")
        ids = [str(x) for x in indices]
        return {i: MMBenchQuestion(x, r, dict(c), cat, l2c) for i, x, r, c, cat, l2c in
                zip(ids, indices, references, choices, categories, l2)}, ids
    if task == "nlvr2":
        ids = [str(x) for x in _per_example("identifiers", kw.pop("identifiers", None), n, required=True)]
        return dict(zip(ids, (bool(r) for r in references))), ids
    if task in ("tvqa", "how2qa"):
        groups = kw.pop("groups", None)
        groups = dict(zip(ids, _per_example("groups", groups, n))) if groups is not None else None
        return ({i: int(r) for i, r in zip(ids, references)}, groups), ids
    if task == "coco_caption":
        return ({i: list(r) for i, r in zip(ids, references)}, {}), ids
    if task in ("tvc", "yc2c"):
        return {i: list(r) for i, r in zip(ids, references)}, ids
    raise ValueError(f"unknown task {task!r}")


def compute(task: str, predictions: Sequence[str], references: Sequence, **kwargs) -> dict:
    """`python -m eval score task` on these predictions and references: {"score", **scores, "coverage"}."""
    n = len(predictions)
    if len(references) != n:
        raise ValueError(f"{n} predictions and {len(references)} references")
    truth, ids = _truth(task, list(references), n, kwargs)
    options = {k: kwargs.pop(k) for k in OPTION_KWARGS if k in kwargs}
    if kwargs:
        raise ValueError(f"{task}: unknown arguments {sorted(kwargs)}")
    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp) / "predictions.jsonl"
        write_jsonl(pred, [{"question_id": i, "text": p} for i, p in zip(ids, predictions)])
        result = score(task, pred, Preread(truth, f"{task} references"), TaskOptions(**options))
    return {"score": result["score"], **result["scores"], "coverage": result["coverage"]}
