"""Submission files for the splits that only an evaluation server scores.

- VQAv2 test-dev / test-std (EvalAI): a JSON list of {"question_id": int, "answer": str} covering every
  question of the test2015 question file; answers are passed through the EvalAI processor, as LLaVA does.
- VizWiz test (EvalAI): a JSON list of {"image": file name, "answer": str}; every question must be answered.
- MMBench test (OpenCompass): the question TSV without hint/category/source/image/comment/l2-category columns,
  plus a "prediction" column, as .xlsx.
"""
from __future__ import annotations

import json
from pathlib import Path

from .predictions import InputError, read_predictions, write_text
from .readers import iter_jsonl, load_json
from .vqa import evalai_normalize


def _question_ids(path: Path, key: str) -> list[str]:
    """Question ids from an official question JSON ({"questions": [...]}, or a list) or a LLaVA question JSONL."""
    if path.suffix == ".jsonl":
        return [str(r[key]) for _, r in iter_jsonl(path)]
    data = load_json(path)
    records = data["questions"] if isinstance(data, dict) and "questions" in data else data
    return [str(r[key]) for r in records]


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


def mmbench_submission(predictions: Path, questions: Path, out: Path) -> dict:
    import pandas as pd
    preds = read_predictions(predictions).text
    table = pd.read_table(questions)
    if "index" not in table.columns:
        raise InputError(f"{questions}: not an MMBench TSV (no 'index' column)")
    missing = [str(i) for i in table["index"] if str(i) not in preds]
    if missing:
        raise InputError(f"{predictions}: {len(missing)} MMBench questions unanswered, e.g. {missing[:5]}")
    table = table.drop(columns=[c for c in ("hint", "category", "source", "image", "comment", "l2-category")
                                if c in table.columns])
    table.insert(min(6, len(table.columns)), "prediction", [preds[str(i)] for i in table["index"]])
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_excel(out, index=False, engine="openpyxl")
    return {"questions": len(table), "file": str(out)}


SUBMISSIONS = {"vqav2": vqav2_submission, "vizwiz": vizwiz_submission, "mmbench": mmbench_submission}
