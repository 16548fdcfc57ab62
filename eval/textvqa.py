"""TextVQA: predictions matched to questions the way LLaVA's evaluator does, or by question id.

LLaVA's question file (llava_textvqa_val_v051_ocr.jsonl) uses the IMAGE id as question_id, so its answer
files repeat ids. LLaVA's llava/eval/eval_textvqa.py (haotian-liu/LLaVA c121f04) therefore keys each answer
by (question_id = image id, the question parsed back out of the answer's "prompt", lowercased) and each
annotation by (image_id, question lowercased). Predictions whose ids are TextVQA question ids (unique) are
matched by id instead.
"""
from __future__ import annotations

import re
from typing import Sequence

from .files import InputError
from .predictions import Coverage, PredictionRecord, check_coverage, match_ids, predictions_from_records

_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str | None:
    """LLaVA's prompt_processor: the question of a TextVQA prompt, lowercased (None where LLaVA asserts)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def match_textvqa(path, records: Sequence[PredictionRecord], questions: Sequence[dict],
                  allow_partial: bool) -> tuple[dict[str, str], Coverage, str]:
    """Predictions keyed by TextVQA question id, the coverage, and how they were matched
    ("question_id" or "image_id+prompt")."""
    question_ids = {q["question_id"] for q in questions}
    image_ids = {q["image_id"] for q in questions}
    if all(r.id in question_ids for r in records) or not any(r.id in image_ids for r in records):
        # ids that are unique by format: strict (a repeated or unknown id is an error)
        matched, coverage = match_ids(predictions_from_records(path, records), [q["question_id"] for q in questions],
                                      allow_partial)
        return matched, coverage, "question_id"
    matched = _match_by_image_and_prompt(path, records, questions)
    missing = [q["question_id"] for q in questions if q["question_id"] not in matched]
    check_coverage(path, len(matched), len(questions), missing, allow_partial)
    empty = sum(1 for r in records if not r.text.strip())
    return matched, Coverage(len(matched), len(questions), missing, empty), "image_id+prompt"


def _match_by_image_and_prompt(path, records, questions) -> dict[str, str]:
    by_key: dict[tuple[str, str], list[dict]] = {}
    for q in questions:
        by_key.setdefault((q["image_id"], q["question"].lower()), []).append(q)
    matched: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for r in records:
        where = f"{path}:{r.line} (question_id {r.id!r})"
        prompt = r.record.get("prompt")
        if not isinstance(prompt, str):
            raise InputError(f"{where}: the ids are not TextVQA question ids, and there is no 'prompt' to match "
                             f"on (LLaVA's answer files key TextVQA by image id + the prompt's question)")
        question = question_from_prompt(prompt)
        if question is None:
            raise InputError(f"{where}: cannot find the question in the prompt {prompt[:80]!r} (LLaVA's TextVQA "
                             f"prompt formats: 'question\\nanswer format', with 'Reference OCR token: ' lines, "
                             f"or 'OCR tokens: ... Question: ... Short answer:')")
        candidates = by_key.get((r.id, question), [])
        if not candidates:
            raise InputError(f"{where}: no question {question!r} on image {r.id!r} in the ground truth")
        if len(candidates) > 1:
            raise InputError(f"{where}: image {r.id!r} has {len(candidates)} questions {question!r} in the ground "
                             f"truth ({', '.join(c['where'] for c in candidates[:2])}); the match is ambiguous")
        qid = candidates[0]["question_id"]
        if qid in matched:
            raise InputError(f"{where}: answers the same question as line {line_of[qid]} (image {r.id!r}, "
                             f"{question!r})")
        matched[qid], line_of[qid] = r.text, r.line
    return matched
