"""VL-BART task data: the reference's files -> tokenised inputs, targets and visual features, and their batching.

Files as VL-T5 / VL-Adapter / the DoRA fork read them (see docs/vlbart.md for where they come from):
- VQAv2 Karpathy splits `karpathy_{train,val,test}.json`: [{"img_id", "sent", "question_id", "label": {answer:
  score}, ...}]. Training target: an answer drawn from `label` with probability proportional to its score, drawn
  again every epoch, and the example's loss weighted by that score (the reference's rule).
- GQA `train.json`, `valid.json`, `testdev.json`: the same fields (one answer, score 1).
- NLVR2 `train.json`, `valid.json`, `test.json`: [{"identifier", "img0", "img1", "sent", "label": 0 | 1}];
  target "true" / "false"; two images.
- COCO captions, Karpathy's `dataset_coco.json`: training has one example per caption (train + restval),
  evaluation one per image.

Inputs are the task prompt followed by the text ("vqa: what is ...?"), cut to the task's token limit; visual
features come from feature stores (data/features.py), (images, tokens, dim) per example. An example whose
features are missing, or whose record is malformed, comes back as {"skip": reason}, logged with its id and
counted by the trainer like any skipped sample.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)
IGNORE_INDEX = -100

# The task prompts of the reference (`--use_tasks_prompts`). Its GQA prompt was "gpa: ", a typo: the default here is
# "gqa: "; set `prompt: "gpa: "` in a task's config to run exactly the reference's inputs.
PROMPTS = {"vqa": "vqa: ", "gqa": "gqa: ", "nlvr": "nlvr: ", "caption": "caption: "}
NLVR_ANSWERS = ("false", "true")  # label 0, 1


class TaskDataError(ValueError):
    """A task file that cannot be read (names the file and the entry)."""


@dataclass(frozen=True)
class Example:
    id: str  # the id the evaluator matches on: question_id, NLVR2 identifier, image id for captions
    text: str  # the input text after the prompt
    images: tuple[str, ...]  # feature ids
    answers: Optional[dict[str, float]] = None  # target -> score (training); None: evaluation only
    context: Optional[str] = None  # video tasks: the subtitles, before the text; the prompt then goes last


def _load_json(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _records(path, keys: Sequence[str]) -> list[dict]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON list of entries, got a {type(data).__name__}")
    for i, r in enumerate(data):
        missing = [k for k in keys if not isinstance(r, dict) or k not in r]
        if missing:
            raise TaskDataError(f"{path}: entry {i} lacks {missing}")
    return data


def _is_score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vqa_answers(path, i: int, r: dict) -> Optional[dict[str, float]]:
    """{answer: score} of a VQA / GQA entry; None where it has no label (an evaluation file)."""
    label = r.get("label")
    if label is None:
        return None
    if not isinstance(label, dict) or not all(_is_score(s) for s in label.values()):
        raise TaskDataError(f"{path}: entry {i} (question_id {r['question_id']}): label {str(label)[:80]} is not "
                            f"{{answer: score}} with numeric scores, as VL-T5's files give it (e.g. {{\"two\": 1.0}})")
    return {str(a): float(s) for a, s in label.items()}


def read_vqa(paths: str | Sequence[str]) -> list[Example]:
    """VL-T5's VQA / GQA files (several are concatenated: GQA trains on train + valid)."""
    out = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for i, r in enumerate(_records(path, ("img_id", "sent", "question_id"))):
            out.append(Example(str(r["question_id"]), r["sent"], (str(r["img_id"]),), _vqa_answers(path, i, r)))
    return out


def read_nlvr(path) -> list[Example]:
    out = []
    for i, r in enumerate(_records(path, ("identifier", "img0", "img1", "sent"))):
        label = r.get("label")
        if label is not None and (not isinstance(label, int) or label not in (0, 1)):
            raise TaskDataError(f"{path}: entry {i} ({r['identifier']}): label {label!r} ({type(label).__name__}) "
                                f"must be the integer 0 (false) or 1 (true), as VL-T5's NLVR2 files give it")
        answers = None if label is None else {NLVR_ANSWERS[int(label)]: 1.0}
        out.append(Example(r["identifier"], r["sent"], (r["img0"], r["img1"]), answers))
    return out


