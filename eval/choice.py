"""Closed-form answers: GQA exact match, NLVR2, POPE, ScienceQA, MMBench, multiple-choice video QA.

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
    """LLaVA's convert_gqa_for_eval: strip trailing periods, lowercase. (The official eval.py compares the
    prediction string as given; the ground-truth answers are lowercase without periods.)"""
    return text.rstrip(".").lower()


def exact_match_accuracy(predictions: Mapping[str, str], answers: Mapping[str, str], normalize=gqa_normalize) -> float:
    return sum(normalize(predictions[k]) == answers[k] for k in answers) / len(answers)


# ----------------------------------------------------------------------------------------------------- NLVR2
def parse_true_false(text: str) -> Optional[bool]:
    word = text.strip().rstrip(".").lower()
    return {"true": True, "false": False, "yes": True, "no": False}.get(word)


def nlvr2_group(identifier: str) -> str:
    """The official consistency group: the identifier with its third '-' field blanked
    ('test1-10171-0-0' -> 'test1-10171--0'): all statements about one image pair set."""
    parts = identifier.split("-")
    if len(parts) < 3:
        raise ValueError(f"NLVR2 identifier {identifier!r} does not have the form split-set-pair-sentence")
    parts[2] = ""
    return "-".join(parts)


def nlvr2_scores(predictions: Mapping[str, str], labels: Mapping[str, bool]) -> dict:
    """Accuracy, and consistency: the share of groups whose statements are all answered right."""
    correct = {k: parse_true_false(predictions[k]) == labels[k] for k in labels}
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, ok in correct.items():
        groups[nlvr2_group(k)].append(ok)
    return {"accuracy": sum(correct.values()) / len(correct),
            "consistency": sum(all(g) for g in groups.values()) / len(groups)}


# ----------------------------------------------------------------------------------------------------- POPE
def pope_answer(text: str) -> str:
    """LLaVA's rule: keep the first sentence, drop commas; 'no' if a word is 'No', 'not' or 'no', else 'yes'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def binary_metrics(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict:
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
    for category in sorted(by_category):
        ids = by_category[category]
        out[category] = binary_metrics([pope_answer(predictions[k]) == "yes" for k in ids],
                                       [labels[k] == "yes" for k in ids])
    out["mean_f1"] = sum(v["f1"] for v in out.values()) / len(by_category)
    out["mean_accuracy"] = sum(out[c]["accuracy"] for c in by_category) / len(by_category)
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


# ----------------------------------------------------------------------------------------------------- MMBench
MMBENCH_OFFSET = 1_000_000
_MC_STRIP = re.compile(r"[.()\[\],:;!*#{}]")


def choice_letter(text: str, choices: Mapping[str, str]) -> Optional[str]:
    """A choice letter from a free-form answer, by rule (no LLM judge), as VLMEvalKit's matching does:
    1. punctuation to spaces; if exactly one choice letter appears as a word, among the last four words, it is
       the answer; 2. otherwise, if exactly one option's text is a substring of the (lowercased) answer and the
    answer is not more than twice as long as all options together, that option."""
    words = _MC_STRIP.sub(" ", text).split()
    letters = {w for w in words if w in choices}
    if len(letters) == 1:
        (letter,) = letters
        if words.index(letter) > len(words) - 5:
            return letter
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


@dataclass
class MMBenchQuestion:
    index: int
    answer: str  # the correct letter for this (possibly rotated) copy
    choices: dict[str, str]  # letter -> option text
    category: str = ""


def mmbench_scores(predictions: Mapping[str, str], questions: Mapping[str, MMBenchQuestion]) -> dict:
    """Single-pass accuracy over the main questions (index < 1e6), and circular accuracy: a group (index % 1e6)
    counts only if every rotated copy present is answered right. Per-category circular accuracy too."""
    groups: dict[int, list[bool]] = defaultdict(list)
    single, categories = [], {}
    for qid, q in questions.items():
        ok = choice_letter(predictions[qid], q.choices) == q.answer
        groups[q.index % MMBENCH_OFFSET].append(ok)
        if q.index < MMBENCH_OFFSET:
            single.append(ok)
            categories[q.index] = q.category
    circular = {g: all(v) for g, v in groups.items()}
    per_category: dict[str, list[bool]] = defaultdict(list)
    for g, ok in circular.items():
        per_category[categories.get(g, "")].append(ok)
    rotations = max(len(v) for v in groups.values())
    return {"accuracy": sum(single) / len(single) if single else 0.0,
            "circular_accuracy": sum(circular.values()) / len(circular),
            "rotations_per_question": rotations,
            "per_category": {c: sum(v) / len(v) for c, v in sorted(per_category.items())}}


# ----------------------------------------------------------------------------------------------------- video QA
_CHOICE = re.compile(r"^\s*a?(\d+)\s*\.?\s*$", re.IGNORECASE)


def parse_choice_index(text: str, n_choices: int) -> Optional[int]:
    """VL-BART answers 'a{k}'; a bare 'k' is accepted too. Anything else (or k out of range) is no answer."""
    m = _CHOICE.match(text)
    if not m:
        return None
    k = int(m.group(1))
    return k if 0 <= k < n_choices else None


def multiple_choice_accuracy(predictions: Mapping[str, str], answers: Mapping[str, int], n_choices: int,
                             groups: Optional[Mapping[str, str]] = None) -> dict:
    """Accuracy of the predicted choice index (TVQA: 5 choices, How2QA: 4), optionally per group (show)."""
    correct = {k: parse_choice_index(predictions[k], n_choices) == answers[k] for k in answers}
    out = {"accuracy": sum(correct.values()) / len(correct)}
    if groups:
        per: dict[str, list[bool]] = defaultdict(list)
        for k, ok in correct.items():
            per[groups[k]].append(ok)
        out["per_group"] = {g: sum(v) / len(v) for g, v in sorted(per.items())}
    return out
