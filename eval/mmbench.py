"""MMBench: the TSV as VLMEvalKit reads it, its rule-based answer matching, and circular evaluation.

Follows open-compass/VLMEvalKit at commit e8e78f05e3080fe28154f2130321f17951c3be94 (vlmeval/utils/
matching_util.py: can_infer_option / can_infer_text / can_infer; vlmeval/dataset/utils/multiple_choice.py:
build_choices, mcq_circular_eval, report_acc), in its `exact_matching` mode (no LLM judge):

- The TSV is read with pandas' defaults, as VLMEvalKit's `load` does, so an option cell is missing exactly
  when pandas reads it as NA ("", "NA", "N/A", "nan", "None", "null", ...; but not "none"), and a numeric
  column is matched as pandas prints it ("1.50" -> "1.5").
- The official dev TSV already holds the circular copies of each question: rows with index + k * 1e6 whose
  options are rotated (copy k shows texts[-k:] + texts[:-k]; a question may have fewer copies than options).
  A question (index % 1e6) counts as right only if every copy in the file is answered right.
"""
from __future__ import annotations

import io
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from .files import InputError, PathLike, read_text

MMBENCH_OFFSET = 1_000_000


@dataclass(frozen=True)
class MMBenchQuestion:
    index: int
    answer: str  # the correct letter of this (possibly rotated) copy
    choices: dict[str, Any] = field(default_factory=dict)  # letter -> option as pandas read it
    category: str = ""
    l2_category: str = ""
    split: str = ""

    @property
    def group(self) -> int:
        return self.index % MMBENCH_OFFSET


# ------------------------------------------------------------------------------------------------ reading
def read_mmbench_table(path: PathLike, need_answers: bool = True):
    """The TSV as a pandas DataFrame (pandas' default NA handling, as VLMEvalKit), with `index` checked to be
    an integer on every row."""
    import pandas as pd

    text = read_text(path, "MMBench TSV")  # clear errors for bad bytes; drops a byte-order mark
    try:
        table = pd.read_csv(io.StringIO(text), sep="\t", dtype={"index": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: not a readable TSV ({str(e).strip()})") from None
    missing = [c for c in ("index", "A", "B") + (("answer",) if need_answers else ()) if c not in table.columns]
    if missing:
        hint = " (MMBench test has no answers: write a submission with `submit mmbench`)" if "answer" in missing else ""
        raise InputError(f"{path}: not an MMBench TSV: no {missing} column{hint}; columns: {list(table.columns)[:12]}")
    for row, value in enumerate(table["index"], start=1):
        if not isinstance(value, str) or not re.fullmatch(r"\s*\d+\s*", value):
            raise InputError(f"{path}: data row {row} (line {row + 1}): index {value!r} is not an integer")
    table["index"] = [int(v) for v in table["index"]]
    duplicated = table["index"][table["index"].duplicated()]
    if len(duplicated):
        raise InputError(f"{path}: index {int(duplicated.iloc[0])} appears on more than one row")
    return table


def _text(value) -> str:
    import pandas as pd
    return "" if pd.isna(value) else str(value)


def build_choices(row: Mapping) -> dict[str, Any]:
    """VLMEvalKit's build_choices: every letter column whose cell is not NA, in letter order."""
    import pandas as pd
    return {c: row[c] for c in string.ascii_uppercase if c in row and not pd.isna(row[c])}


def read_mmbench(path: PathLike) -> dict[str, MMBenchQuestion]:
    """Questions of an MMBench dev TSV keyed by str(index), rotated copies included as they are in the file."""
    table = read_mmbench_table(path)
    out = {}
    for row_number, row in enumerate(table.to_dict("records"), start=1):
        index, choices = row["index"], build_choices(row)
        answer = row["answer"]
        if not isinstance(answer, str) or answer not in choices:
            raise InputError(f"{path}: data row {row_number} (line {row_number + 1}), index {index}: answer "
                             f"{answer!r} is not one of its options {sorted(choices)}")
        out[str(index)] = MMBenchQuestion(index, answer, choices, _text(row.get("category")),
                                          _text(row.get("l2-category")), _text(row.get("split")))
    return out


def has_circular_copies(questions: Mapping[str, MMBenchQuestion]) -> bool:
    return any(q.index >= MMBENCH_OFFSET for q in questions.values())


def circular_copies(questions: Mapping[str, MMBenchQuestion]) -> dict[str, MMBenchQuestion]:
    """For a file without copies: add copy k = 1 .. n-1 of each n-option question, options shifted as in
    MMBench's files (texts[-k:] + texts[:-k]), index + k * 1e6, the answer letter moved with its option."""
    if has_circular_copies(questions):
        raise ValueError("the questions already hold their circular copies")
    out = dict(questions)
    for q in questions.values():
        letters = list(q.choices)
        texts = [q.choices[c] for c in letters]
        position = letters.index(q.answer)
        for k in range(1, len(letters)):
            index = q.index + k * MMBENCH_OFFSET
            out[str(index)] = replace(q, index=index, answer=letters[(position + k) % len(letters)],
                                      choices=dict(zip(letters, texts[-k:] + texts[:-k])))
    return out


# ------------------------------------------------------------------------------------------------ matching
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
_OPTION_PUNCTUATION = ".()[],:;!*#{}"
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: Mapping[str, Any]) -> Optional[str]:
    """A letter read off the answer (VLMEvalKit's can_infer_option, its VERBOSE logging switch off):
    'Z' (never right) for its refusal strings or a standalone 'Z'; the one choice letter that is a word among
    the last four words (after its punctuation becomes spaces); else 'answer is X' (case-insensitive)."""
    if _API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    words = answer.translate(str.maketrans(_OPTION_PUNCTUATION, " " * len(_OPTION_PUNCTUATION))).split()
    present = [c for c in choices if c in words]
    if len(present) == 1:
        if words.index(present[0]) > len(words) - 5:
            return present[0]
    elif not present and "Z" in words:
        return "Z"
    match = _VERBOSE_ANSWER.search(answer)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, Any]) -> Optional[str]:
    """The one option whose (lowercased) text is in the lowercased answer, unless the answer is longer than
    twice all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):  # lengths before lowercasing, as VLMEvalKit
        return None
    hits = [c for c, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def infer_choice(answer: str, choices: Mapping[str, Any]) -> Optional[str]:
    """VLMEvalKit's can_infer: the option rule, then the text rule."""
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


