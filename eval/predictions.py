"""Prediction files: LLaVA's answer-file JSONL, one {"question_id": ..., "text": ...} per line.

Reading is strict where a silent mistake would change a score: a malformed line, a line without
question_id / text, a duplicate id, or an id that is not in the ground truth is an error naming the file, line
and id. An empty answer is allowed (the official scorers score it as a wrong answer) but counted and reported.
Ids are compared as strings, so 123 and "123" are the same question.

A few benchmarks reuse ids on purpose (LLaVA's TextVQA question file uses the image id as question_id); their
tasks read `read_prediction_records` and key the records themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .files import InputError, PathLike, iter_jsonl


@dataclass(frozen=True)
class PredictionRecord:
    line: int
    id: str
    text: str
    record: dict  # the whole line, for the fields some tasks need (LLaVA's "prompt")


@dataclass
class Predictions:
    path: Path
    text: dict[str, str]  # id -> answer text, in file order
    line_of: dict[str, int]  # id -> line number, for messages
    empty: list[str] = field(default_factory=list)  # ids whose answer is empty

    def __len__(self) -> int:
        return len(self.text)

    def where(self, qid: str) -> str:
        return f"{self.path}:{self.line_of[qid]}"


def read_prediction_records(path: PathLike, id_key: str = "question_id", text_key: str = "text") -> list[PredictionRecord]:
    path = Path(path)
    records = []
    for n, record in iter_jsonl(path, "prediction file"):
        if not isinstance(record, dict) or id_key not in record or text_key not in record:
            raise InputError(f"{path}:{n}: expected an object with {id_key!r} and {text_key!r}, got "
                             f"{str(record)[:120]}")
        qid, answer = str(record[id_key]), record[text_key]
        if not isinstance(answer, str):
            raise InputError(f"{path}:{n}: {text_key!r} of {qid!r} is {type(answer).__name__}, not a string")
        records.append(PredictionRecord(n, qid, answer, record))
    if not records:
        raise InputError(f"{path}: no predictions")
    return records


def predictions_from_records(path: PathLike, records: Iterable[PredictionRecord], id_key: str = "question_id") -> Predictions:
    """Records keyed by id; a repeated id is an error naming both lines."""
    text: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for r in records:
        if r.id in text:
            raise InputError(f"{path}:{r.line}: duplicate {id_key} {r.id!r} (first on line {line_of[r.id]})")
        text[r.id], line_of[r.id] = r.text, r.line
    return Predictions(Path(path), text, line_of, [q for q, t in text.items() if not t.strip()])


def read_predictions(path: PathLike, id_key: str = "question_id", text_key: str = "text") -> Predictions:
    return predictions_from_records(path, read_prediction_records(path, id_key, text_key), id_key)


@dataclass
class Coverage:
    predicted: int
    expected: int
    missing: list[str]
    empty: int

    @property
    def fraction(self) -> float:
        return self.predicted / self.expected if self.expected else 0.0

    def to_dict(self) -> dict:
        return {"predicted": self.predicted, "expected": self.expected, "fraction": self.fraction,
                "missing": len(self.missing), "empty_answers": self.empty}


def match_ids(predictions: Predictions, expected: Iterable[str], allow_partial: bool,
              aliases: Mapping[str, str] | None = None) -> tuple[dict[str, str], Coverage]:
    """Predictions keyed by ground-truth id (in prediction-file order), and the coverage.

    `aliases` maps other accepted spellings of an id (e.g. an image file name for its numeric id) to the
    ground-truth id. Ids not in the ground truth are an error; missing ids are an error unless
    `allow_partial`, and then the score covers the predicted subset only (reported as coverage).
    """
    expected = list(expected)
    known = set(expected)
    aliases = aliases or {}
    matched: dict[str, str] = {}
    unknown = []
    for qid, answer in predictions.text.items():
        key = qid if qid in known else aliases.get(qid)
        if key is None:
            unknown.append(qid)
            continue
        if key in matched:
            raise InputError(f"{predictions.where(qid)}: {qid!r} names the same question as another line ({key!r})")
        matched[key] = answer
    if unknown:
        where = ", ".join(f"{q!r} (line {predictions.line_of[q]})" for q in unknown[:5])
        raise InputError(f"{predictions.path}: {len(unknown)} ids are not in the ground truth, e.g. {where}; "
                         f"is this the right ground-truth file?")
    missing = [q for q in expected if q not in matched]
    check_coverage(predictions.path, len(matched), len(expected), missing, allow_partial)
    return matched, Coverage(len(matched), len(expected), missing, len(predictions.empty))


def check_coverage(path: PathLike, predicted: int, expected: int, missing: list, allow_partial: bool) -> None:
    if missing and not allow_partial:
        raise InputError(f"{path}: {len(missing)} of {expected} questions have no prediction, "
                         f"e.g. {missing[:5]}; score them all, or pass --allow-partial to score the "
                         f"{predicted} predicted ones (coverage is reported)")
