"""Submission files for the splits that only an evaluation server scores.

- VQAv2 test-dev / test-std (EvalAI): a JSON list of {"question_id": int, "answer": str} covering every
  question of the test2015 question file; answers are passed through the EvalAI processor, as LLaVA does.
- VizWiz test (EvalAI): a JSON list of {"image": file name, "answer": str}; every question must be answered.
- MMBench test (OpenCompass): the question TSV without hint/category/source/image/comment/l2-category columns,
  plus a "prediction" column, as .xlsx.
- VALUE (TVQA, How2QA, TVC, YC2C test; VALUE-Leaderboard/EvaluationTools 10fc2d4 README and sample submission):
  TVQA / How2QA `{task}_test[_public]_predictions.json` = {"qid": answer index} (the index read from the answer
  text by ANSWER_PARSINGS); TVC / YC2C
  `{task}_test_predictions.jsonl`, one {"vid_name", "clip_id", ("ts" for TVC), "descs": [{"desc": caption}]} per
  clip. The server takes a zip with one folder per task holding its val and test files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .files import InputError, iter_jsonl, load_json, write_text
from .predictions import read_predictions
from .vqa import evalai_normalize


def _question_ids(path: Path, key: str) -> list[str]:
    """Question ids from an official question JSON ({"questions": [...]}, or a list) or a LLaVA question JSONL."""
    if path.suffix == ".jsonl":
        records = [(f"{path}:{n}", r) for n, r in iter_jsonl(path, "question file")]
    else:
        data = load_json(path, "question file")
        data = data["questions"] if isinstance(data, dict) and "questions" in data else data
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a question list or {{'questions': [...]}}")
        records = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    for where, r in records:
        if not isinstance(r, dict) or key not in r:
            raise InputError(f"{where}: no {key!r} field")
    return [str(r[key]) for _, r in records]


def vqav2_submission(predictions: Path, questions: Path, out: Path) -> dict:
    preds = read_predictions(predictions).text
    ids = _question_ids(questions, "question_id")
    unknown = set(preds) - set(ids)
    if unknown:
        raise InputError(f"{predictions}: {len(unknown)} ids are not in {questions}, e.g. {sorted(unknown)[:5]}")
    # test-dev answers are scored inside the full test2015 file; the other questions are sent empty.
    write_text(out, json.dumps([{"question_id": int(q), "answer": evalai_normalize(preds.get(q, ""))} for q in ids]))
    return {"questions": len(ids), "answered": len(preds), "empty": len(ids) - len(preds), "file": str(out)}


def vizwiz_submission(predictions: Path, questions: Path, out: Path) -> dict:
    preds = read_predictions(predictions).text
    images = _question_ids(questions, "image")
    by_stem = {Path(i).stem: i for i in images}
    answers = {}
    for qid, text in preds.items():
        image = qid if qid in images else by_stem.get(qid)
        if image is None:
            raise InputError(f"{predictions}: id {qid!r} is not an image of {questions}")
        answers[image] = text
    missing = [i for i in images if i not in answers]
    if missing:
        raise InputError(f"{predictions}: {len(missing)} VizWiz questions unanswered, e.g. {missing[:5]}; "
                         f"the server needs all of them")
    write_text(out, json.dumps([{"image": i, "answer": evalai_normalize(answers[i])} for i in images]))
    return {"questions": len(images), "file": str(out)}


def mmbench_submission(predictions: Path, questions: Path, out: Path, circular: bool = False) -> dict:
    """LLaVA's scripts/convert_mmbench_for_submission.py: the question TSV without hint/category/source/image/
    comment/l2-category, a "prediction" column inserted at position 6, as .xlsx. With `circular`, a TSV that
    has no rotated copies gets them (rows index + k*1e6, options shifted as in MMBench's files)."""
    import pandas as pd

    from .mmbench import MMBENCH_OFFSET, build_choices, read_mmbench_table

    preds = read_predictions(predictions).text
    table = read_mmbench_table(questions, need_answers=False)
    if circular and (table["index"] >= MMBENCH_OFFSET).any():
        circular = False  # the official TSVs already hold their copies
    if circular:
        table = pd.concat([table, *_rotated_copies(table, build_choices)], ignore_index=True)
    missing = [str(i) for i in table["index"] if str(i) not in preds]
    if missing:
        raise InputError(f"{predictions}: {len(missing)} MMBench questions unanswered, e.g. {missing[:5]}")
    unknown = [q for q in preds if q not in set(map(str, table["index"]))]
    if unknown:
        raise InputError(f"{predictions}: {len(unknown)} ids are not in {questions}, e.g. {unknown[:5]}")
    table = table.drop(columns=[c for c in ("hint", "category", "source", "image", "comment", "l2-category")
                                if c in table.columns])
    table.insert(min(6, len(table.columns)), "prediction", [preds[str(i)] for i in table["index"]])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_excel(out, index=False, engine="openpyxl")
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}") from None
    return {"questions": len(table), "file": str(out)}


