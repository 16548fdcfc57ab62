"""Prediction files: LLaVA's answer-file JSONL, one {"question_id": ..., "text": ...} per line.

Reading is strict where a silent mistake would change a score: a malformed line, a line without
question_id / text, a duplicate id, or an id that is not in the ground truth is an error naming the file, line
and id. An empty answer is allowed (the official scorers score it as a wrong answer) but counted and reported.
Ids are compared as strings, so 123 and "123" are the same question.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Union

PathLike = Union[str, Path]


class InputError(ValueError):
    """A prediction or ground-truth file that cannot be scored as it is."""


@dataclass
class Predictions:
    path: Path
    text: dict[str, str]  # id -> answer text
    line_of: dict[str, int]  # id -> line number, for messages
    empty: list[str] = field(default_factory=list)  # ids whose answer is empty

    def __len__(self) -> int:
        return len(self.text)


def read_predictions(path: PathLike, id_key: str = "question_id", text_key: str = "text") -> Predictions:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prediction file {path} not found")
    text: dict[str, str] = {}
    line_of: dict[str, int] = {}
    empty: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or id_key not in record or text_key not in record:
                raise InputError(f"{path}:{n}: expected an object with {id_key!r} and {text_key!r}, got "
                                 f"{line.strip()[:120]}")
            qid = str(record[id_key])
            if qid in text:
                raise InputError(f"{path}:{n}: duplicate {id_key} {qid!r} (first on line {line_of[qid]})")
            answer = record[text_key]
            if not isinstance(answer, str):
                raise InputError(f"{path}:{n}: {text_key!r} of {qid!r} is {type(answer).__name__}, not a string")
            if not answer.strip():
                empty.append(qid)
            text[qid] = answer
            line_of[qid] = n
    if not text:
        raise InputError(f"{path}: no predictions")
    return Predictions(path, text, line_of, empty)


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
    """Predictions keyed by ground-truth id, and the coverage.

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
            raise InputError(f"{predictions.path}:{predictions.line_of[qid]}: {qid!r} names the same question "
                             f"as another line ({key!r})")
        matched[key] = answer
    if unknown:
        where = ", ".join(f"{q!r} (line {predictions.line_of[q]})" for q in unknown[:5])
        raise InputError(f"{predictions.path}: {len(unknown)} ids are not in the ground truth, e.g. {where}; "
                         f"is this the right ground-truth file?")
    missing = [q for q in expected if q not in matched]
    if missing and not allow_partial:
        raise InputError(f"{predictions.path}: {len(missing)} of {len(expected)} questions have no prediction, "
                         f"e.g. {missing[:5]}; score them all, or pass --allow-partial to score the "
                         f"{len(matched)} predicted ones (coverage is reported)")
    return matched, Coverage(len(matched), len(expected), missing, len(predictions.empty))


def write_text(path: PathLike, text: str) -> None:
    """Write a file under a temporary name and rename it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_jsonl(path: PathLike, records: Iterable[Mapping]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