def read_karpathy_captions(path, splits: Sequence[str], per_caption: bool) -> list[Example]:
    """Karpathy's dataset_coco.json: `per_caption` (training) makes one example per caption; otherwise one per
    image (evaluation: the references are read by the evaluator from the same file). Image id = file name
    without extension (COCO_val2014_000000391895), as the feature stores key images."""
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise TaskDataError(f"{path}: not Karpathy's dataset_coco.json (no 'images' list)")
    out = []
    for image in data["images"]:
        if image.get("split") not in splits:
            continue
        image_id = Path(image["filename"]).stem
        if per_caption:
            out += [Example(f"{image_id}#{k}", "", (image_id,), {s["raw"].strip(): 1.0})
                    for k, s in enumerate(image["sentences"])]
        else:
            out.append(Example(image_id, "", (image_id,)))
    return out


class FeatureLookup:
    """Looks an id up in several stores in turn (GQA reads VG images for training and GQA's own for testdev)."""

    def __init__(self, stores: Sequence):
        self.stores = list(stores)

    def get(self, feature_id: str) -> Optional[torch.Tensor]:
        for store in self.stores:
            if feature_id in store:
                return store.get(feature_id)
        return None


def draw_answer(answers: dict[str, float], rng: random.Random) -> tuple[str, float]:
    """The reference's VQA target: an answer drawn with probability proportional to its score, and that score
    (which weights the example's loss). No answer with a positive score: the empty answer with weight 0."""
    items = [(a, s) for a, s in answers.items() if s > 0]
    if not items:
        return "", 0.0
    answer = rng.choices([a for a, _ in items], weights=[s for _, s in items])[0]
    return answer, answers[answer]


# What training does with an example whose label holds no answer with a positive score (VQAv2's `label: {}`):
# "zero_weight" trains it with the empty answer and weight 0, as the reference does (it still counts in its batch's
# mean); "drop" leaves it out; "refuse" stops with an error naming them.
EMPTY_LABELS = ("zero_weight", "drop", "refuse")


def has_answer(example: Example) -> bool:
    return any(s > 0 for s in example.answers.values())


