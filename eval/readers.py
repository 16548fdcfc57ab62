"""Readers for the official ground-truth formats of each benchmark. Ids are returned as strings.

A file that does not have the expected structure is an error naming the file (and the line or record).
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Union

from .choice import MMBenchQuestion
from .predictions import InputError

PathLike = Union[str, Path]


def load_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ground-truth file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ground-truth file {path} not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def load_json_or_jsonl(path: PathLike) -> list:
    """A JSON list, or JSON lines (the official NLVR2 and VALUE files are JSON lines)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ground-truth file {path} not found")
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        return load_json(path)
    return [r for _, r in iter_jsonl(path)]


def _field(record: dict, key: str, path: PathLike, where: str):
    if key not in record:
        raise InputError(f"{path}: {where} has no {key!r} field (fields: {sorted(record)[:8]})")
    return record[key]


# ------------------------------------------------------------------------------------------------ VQA family
def _answer_strings(answers, path, where) -> list[str]:
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{path}: {where} has no answers")
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


def read_vqa_answers(path: PathLike) -> dict[str, list[str]]:
    """Human answers per question id: the official VQAv2 annotation file ({"annotations": [...]}), VL-T5's
    Karpathy split (a list of questions with "answers"), or TextVQA ({"data": [...]})."""
    data = load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        records = data["annotations"]
    elif isinstance(data, dict) and "data" in data:
        records = data["data"]
    elif isinstance(data, list):
        records = data
    else:
        raise InputError(f"{path}: expected VQA annotations ({{'annotations': [...]}}), TextVQA ({{'data': [...]}}) "
                         f"or a list of questions")
    out = {}
    for i, r in enumerate(records):
        qid = str(_field(r, "question_id", path, f"record {i}"))
        out[qid] = _answer_strings(_field(r, "answers", path, f"question {qid}"), path, f"question {qid}")
    return out


def read_vizwiz_answers(path: PathLike) -> tuple[dict[str, list[str]], dict[str, str]]:
    """VizWiz val.json (a list of {"image", "question", "answers": [...]}), keyed by image file name; the
    file name without extension is accepted as an alias."""
    data = load_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected the VizWiz list of questions")
    out, aliases = {}, {}
    for i, r in enumerate(data):
        image = str(_field(r, "image", path, f"record {i}"))
        out[image] = _answer_strings(_field(r, "answers", path, f"question {image}"), path, f"question {image}")
        aliases[Path(image).stem] = image
    return out, aliases


def read_gqa_answers(path: PathLike) -> dict[str, str]:
    """GQA questions ({qid: {"answer": ...}}, e.g. testdev_balanced_questions.json) or VL-T5's list with a
    "label" {answer: score}."""
    data = load_json(path)
    if isinstance(data, dict):
        return {str(k): str(_field(v, "answer", path, f"question {k}")) for k, v in data.items()}
    out = {}
    for i, r in enumerate(data):
        qid = str(_field(r, "question_id", path, f"record {i}"))
        label = _field(r, "label", path, f"question {qid}")
        out[qid] = max(label, key=label.get) if isinstance(label, dict) else str(label)
    return out


