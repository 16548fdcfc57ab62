"""VQA accuracy as the official VQA scorer computes it (GT-Vision-Lab/VQA, vqaEval.py, current version).

Per question, with the ten human answers:
1. "\\n" and "\\t" become spaces and both ends are stripped, in the prediction and in every answer.
2. Only if the ten answers are not all the same string: punctuation processing, then digit/article
   processing, of every answer and of the prediction. (With ten identical answers "yes", the prediction
   "Yes" scores 0: the official rule, kept as is.)
3. For each answer entry, the prediction is matched against the OTHER nine entries (entries, not distinct
   strings); acc_i = min(1, matches / 3); the score is the mean of the ten acc_i.

LLaVA and lmms-eval pass predictions through the EvalAI answer processor before writing a submission
(`evalai_normalize`); `vqa_score(..., prediction_processing="evalai")` scores what such a submission would get.
TextVQA's scorer (`textvqa_score`, as in LLaVA's m4c evaluator) applies the EvalAI processor to both sides.

VL-T5's own scorer (`VQAEvaluator.evaluate_raw` in j-min/VL-T5 and NVlabs/DoRA, which produced the VL-BART papers'
VQAv2 numbers) applies another rule: `vlt5_vqa_score`.
"""
from __future__ import annotations

import re
from typing import Literal, Sequence

# The official tables (facts of the scorer; the odd entries, e.g. "somebody'd" -> "somebodyd", are kept).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": a lookahead where a lookbehind was meant, so it removes every
# "." not followed by a digit. It is called as sub("", text, re.UNICODE), i.e. with count=32.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Delete a punctuation mark where it touches a space (or the text has a digit,digit), else make it a space."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lowercase; number words to digits; drop articles; restore apostrophes of contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official normalisation of one answer (used when the ten answers disagree)."""
    return process_digit_article(process_punctuation(text))


def evalai_normalize(text: str) -> str:
    """The EvalAI answer processor that LLaVA and lmms-eval apply to predictions before submission."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(clean_whitespace(text)))


PredictionProcessing = Literal["none", "evalai"]


def vqa_score(prediction: str, answers: Sequence[str], prediction_processing: PredictionProcessing = "none") -> float:
    """Official VQA accuracy of one prediction against its human answers (10 in VQAv2 and VizWiz)."""
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    if prediction_processing == "evalai":
        prediction = evalai_normalize(prediction)
    elif prediction_processing != "none":
        raise ValueError(f"prediction_processing must be 'none' or 'evalai', got {prediction_processing!r}")
    gts = [clean_whitespace(a) for a in answers]
    pred = clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    return _leave_one_out(pred, gts)


def vlt5_vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as VL-T5's `VQAEvaluator.evaluate_raw` computes it (the number the DoRA paper's VL-BART table
    reports): the prediction always gets whitespace cleaning, punctuation and digit/article processing; the human
    answers get no whitespace cleaning and only punctuation processing, and only when they are not all the same
    string; then the same leave-one-out mean. So ten answers "two" and the prediction "two" score 0 (it becomes
    "2"), and "Two" among disagreeing answers never matches (answers are not lowercased).

    evaluate_raw writes the processed answers back into its ground truth; the paper's number is its first call on
    a fresh ground truth, which is what this computes."""
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    pred = normalize_answer(clean_whitespace(prediction))
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return _leave_one_out(pred, gts)


def vlt5_overall(scores: Sequence[float]) -> float:
    """evaluate_raw's `overall`: the mean x100, rounded to 2 decimals."""
    return round(100 * float(sum(scores)) / len(scores), 2)


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    matches = sum(1 for a in gts if a == pred)
    total = 0.0
    for a in gts:
        # the other entries: all matches, minus this entry if it matches itself
        others = matches - (1 if a == pred else 0)
        total += min(1.0, others / 3.0)
    return total / len(gts)


def textvqa_score(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy as LLaVA's m4c evaluator computes it: EvalAI processing of prediction and answers,
    then the leave-one-out mean of min(1, matches / 3)."""
    if not answers:
        raise ValueError("a TextVQA question needs at least one ground-truth answer")
    return _leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])
