"""Readers for the official ground-truth files of each benchmark, as they are distributed. Ids are strings.

Each reader checks that the file is the benchmark's own (a file of another benchmark is refused, naming what
it looks like) and that every record has what scoring needs; a problem is an `InputError` naming the file, the
line or record, and the id. (MMBench's TSV reader is in mmbench.py.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .choice import GQAQuestion
from .files import InputError, PathLike, iter_jsonl, load_json, load_records, read_text


# ------------------------------------------------------------------------------------------------ helpers
def _field(record: Any, key: str, where: str):
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object, got {str(record)[:80]}")
    if key not in record:
        raise InputError(f"{where}: no {key!r} field (fields: {sorted(record)[:8]})")
    return record[key]


def _first(records) -> Any:
    return next(iter(records), None)


def describe(data: Any) -> str:
    """What a loaded ground-truth file looks like, to name it when it is given to the wrong task."""
    if isinstance(data, dict):
        if isinstance(data.get("data"), list):
            return "a TextVQA file ({'data': [...]})"
        if isinstance(data.get("annotations"), list):
            first = _first(data["annotations"]) or {}
            if isinstance(first, dict) and "caption" in first:
                return "COCO caption annotations"
            return "VQAv2 annotations ({'annotations': [...]})"
        if isinstance(data.get("images"), list):
            return "Karpathy's dataset_coco.json"
        if "solution" in data:
            return "a VALUE TVQA solution file"
        first = _first(data.values())
        if isinstance(first, dict) and "answer" in first and ("isBalanced" in first or "semantic" in first):
            return "GQA questions"
        if isinstance(first, dict) and "choices" in first:
            return "ScienceQA problems.json"
        return "a JSON object"
    if isinstance(data, list):
        first = _first(data)
        if isinstance(first, dict):
            if "answers" in first or "answer_type" in first or "question_type" in first:
                return "a VQA question list (VL-T5 karpathy style or VizWiz)"
            if "identifier" in first:
                return "NLVR2 statements"
            if "descs" in first:
                return "VALUE captions"
            if "answer_idx" in first:
                return "VALUE multiple-choice QA"
            if "label" in first:
                return "a VL-T5 question list with labels"
        return "a JSON list"
    return type(data).__name__


def _refuse(path: PathLike, data: Any, task: str, expected: str):
    raise InputError(f"{path}: this looks like {describe(data)}, not {expected}; wrong --gt for {task}?")


def _answer_strings(answers, where) -> list[str]:
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{where}: no answers")
    out = []
    for a in answers:
        value = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(value, str):
            raise InputError(f"{where}: answer {value!r} is not a string")
        out.append(value)
    return out


# ------------------------------------------------------------------------------------------------ VQA family
def read_vqav2_answers(path: PathLike) -> dict[str, list[str]]:
    """Human answers per question id: the official annotation file ({"annotations": [...]}) or VL-T5's
    Karpathy list (questions with "answers")."""
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list) and describe(data).startswith("VQAv2"):
        records = [(f"annotation {i}", r) for i, r in enumerate(data["annotations"])]
    elif isinstance(data, list) and isinstance(_first(data), dict) and "question_id" in data[0] and "answers" in data[0]:
        records = [(f"record {i}", r) for i, r in enumerate(data)]
    else:
        _refuse(path, data, "vqav2", "VQAv2 annotations or a VL-T5 karpathy question list")
    out = {}
    for where, r in records:
        qid = str(_field(r, "question_id", f"{path}: {where}"))
        out[qid] = _answer_strings(_field(r, "answers", f"{path}: {where} (question {qid})"),
                                   f"{path}: {where} (question {qid})")
    return out


def read_vizwiz_answers(path: PathLike) -> tuple[dict[str, list[str]], dict[str, str]]:
    """VizWiz val.json (a list of {"image", "question", "answers": [...]}), keyed by image file name; the
    file name without extension is accepted as an alias."""
    data = load_json(path)
    if not isinstance(data, list) or not isinstance(_first(data), dict) or "image" not in data[0]:
        _refuse(path, data, "vizwiz", "the VizWiz list of questions")
    out, aliases = {}, {}
    for i, r in enumerate(data):
        image = str(_field(r, "image", f"{path}: record {i}"))
        out[image] = _answer_strings(_field(r, "answers", f"{path}: record {i} ({image})"), f"{path}: record {i} ({image})")
        aliases[Path(image).stem] = image
    return out, aliases


def read_textvqa(path: PathLike) -> list[dict]:
    """TextVQA_0.5.1_val.json ({"data": [{question_id, image_id, question, answers}]}): the records, each
    with its question id as a string."""
    data = load_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
        _refuse(path, data, "textvqa", "TextVQA ({'data': [...]}, e.g. TextVQA_0.5.1_val.json)")
    records = []
    for i, r in enumerate(data["data"]):
        where = f"{path}: data[{i}]"
        qid = str(_field(r, "question_id", where))
        where = f"{where} (question {qid})"
        question = _field(r, "question", where)
        records.append({"question_id": qid, "image_id": str(_field(r, "image_id", where)),
                        "question": str(question), "answers": _answer_strings(_field(r, "answers", where), where),
                        "where": where})
    return records


def read_gqa(path: PathLike) -> tuple[str, dict]:
    """GQA ground truth: ("official", {qid: GQAQuestion}) from GQA's questions files ({qid: {"answer",
    "isBalanced", "types", ...}}, e.g. testdev_balanced_questions.json), or ("vlt5", {qid: {answer: score}})
    from VL-T5's list (records with "question_id" and a "label" dict)."""
    data = load_json(path)
    kind = describe(data)
    gqa_like = kind == "GQA questions" or (kind == "a JSON object" and isinstance(_first(data.values()), dict))
    if isinstance(data, dict) and gqa_like:
        out = {}
        for qid, q in data.items():
            where = f"{path}: question {qid}"
            answer = _field(q, "answer", where)
            types = q.get("types") if isinstance(q.get("types"), dict) else {}
            out[str(qid)] = GQAQuestion(str(answer), bool(q.get("isBalanced", True)), types.get("structural"),
                                        types.get("semantic"))
        return "official", out
    if isinstance(data, list) and kind == "a VL-T5 question list with labels":
        out = {}
        for i, r in enumerate(data):
            qid = str(_field(r, "question_id", f"{path}: record {i}"))
            label = _field(r, "label", f"{path}: record {i} (question {qid})")
            if not isinstance(label, dict) or not all(isinstance(v, (int, float)) for v in label.values()):
                raise InputError(f"{path}: record {i} (question {qid}): label {str(label)[:60]} is not an "
                                 f"{{answer: score}} dict")
            out[qid] = label
        return "vlt5", out
    _refuse(path, data, "gqa", "GQA questions (testdev_balanced_questions.json) or a VL-T5 GQA list")