# ------------------------------------------------------------------------------------------------ POPE
def read_pope_labels(path: PathLike, questions: PathLike | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """POPE labels and categories, keyed by the question ids the predictions use.

    `path` is the directory of the official coco_pope_{adversarial,popular,random}.json (JSON lines with
    question_id, image, text, label; the category is in the file name), or one JSONL that also has a "category".
    The official files number their questions from 1 in each file, so the ids repeat across categories; give
    `questions` (LLaVA's llava_pope_test.jsonl: question_id, image, text, category) and each question is matched
    to its label by category, image and question text, not by position as LLaVA's script does.
    """
    path = Path(path)
    files = sorted(path.glob("coco_pope_*.json")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no coco_pope_*.json files")
    rows = []  # (category, question_id, image, text, label, file, line)
    for file in files:
        category = file.stem[len("coco_pope_"):] if file.stem.startswith("coco_pope_") else None
        for n, r in iter_jsonl(file):
            label = str(_field(r, "label", file, f"line {n}")).strip().lower()
            if label not in ("yes", "no"):
                raise InputError(f"{file}:{n}: label {label!r} is not yes/no")
            cat = category or r.get("category")
            if cat is None:
                raise InputError(f"{file}:{n}: no category (use coco_pope_<category>.json files or a 'category' field)")
            rows.append((cat, str(_field(r, "question_id", file, f"line {n}")), r.get("image"),
                         str(r.get("text", "")).strip(), label, file, n))
    if questions is not None:
        by_content = {}
        for cat, _, image, text, label, file, n in rows:
            by_content.setdefault((cat, image, text), label)
        labels, categories = {}, {}
        for n, q in iter_jsonl(questions):
            qid = str(_field(q, "question_id", questions, f"line {n}"))
            key = (_field(q, "category", questions, f"line {n}"), q.get("image"), str(q.get("text", "")).strip())
            if key not in by_content:
                raise InputError(f"{questions}:{n}: no label in {path} for question {qid} ({key[0]}, {key[1]}, "
                                 f"{key[2]!r})")
            labels[qid], categories[qid] = by_content[key], key[0]
        return labels, categories
    labels, categories = {}, {}
    for cat, qid, _, _, label, file, n in rows:
        if qid in labels:
            raise InputError(f"{file}:{n}: question_id {qid} is also in another category; the official files "
                             f"number each category from 1, so pass the question file (--questions "
                             f"llava_pope_test.jsonl) to match predictions to labels")
        labels[qid], categories[qid] = label, cat
    return labels, categories


# ------------------------------------------------------------------------------------------------ ScienceQA
def read_scienceqa(path: PathLike, split: str = "test", splits_path: PathLike | None = None) -> dict[str, dict]:
    """ScienceQA problems.json, restricted to a split listed in pid_splits.json (found next to problems.json
    when not given)."""
    problems = load_json(path)
    if not isinstance(problems, dict):
        raise InputError(f"{path}: expected ScienceQA problems.json (a dict keyed by problem id)")
    splits_path = Path(splits_path) if splits_path else Path(path).with_name("pid_splits.json")
    if splits_path.is_file():
        splits = load_json(splits_path)
        if split not in splits:
            raise InputError(f"{splits_path}: no split {split!r} (has {sorted(splits)})")
        ids = [str(p) for p in splits[split]]
        missing = [p for p in ids if p not in problems]
        if missing:
            raise InputError(f"{splits_path}: split {split!r} lists problems not in {path}: {missing[:5]}")
        problems = {p: problems[p] for p in ids}
    for pid, prob in problems.items():
        for key in ("choices", "answer"):
            _field(prob, key, path, f"problem {pid}")
    return problems


# ------------------------------------------------------------------------------------------------ MMBench
def read_mmbench(path: PathLike) -> dict[str, MMBenchQuestion]:
    """MMBench TSV (index, question, hint, A, B, C, D, answer, category, ...), keyed by index. Rotated copies
    for circular evaluation are rows with index + k * 1e6 (VLMEvalKit's layout); see `circular_copies`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ground-truth file {path} not found")
    csv.field_size_limit(1 << 30)  # the image column holds base64 images
    out = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for n, row in enumerate(reader, start=2):
            for key in ("index", "answer"):
                if not row.get(key):
                    raise InputError(f"{path}:{n}: no {key!r} (MMBench test has no answers: submit it to the server)")
            choices = {c: row[c] for c in "ABCDE" if row.get(c) not in (None, "", "nan", "none", "None")}
            out[str(int(row["index"]))] = MMBenchQuestion(int(row["index"]), row["answer"].strip(), choices,
                                                           row.get("category", ""))
    return out


def circular_copies(questions: dict[str, MMBenchQuestion], offset: int = 1_000_000) -> dict[str, MMBenchQuestion]:
    """Add the rotations of each question's options (k = 1 .. n-1), with index + k * offset and the answer
    letter moved with its option: what the official circular evaluation asks the model."""
    out = dict(questions)
    for q in questions.values():
        letters = sorted(q.choices)
        texts = [q.choices[c] for c in letters]
        correct = texts[letters.index(q.answer)]
        for k in range(1, len(letters)):
            rotated = texts[k:] + texts[:k]
            index = q.index + k * offset
            out[str(index)] = MMBenchQuestion(index, letters[rotated.index(correct)], dict(zip(letters, rotated)),
                                              q.category)
    return out


# ------------------------------------------------------------------------------------------------ NLVR2
def read_nlvr2(path: PathLike) -> dict[str, bool]:
    """NLVR2 labels by identifier: the official JSON lines ("label": "True"/"False") or VL-T5's list (0/1)."""
    out = {}
    for i, r in enumerate(load_json_or_jsonl(path)):
        ident = str(_field(r, "identifier", path, f"record {i}"))
        label = _field(r, "label", path, f"statement {ident}")
        if isinstance(label, str):
            if label.lower() not in ("true", "false"):
                raise InputError(f"{path}: statement {ident} has label {label!r}")
            out[ident] = label.lower() == "true"
        else:
            out[ident] = bool(int(label))
    return out


# ------------------------------------------------------------------------------------------------ captions
def read_coco_captions(path: PathLike, split: str = "test") -> tuple[dict[str, list[str]], dict[str, str]]:
    """Reference captions per image id: COCO-format annotations ({"annotations": [{"image_id", "caption"}]})
    or Karpathy's dataset_coco.json (images of one split; id = cocoid, the file name stem is an alias)."""
    data = load_json(path)
    refs: dict[str, list[str]] = defaultdict(list)
    aliases: dict[str, str] = {}
    if isinstance(data, dict) and "annotations" in data:
        for i, a in enumerate(data["annotations"]):
            refs[str(_field(a, "image_id", path, f"annotation {i}"))].append(_field(a, "caption", path, f"annotation {i}"))
        for img in data.get("images", []):
            if "file_name" in img:
                aliases[Path(img["file_name"]).stem] = str(img["id"])
    elif isinstance(data, dict) and "images" in data:
        for i, img in enumerate(data["images"]):
            if img.get("split") != split:
                continue
            key = str(img.get("cocoid", img.get("imgid", i)))
            refs[key] = [s["raw"] for s in _field(img, "sentences", path, f"image {key}")]
            if "filename" in img:
                aliases[Path(img["filename"]).stem] = key
        if not refs:
            raise InputError(f"{path}: no images in split {split!r}")
    else:
        raise InputError(f"{path}: expected COCO caption annotations or Karpathy's dataset_coco.json")
    return dict(refs), aliases


def read_value_captions(path: PathLike) -> dict[str, list[str]]:
    """TVC / YC2C (VALUE release JSON lines): {"clip_id", "descs": [{"desc": ...}]} -> captions per clip id."""
    out: dict[str, list[str]] = {}
    for i, r in enumerate(load_json_or_jsonl(path)):
        clip = str(_field(r, "clip_id", path, f"record {i}"))
        descs = _field(r, "descs", path, f"clip {clip}")
        out.setdefault(clip, []).extend(d["desc"] if isinstance(d, dict) else str(d) for d in descs)
    return out


def read_value_qa(path: PathLike) -> tuple[dict[str, int], dict[str, str]]:
    """TVQA / How2QA (VALUE release JSON lines): {"qid", "answer_idx", ...} -> answer index per qid, and the
    show name (TVQA) for per-show accuracy."""
    answers, shows = {}, {}
    for i, r in enumerate(load_json_or_jsonl(path)):
        qid = str(_field(r, "qid", path, f"record {i}"))
        answers[qid] = int(_field(r, "answer_idx", path, f"question {qid}"))
        if "show_name" in r:
            shows[qid] = r["show_name"]
    return answers, shows