def _rotated_copies(table, build_choices):
    """Copy k (k = 1 .. n-1) of every row: options texts[-k:] + texts[:-k], index + k*1e6, answer moved."""
    from .mmbench import MMBENCH_OFFSET
    copies = []
    for k in range(1, 26):
        rows = []
        for row in table.to_dict("records"):
            letters = list(build_choices(row))
            if k >= len(letters):
                continue
            texts = [row[c] for c in letters]
            rotated = dict(row, index=row["index"] + k * MMBENCH_OFFSET, **dict(zip(letters, texts[-k:] + texts[:-k])))
            if isinstance(row.get("answer"), str) and row["answer"] in letters:
                rotated["answer"] = letters[(letters.index(row["answer"]) + k) % len(letters)]
            rows.append(rotated)
        if not rows:
            break
        copies.append(type(table)(rows, columns=table.columns))
    return copies


def _value_records(path: Path, key: str) -> list[dict]:
    records = []
    for n, r in iter_jsonl(path, "question file"):
        if not isinstance(r, dict) or key not in r:
            raise InputError(f"{path}:{n}: no {key!r} field")
        records.append(r)
    return records


def _covered(predictions: Path, preds: dict, ids: list[str], questions: Path, what: str) -> None:
    unknown = set(preds) - set(ids)
    if unknown:
        raise InputError(f"{predictions}: {len(unknown)} ids are not in {questions}, e.g. {sorted(unknown)[:5]}")
    missing = [i for i in ids if i not in preds]
    if missing:
        raise InputError(f"{predictions}: {len(missing)} {what} unanswered, e.g. {missing[:5]}; the VALUE server "
                         f"needs all of them")


# How a VALUE QA answer text becomes the submitted index:
# "official": NVlabs/DoRA's multitask_video.py, int(text[1]), 0 when that fails ("a3." -> 3, "b7" -> 7, "a" -> 0):
#   what produced the paper's test numbers;
# "exact": only an exact "a{k}" with k a choice is an answer (the rule the val scorers apply); any other text is
#   written as -1, which the server counts wrong, rather than a guessed index.
ANSWER_PARSINGS = ("official", "exact")


def value_answer_index(text: str, n_choices: int, parsing: str) -> int:
    if parsing == "official":
        try:
            return int(text[1])
        except (IndexError, ValueError):
            return 0
    m = re.fullmatch(r"a(\d)", text)
    return int(m.group(1)) if m and int(m.group(1)) < n_choices else -1


def _value_qa_submission(n_choices: int):
    def write(predictions: Path, questions: Path, out: Path, answer_parsing: str = "exact") -> dict:
        """{qid: index}, the index read from the answer by `answer_parsing` (ANSWER_PARSINGS); the answers that
        are not exactly "a{k}" are counted."""
        if answer_parsing not in ANSWER_PARSINGS:
            raise InputError(f"answer parsing must be one of {ANSWER_PARSINGS}, not {answer_parsing!r}")
        preds = read_predictions(predictions).text
        qids = [str(r["qid"]) for r in _value_records(questions, "qid")]
        _covered(predictions, preds, qids, questions, "questions")
        answers, other = {}, 0
        for qid in qids:
            answers[qid] = value_answer_index(preds[qid], n_choices, answer_parsing)
            other += value_answer_index(preds[qid], n_choices, "exact") == -1
        write_text(out, json.dumps(answers))
        return {"questions": len(qids), "non_canonical_answers": other, "answer_parsing": answer_parsing,
                "file": str(out)}
    return write


def _value_caption_submission(with_ts: bool):
    def write(predictions: Path, questions: Path, out: Path) -> dict:
        """One line per clip of the question file, in its order, the caption as the clip's one description."""
        preds = read_predictions(predictions).text
        clips = _value_records(questions, "clip_id")
        _covered(predictions, preds, [str(c["clip_id"]) for c in clips], questions, "clips")
        lines = []
        for c in clips:
            row = {"vid_name": c.get("vid_name"), "clip_id": c["clip_id"]}
            if with_ts:
                row["ts"] = c.get("ts")
            row["descs"] = [{"desc": preds[str(c["clip_id"])]}]
            lines.append(json.dumps(row))
        write_text(out, "".join(line + "\n" for line in lines))
        return {"clips": len(clips), "file": str(out)}
    return write


SUBMISSIONS = {"vqav2": vqav2_submission, "vizwiz": vizwiz_submission, "mmbench": mmbench_submission,
               "tvqa": _value_qa_submission(5), "how2qa": _value_qa_submission(4),
               "tvc": _value_caption_submission(with_ts=True), "yc2c": _value_caption_submission(with_ts=False)}