# ------------------------------------------------------------------------------------------------ scoring
def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _by(hits: Mapping[int, bool], key_of: Mapping[int, str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for g, ok in hits.items():
        groups[key_of[g]].append(ok)
    return {k: _mean(v) for k, v in sorted(groups.items())}


def mmbench_scores(predictions: Mapping[str, str], questions: Mapping[str, MMBenchQuestion]) -> dict:
    """Circular accuracy as VLMEvalKit's mcq_circular_eval + report_acc compute it: one hit per main question
    (index < 1e6) that is right on every copy present; overall, per split, per l2-category and per category.
    `single_pass_accuracy` is the share of main questions answered right on their first copy."""
    copies: dict[int, list[MMBenchQuestion]] = defaultdict(list)
    for q in questions.values():
        copies[q.group].append(q)
    main = {q.index: q for q in questions.values() if q.index < MMBENCH_OFFSET}  # copies without it: not scored

    def right(q: MMBenchQuestion) -> bool:
        return infer_choice(predictions[str(q.index)], q.choices) == q.answer

    hits = {g: all(right(c) for c in copies[g]) for g in main}
    out = {"circular_accuracy": _mean(hits.values()),
           "single_pass_accuracy": _mean(right(q) for q in main.values()),
           "questions": len(main), "max_copies": max((len(copies[g]) for g in main), default=0)}
    splits = {q.split for q in main.values()}
    if len(splits) > 1:
        out["per_split"] = _by(hits, {g: q.split for g, q in main.items()})
    out["per_l2_category"] = _by(hits, {g: q.l2_category for g, q in main.items()})
    out["per_category"] = _by(hits, {g: q.category for g, q in main.items()})
    return out
