"""Closed-form answers: GQA, NLVR2, POPE, ScienceQA, multiple-choice video QA (MMBench is in mmbench.py).

Each scorer takes predictions and ground truth keyed by the same string ids and returns plain numbers
(fractions in [0, 1]; the CLI prints them x100). The rules follow the scorers the published numbers came from;
where those scorers are fragile (LLaVA's POPE pairs answers and labels by position) we match by id instead.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


# ----------------------------------------------------------------------------------------------------- GQA
def gqa_normalize(text: str) -> str:
    """LLaVA's scripts/convert_gqa_for_eval.py (haotian-liu/LLaVA c121f04): strip trailing periods, lowercase.
    GQA's eval.py then compares this string with the answer exactly."""
    return text.rstrip(".").lower()


@dataclass(frozen=True)
class GQAQuestion:
    answer: str
    balanced: bool = True  # eval.py scores only questions with isBalanced
    structural: Optional[str] = None  # types.structural: verify, query, choose, logical, compare
    semantic: Optional[str] = None  # types.semantic: attr, cat, global, obj, rel


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _per_group(correct: Mapping[str, bool], group_of: Mapping[str, Optional[str]]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, ok in correct.items():
        if group_of.get(k) is not None:
            groups[group_of[k]].append(ok)
    return {g: _mean(v) for g, v in sorted(groups.items())}


def gqa_scores(predictions: Mapping[str, str], questions: Mapping[str, GQAQuestion], normalize=gqa_normalize) -> dict:
    """GQA's eval.py accuracy numbers: over the balanced questions only, exact match of the (LLaVA-normalised)
    prediction with the answer; also binary (structural type other than 'query') and open ('query') accuracy
    and accuracy per structural and semantic type. Unbalanced questions are ignored."""
    scored = [k for k, q in questions.items() if q.balanced]
    correct = {k: normalize(predictions[k]) == questions[k].answer for k in scored}
    open_ = [ok for k, ok in correct.items() if questions[k].structural == "query"]
    binary = [ok for k, ok in correct.items() if questions[k].structural not in (None, "query")]
    out = {"accuracy": _mean(list(correct.values())), "count": len(scored)}
    if any(questions[k].structural is not None for k in scored):
        out.update(binary=_mean(binary), open=_mean(open_),
                   per_structural_type=_per_group(correct, {k: questions[k].structural for k in scored}),
                   per_semantic_type=_per_group(correct, {k: questions[k].semantic for k in scored}))
    return out


def vlt5_label_accuracy(predictions: Mapping[str, str], labels: Mapping[str, Mapping[str, float]]) -> float:
    """VL-T5's GQAEvaluator (NVlabs/DoRA 7e2f10a, VL-T5/src/gqa_data.py): the prediction's score in the
    question's label dict ({answer: score}), 0 when absent (an empty dict scores 0), averaged."""
    return sum(labels[k].get(predictions[k], 0.0) for k in labels) / len(labels)


def exact_match_accuracy(predictions: Mapping[str, str], answers: Mapping[str, str], normalize=gqa_normalize) -> float:
    return sum(normalize(predictions[k]) == answers[k] for k in answers) / len(answers)


# ----------------------------------------------------------------------------------------------------- NLVR2
_LENIENT_TRUE_FALSE = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def nlvr2_answer(text: str, lenient: bool = False) -> Optional[bool]:
    """The official rule (lil-lab/nlvr 1892484, nlvr2/eval/metrics.py) is `prediction.lower() == label.lower()`
    with labels "True"/"False": only "true"/"false" in any case count. `lenient` also accepts surrounding
    spaces, a final period, yes/no and 1/0 (an opt-in deviation)."""
    if lenient:
        return _LENIENT_TRUE_FALSE.get(text.strip().rstrip(".").strip().lower())
    return {"true": True, "false": False}.get(text.lower())


def nlvr2_group(identifier: str) -> str:
    """The official consistency group: the identifier with its third '-' field blanked
    ('test1-10171-0-0' -> 'test1-10171--0'): all statements about one image pair set."""
    parts = identifier.split("-")
    if len(parts) < 3:
        raise ValueError(f"NLVR2 identifier {identifier!r} does not have the form split-set-pair-sentence")
    parts[2] = ""
    return "-".join(parts)


def nlvr2_scores(predictions: Mapping[str, str], labels: Mapping[str, bool], lenient: bool = False) -> dict:
    """Accuracy, and consistency (the share of groups whose statements are all answered right). Also counts
    the answers that are not "true"/"false" (which the official rule scores wrong), and among them "1"/"0"."""
    correct = {k: nlvr2_answer(predictions[k], lenient) == labels[k] for k in labels}
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, ok in correct.items():
        groups[nlvr2_group(k)].append(ok)
    non_canonical = [k for k in labels if nlvr2_answer(predictions[k]) is None]
    return {"accuracy": _mean(list(correct.values())),
            "consistency": sum(all(g) for g in groups.values()) / len(groups),
            "non_canonical_answers": len(non_canonical),
            "numeric_answers": sum(predictions[k].strip() in ("0", "1") for k in non_canonical),
            "answer_parsing": "lenient" if lenient else "official"}


# ----------------------------------------------------------------------------------------------------- POPE
def pope_answer(text: str) -> str:
    """LLaVA's rule (haotian-liu/LLaVA c121f04, llava/eval/eval_pope.py): keep the text before the first '.',
    drop commas, split on spaces; 'no' if a word is 'No', 'not' or 'no', else 'yes'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def binary_metrics(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict:
    # LLaVA divides by zero when a category has no predicted (or no true) "yes"; such a ratio is 0 here.
    tp = sum(p and l for p, l in zip(predicted_yes, label_yes))
    fp = sum(p and not l for p, l in zip(predicted_yes, label_yes))
    tn = sum(not p and not l for p, l in zip(predicted_yes, label_yes))
    fn = sum(not p and l for p, l in zip(predicted_yes, label_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(label_yes)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(predicted_yes) / n, "count": n}


def pope_scores(predictions: Mapping[str, str], labels: Mapping[str, str], categories: Mapping[str, str]) -> dict:
    """Per category (adversarial / popular / random): accuracy, precision, recall, F1, yes-ratio."""
    by_category: dict[str, list[str]] = defaultdict(list)
    for k in labels:
        by_category[categories[k]].append(k)
    out = {}
    categories_sorted = sorted(by_category)
    for category in categories_sorted:
        ids = by_category[category]
        out[category] = binary_metrics([pope_answer(predictions[k]) == "yes" for k in ids],
                                       [labels[k] == "yes" for k in ids])
    out["mean_f1"] = sum(out[c]["f1"] for c in categories_sorted) / len(by_category)
    out["mean_accuracy"] = sum(out[c]["accuracy"] for c in categories_sorted) / len(by_category)
    return out


# ----------------------------------------------------------------------------------------------------- ScienceQA
OPTION_LETTERS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str, options: Sequence[str] = OPTION_LETTERS) -> Optional[str]:
    """LLaVA's eval_science_qa rules, in order: the exact letter; 'X. ...'; one 'The answer is X.'."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def scienceqa_scores(predictions: Mapping[str, str], problems: Mapping[str, dict]) -> dict:
    """Accuracy over all problems and over those with an image (the IMG column of LLaVA's tables)."""
    correct_all, correct_img, n_img = 0, 0, 0
    for pid, prob in problems.items():
        letter = scienceqa_letter(predictions[pid])
        n = len(prob["choices"])
        index = OPTION_LETTERS.index(letter) if letter in OPTION_LETTERS[:n] else -1
        ok = index == prob["answer"]
        correct_all += ok
        if prob.get("image"):
            n_img += 1
            correct_img += ok
    return {"accuracy": correct_all / len(problems), "img_accuracy": correct_img / n_img if n_img else 0.0,
            "count": len(problems), "img_count": n_img}


# ----------------------------------------------------------------------------------------------------- video QA
_LENIENT_CHOICE = re.compile(r"^\s*a?(\d+)\s*\.?\s*$", re.IGNORECASE)


def choice_index(text: str, n_choices: int, lenient: bool = False) -> Optional[int]:
    """VL-BART answers "a{k}". The official rules (VALUE-Leaderboard/EvaluationTools 10fc2d4 compares the
    index; NVlabs/DoRA 7e2f10a, VL-T5/src/video/tvqa_data.py, compares the text with f"a{answer_idx}") count
    exactly "a0" .. "a{n-1}". `lenient` also accepts "A3", "3", "a3.", "a03" and spaces (opt-in)."""
    if lenient:
        m = _LENIENT_CHOICE.match(text)
        k = int(m.group(1)) if m else -1
    else:
        k = next((i for i in range(n_choices) if text == f"a{i}"), -1)
    return k if 0 <= k < n_choices else None


def multiple_choice_scores(predictions: Mapping[str, str], answers: Mapping[str, int], n_choices: int,
                           groups: Optional[Mapping[str, str]] = None, lenient: bool = False) -> dict:
    """Accuracy of the predicted choice index (TVQA: 5 choices, How2QA: 4), per group (TVQA: show) when given,
    and the number of answers that are not exactly "a{k}" (scored wrong by the official rule)."""
    correct = {k: choice_index(predictions[k], n_choices, lenient) == answers[k] for k in answers}
    out = {"accuracy": _mean(list(correct.values())),
           "non_canonical_answers": sum(choice_index(predictions[k], n_choices) is None for k in answers),
           "answer_parsing": "lenient" if lenient else "official"}
    if groups:
        out["per_group"] = _per_group(correct, groups)
    return out