# ------------------------------------------------------------------------------------------------ POPE
def question_first_line(text: str) -> str:
    """LLaVA's POPE question file appends "\\nAnswer the question using a single word or phrase." to the
    label file's question: the first line is the question."""
    return text.split("\n")[0].strip()


def read_pope_labels(path: PathLike, questions: PathLike | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """POPE labels and categories, keyed by the question ids the predictions use.

    `path` is the directory of the official coco_pope_{adversarial,popular,random}.json (JSON lines with
    question_id, image, text, label; the category is in the file name), or one JSONL that also has a "category".
    The official files number their questions from 1 in each file, so the ids repeat across categories; give
    `questions` (LLaVA's llava_pope_test.jsonl: question_id, image, text + the answer-format line, category) and
    each question is matched to its label by category, image and the question's first line, not by position
    as LLaVA's script does (which gives the same pairs when the answer file is in question-file order).
    """
    path = Path(path)
    files = sorted(path.glob("coco_pope_*.json")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no coco_pope_*.json files")
    rows = []  # (category, question_id, image, first line, label, where)
    for file in files:
        category = file.stem[len("coco_pope_"):] if file.stem.startswith("coco_pope_") else None
        for n, r in iter_jsonl(file):
            where = f"{file}:{n}"
            label = str(_field(r, "label", where)).strip().lower()
            if label not in ("yes", "no"):
                raise InputError(f"{where}: label {label!r} is not yes/no")
            cat = category or r.get("category")
            if cat is None:
                raise InputError(f"{where}: no category (use coco_pope_<category>.json files or a 'category' field)")
            rows.append((cat, str(_field(r, "question_id", where)), r.get("image"),
                         question_first_line(str(r.get("text", ""))), label, where))
    if questions is None:
        return _pope_labels_by_id(rows)
    by_content: dict[tuple, tuple[str, str]] = {}
    for cat, _, image, text, label, where in rows:
        key = (cat, image, text)
        if key in by_content and by_content[key][0] != label:
            raise InputError(f"{where}: {key} is also on {by_content[key][1]} with the other label")
        by_content.setdefault(key, (label, where))
    labels, categories = {}, {}
    for n, q in iter_jsonl(questions, "question file"):
        where = f"{questions}:{n}"
        qid = str(_field(q, "question_id", where))
        key = (_field(q, "category", where), q.get("image"), question_first_line(str(_field(q, "text", where))))
        if key not in by_content:
            raise InputError(f"{where}: no label in {path} for question {qid} ({key[0]}, {key[1]}, {key[2]!r})")
        if qid in labels:
            raise InputError(f"{where}: question_id {qid} repeats in the question file")
        labels[qid], categories[qid] = by_content[key][0], key[0]
    return labels, categories


def _pope_labels_by_id(rows) -> tuple[dict[str, str], dict[str, str]]:
    labels, categories = {}, {}
    for cat, qid, _, _, label, where in rows:
        if qid in labels:
            raise InputError(f"{where}: question_id {qid} is also in another category; the official files "
                             f"number each category from 1, so pass the question file (--questions "
                             f"llava_pope_test.jsonl) to match predictions to labels")
        labels[qid], categories[qid] = label, cat
    return labels, categories


# ------------------------------------------------------------------------------------------------ ScienceQA
def read_scienceqa(path: PathLike, split: str = "test", splits_path: PathLike | None = None) -> dict[str, dict]:
    """ScienceQA problems.json, restricted to a split listed in pid_splits.json (found next to problems.json
    when not given)."""
    problems = load_json(path)
    if not isinstance(problems, dict) or describe(problems) not in ("ScienceQA problems.json", "a JSON object"):
        _refuse(path, problems, "scienceqa", "ScienceQA problems.json (a dict keyed by problem id)")
    splits_path = Path(splits_path) if splits_path else Path(path).with_name("pid_splits.json")
    if splits_path.is_file():
        splits = load_json(splits_path)
        if not isinstance(splits, dict) or split not in splits:
            raise InputError(f"{splits_path}: no split {split!r}")
        ids = [str(p) for p in splits[split]]
        missing = [p for p in ids if p not in problems]
        if missing:
            raise InputError(f"{splits_path}: split {split!r} lists problems not in {path}: {missing[:5]}")
        problems = {p: problems[p] for p in ids}
    for pid, prob in problems.items():
        for key in ("choices", "answer"):
            _field(prob, key, f"{path}: problem {pid}")
    return problems


# ------------------------------------------------------------------------------------------------ NLVR2
_NLVR2_IDENTIFIER = re.compile(r"[^-]+-[^-]+-[^-]+-[^-]+")


def read_nlvr2(path: PathLike) -> dict[str, bool]:
    """NLVR2 labels by identifier: the official JSON lines (test1.json: "label": "True"/"False") or VL-T5's
    list ("label": 1/0). An identifier must be split-set-pair-sentence: consistency groups are made from it."""
    out = {}
    for where, r in load_records(path):
        where = f"{path}: {where}"
        ident = str(_field(r, "identifier", where))
        where = f"{where} (identifier {ident!r})"
        if not _NLVR2_IDENTIFIER.fullmatch(ident):
            raise InputError(f"{where}: not of the form split-set-pair-sentence (e.g. test1-0-1-0)")
        if ident in out:
            raise InputError(f"{where}: repeated identifier")
        label = _field(r, "label", where)
        if isinstance(label, str) and label.lower() in ("true", "false"):
            out[ident] = label.lower() == "true"
        elif label in (0, 1) and not isinstance(label, float):
            out[ident] = bool(label)
        else:
            raise InputError(f"{where}: label {label!r} is not True/False (or VL-T5's 1/0)")
    return out


# ------------------------------------------------------------------------------------------------ captions
def read_coco_captions(path: PathLike, split: str = "test") -> tuple[dict[str, list[str]], dict[str, str]]:
    """Reference captions per image id, in ground-truth image order (the order the official scorers tokenize
    in): COCO caption annotations ({"images", "annotations": [{"image_id", "caption"}]}: the order of
    "images", captions in annotation order) or Karpathy's dataset_coco.json (images of one split, in file
    order; id = cocoid, the file name stem is an alias; "raw" sentences)."""
    data = load_json(path)
    kind = describe(data)
    refs: dict[str, list[str]] = {}
    aliases: dict[str, str] = {}
    if kind == "COCO caption annotations":
        for img in data.get("images", []):
            refs[str(_field(img, "id", f"{path}: image"))] = []
            if "file_name" in img:
                aliases[Path(img["file_name"]).stem] = str(img["id"])
        for i, a in enumerate(data["annotations"]):
            where = f"{path}: annotation {i}"
            image = str(_field(a, "image_id", where))
            refs.setdefault(image, []).append(str(_field(a, "caption", f"{where} (image {image})")))
        empty = [k for k, v in refs.items() if not v]
        refs = {k: v for k, v in refs.items() if v}  # COCOEvalCap scores the images that have captions
        if not refs:
            raise InputError(f"{path}: no captions (images without any: {empty[:3]})")
    elif kind == "Karpathy's dataset_coco.json":
        for i, img in enumerate(data["images"]):
            if img.get("split") != split:
                continue
            key = str(img.get("cocoid", img.get("imgid", i)))
            where = f"{path}: images[{i}] (image {key})"
            sentences = _field(img, "sentences", where)
            refs[key] = [str(_field(s, "raw", where)) for s in sentences]
            if not refs[key]:
                raise InputError(f"{where}: no reference captions")
            if "filename" in img:
                aliases[Path(img["filename"]).stem] = key
        if not refs:
            raise InputError(f"{path}: no images in split {split!r}")
    else:
        _refuse(path, data, "coco_caption", "COCO caption annotations or Karpathy's dataset_coco.json")
    return refs, aliases


def read_value_captions(path: PathLike) -> dict[str, list[str]]:
    """TVC / YC2C (VALUE release JSON lines: {"clip_id", "descs": [{"desc": ...}]}) -> the descriptions of
    each clip, clips in file order."""
    out: dict[str, list[str]] = {}
    for where, r in load_records(path):
        where = f"{path}: {where}"
        clip = str(_field(r, "clip_id", where))
        where = f"{where} (clip {clip})"
        descs = _field(r, "descs", where)
        if not isinstance(descs, list) or not descs:
            raise InputError(f"{where}: no reference descriptions")
        if clip in out:
            raise InputError(f"{where}: clip id repeated")
        out[clip] = [str(_field(d, "desc", where)) for d in descs]
    return out


# ------------------------------------------------------------------------------------------------ video QA
def _answer_index(value, n_choices: int, where: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise InputError(f"{where}: answer_idx {value!r} is not an integer")
    index = int(value)
    if not 0 <= index < n_choices:
        raise InputError(f"{where}: answer_idx {index} is out of range for {n_choices} choices"
                         + (" (is this a TVQA file? TVQA has 5)" if n_choices == 4 else ""))
    return index


def read_value_qa(path: PathLike, n_choices: int) -> tuple[dict[str, int], Optional[dict[str, str]]]:
    """TVQA (5 choices) / How2QA (4): answer index per qid, and the show of each TVQA question.

    Accepts the VALUE release JSON lines ({"qid", "answer_idx", "a0".., "show_name" for TVQA}) and, for TVQA,
    VALUE's solution file ({"solution": {show: {qid: answer_idx}}}). A file of the other task is refused."""
    task = "tvqa" if n_choices == 5 else "how2qa"
    data = _single_json_object(path)
    if data is not None:
        if n_choices != 5 or not isinstance(data.get("solution"), dict):
            _refuse(path, data, task, f"the VALUE {task} release file")
        return _read_tvqa_solution(path, data)
    answers, shows = {}, {}
    for where, r in load_records(path):
        where = f"{path}: {where}"
        qid = str(_field(r, "qid", where))
        where = f"{where} (qid {qid})"
        if n_choices == 4 and ("a4" in r or "show_name" in r):
            raise InputError(f"{where}: has a4/show_name: this is a TVQA file, not How2QA")
        if n_choices == 5 and "a0" in r and "a4" not in r:
            raise InputError(f"{where}: has 4 choices (no a4): this is a How2QA file, not TVQA")
        if qid in answers:
            raise InputError(f"{where}: qid repeated")
        answers[qid] = _answer_index(_field(r, "answer_idx", where), n_choices, where)
        if "show_name" in r:
            shows[qid] = str(r["show_name"])
    if shows and len(shows) != len(answers):
        missing = next(q for q in answers if q not in shows)
        raise InputError(f"{path}: qid {missing} has no show_name while others have one")
    return answers, (shows or None)


def _single_json_object(path: PathLike) -> Optional[dict]:
    """The file's JSON object when it is one (VALUE's TVQA solution file), None for JSON lines or a list."""
    text = read_text(path, "ground-truth file")
    if not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None  # JSON lines
    return data if isinstance(data, dict) and "qid" not in data else None


def _read_tvqa_solution(path: PathLike, data: dict) -> tuple[dict[str, int], dict[str, str]]:
    answers, shows = {}, {}
    for show, by_qid in data["solution"].items():
        if not isinstance(by_qid, dict):
            raise InputError(f"{path}: solution[{show!r}] is not a {{qid: answer_idx}} object")
        for qid, idx in by_qid.items():
            where = f"{path}: solution[{show!r}] (qid {qid})"
            if str(qid) in answers:
                raise InputError(f"{where}: qid repeated")
            answers[str(qid)] = _answer_index(idx, 5, where)
            shows[str(qid)] = show
    return answers, shows