class TaskDataset(torch.utils.data.Dataset):
    """One task's examples as model inputs. With `train`, each example carries a target: drawn from its answers
    with a generator seeded by (seed, epoch, index), so that every process, worker and resumed run draws the same.
    `empty_labels` (EMPTY_LABELS) says what becomes of training examples without a positive-score answer;
    `empty_label_count` is how many there were."""

    def __init__(self, task: str, examples: Sequence[Example], features: FeatureLookup, tokenizer, *,
                 prompt: str, max_input_length: Optional[int] = None, max_target_length: Optional[int] = None,
                 train: bool = True, seed: int = 0, frames: Optional[int] = None, truncate: str = "context",
                 empty_labels: str = "zero_weight"):
        self.task, self.examples, self.features, self.tokenizer = task, list(examples), features, tokenizer
        self.prompt, self.max_input_length, self.max_target_length = prompt, max_input_length, max_target_length
        self.train, self.seed, self.epoch = train, seed, 0
        self.frames, self.truncate = frames, truncate  # video: features resized to `frames` time steps
        self.empty_labels, self.empty_label_count = empty_labels, 0
        if empty_labels not in EMPTY_LABELS:
            raise ValueError(f"empty_labels must be one of {EMPTY_LABELS}, not {empty_labels!r}")
        if train:
            unlabelled = [e.id for e in self.examples if e.answers is None]
            if unlabelled:
                raise TaskDataError(f"task {task}: {len(unlabelled)} training examples have no label "
                                    f"(first: {unlabelled[:3]})")
            empty = [e.id for e in self.examples if not has_answer(e)]
            self.empty_label_count = len(empty)
            if empty and empty_labels == "refuse":
                raise TaskDataError(f"task {task}: {len(empty)} training examples have no answer with a positive "
                                    f"score (first: {empty[:3]}); tasks.{task}.empty_labels: zero_weight trains them "
                                    f"with weight 0 as the reference does, drop leaves them out")
            if empty and empty_labels == "drop":
                self.examples = [e for e in self.examples if has_answer(e)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def _encode(self, text: str, limit: Optional[int]) -> list[int]:
        return self.tokenizer(text, max_length=limit, truncation=limit is not None)["input_ids"]

    def encode_input(self, example: Example) -> list[int]:
        if example.context is None:  # image tasks: "vqa: question"
            return self._encode(self.prompt + example.text, self.max_input_length)
        from .value import encode_with_context
        return encode_with_context(self.tokenizer, example.context, example.text, self.prompt,
                                   self.max_input_length, self.truncate)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        feats = []
        for image in example.images:
            f = self.features.get(image)
            if f is None:
                log.warning("skipped %s example %s (index %d): no features for %r", self.task, example.id, index, image)
                return {"skip": "missing features", "id": example.id, "task": self.task}
            if self.frames:
                from .video import resize_frames
                f = resize_frames(torch.as_tensor(f), self.frames)
            feats.append(f)
        sample = {"task": self.task, "id": example.id, "input_ids": self.encode_input(example),
                  "vis_feats": torch.stack([torch.as_tensor(f) for f in feats]), "labels": None, "score": 1.0}
        if self.train:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.task}-{index}")
            answer, sample["score"] = draw_answer(example.answers, rng)
            sample["labels"] = self._encode(answer, self.max_target_length)
        return sample


class MultitaskDataset(torch.utils.data.Dataset):
    """Task datasets one after another in one index space (the order of RoundRobinBatches' task_sizes)."""

    def __init__(self, datasets: dict[str, TaskDataset]):
        self.datasets = dict(datasets)
        self.offsets, start = [], 0
        for task, ds in self.datasets.items():
            self.offsets.append((start, task))
            start += len(ds)
        self.total = start

    @property
    def task_sizes(self) -> dict[str, int]:
        return {t: len(d) for t, d in self.datasets.items()}

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets.values():
            ds.set_epoch(epoch)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> dict:
        for start, task in reversed(self.offsets):
            if index >= start:
                return self.datasets[task][index - start]
        raise IndexError(index)


@dataclass
class VLCollator:
    """Pads a micro-batch of one task. Skipped samples are left out and listed under "skipped"; a batch of
    skipped samples only is {"empty": True, "task": ...}."""

    pad_token_id: int

    def __call__(self, samples: Sequence[dict]) -> dict:
        skipped = [s["skip"] for s in samples if "skip" in s]
        if len(skipped) == len(samples):
            return {"empty": True, "skipped": skipped, "task": samples[0]["task"]}
        samples = [s for s in samples if "skip" not in s]
        tasks = {s["task"] for s in samples}
        if len(tasks) != 1:
            raise ValueError(f"a micro-batch mixes tasks {sorted(tasks)}")
        batch = {"task": tasks.pop(), "ids": [s["id"] for s in samples], "skipped": skipped}
        batch["input_ids"], batch["attention_mask"] = _pad([s["input_ids"] for s in samples], self.pad_token_id)
        if samples[0]["labels"] is not None:
            batch["labels"], _ = _pad([s["labels"] for s in samples], IGNORE_INDEX)
            batch["score"] = torch.tensor([s["score"] for s in samples], dtype=torch.float32)
        shapes = {tuple(s["vis_feats"].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"visual features of different shapes in one batch: {sorted(shapes)}")
        batch["vis_feats"] = torch.stack([s["vis_feats"] for s in samples])
        return batch


def _pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask
