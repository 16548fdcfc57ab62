"""The CLI against the official scorers' rules, on files built exactly in their real shape and on randomized
messy predictions (casing, punctuation, unicode, "The answer is X.", number words, empty answers).

Each reference computation below is written here from the official code's rules (named per test), not with
eval/: LLaVA c121f04 (eval_pope.py, eval_textvqa.py + m4c_evaluator.py, convert_gqa_for_eval.py), GQA's
eval.py, VLMEvalKit e8e78f0 (matching_util.py, multiple_choice.py), lil-lab/nlvr 1892484 (nlvr2/eval/metrics.py),
VALUE-Leaderboard/EvaluationTools 10fc2d4, NVlabs/DoRA 7e2f10a (VL-T5/src/video/*), salaniz/pycocoevalcap.
"""
import base64
import csv
import json
import random
import re
import string
from collections import defaultdict

import pytest

from eval.cli import main

SUFFIX = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def cli(capsys, *argv):
    """(exit code, result JSON or {}, printed text) of `python -m eval ...` run in-process."""
    argv = [str(a) for a in argv]
    code = main(argv)
    captured = capsys.readouterr()
    out = {}
    if "--out" in argv and code == 0:
        out = json.loads(open(argv[argv.index("--out") + 1], encoding="utf-8").read())
    return code, out, captured.out + captured.err


def messy(rng: random.Random, answer: str) -> str:
    """One of the ways a model writes `answer`."""
    forms = [answer, answer.capitalize(), answer.upper(), answer + ".", " " + answer, answer + " ",
             f"The answer is {answer}.", f"{answer}!", f"I think it is {answer}", "", "\n", "naïve café",
             answer.replace(" ", "-"), f"\"{answer}\"", f"{answer}, sir"]
    return rng.choice(forms)


# ================================================================================================ POPE
POPE_OBJECTS = ["dog", "cat", "car", "snowboard", "dining table", "person", "bottle", "cup"]


def test_pope_matches_llava_eval_pope_on_llavas_real_question_file(tmp_path, capsys):
    rng = random.Random(1)
    gt = tmp_path / "coco"
    gt.mkdir()
    labels, questions, answers = {}, [], []
    qid = 0
    for category in ("adversarial", "popular", "random"):  # LLaVA's question file order
        rows = []
        for n in range(1, 31):  # the official files number each category from 1
            image = f"COCO_val2014_{rng.randrange(10**6):012d}.jpg"
            obj = rng.choice(POPE_OBJECTS)
            rows.append({"question_id": n, "image": image, "text": f"Is there a {obj} in the image?",
                         "label": rng.choice(["yes", "no"])})
        rows = list({(r["image"], r["text"]): r for r in rows}.values())  # one question per image and object
        write_jsonl(gt / f"coco_pope_{category}.json", rows)
        labels[category] = [r["label"] for r in rows]
        for r in rows:
            qid += 1
            questions.append({"question_id": qid, "image": r["image"], "text": r["text"] + SUFFIX,
                              "category": category})
            answers.append({"question_id": qid, "prompt": r["text"] + SUFFIX, "text": rng.choice([
                "Yes", "No", "yes", "no", "No, there is not.", "Yes, there is a dog.", "There is no dog.",
                "NO", "Not really", "It is not. Yes.", "", "Yes. No.", "no, none", "nope"]),
                "answer_id": f"x{qid}", "model_id": "m", "metadata": {}})
    qfile = write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    afile = write_jsonl(tmp_path / "answers.jsonl", answers)

    # LLaVA's eval_pope.py: per category, the answers of that category (answer-file order) zipped with the
    # labels of coco_pope_<category>.json by position; first sentence, no commas, No/not/no -> no.
    def llava_pope(category):
        category_of = {q["question_id"]: q["category"] for q in questions}
        preds = []
        for a in answers:
            if category_of[a["question_id"]] != category:
                continue
            text = a["text"].split(".")[0] if "." in a["text"] else a["text"]
            words = text.replace(",", "").split(" ")
            preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
        gold = [0 if label == "no" else 1 for label in labels[category]]
        tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold))
        fp = sum(p == 1 and g == 0 for p, g in zip(preds, gold))
        tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold))
        fn = sum(p == 0 and g == 1 for p, g in zip(preds, gold))
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        return {"accuracy": (tp + tn) / (tp + tn + fp + fn), "precision": precision, "recall": recall,
                "f1": 2 * precision * recall / (precision + recall), "yes_ratio": preds.count(1) / len(preds)}

    code, out, text = cli(capsys, "score", "pope", "--pred", afile, "--gt", gt, "--questions", qfile,
                          "--out", tmp_path / "r.json")
    assert code == 0, text
    for category in ("adversarial", "popular", "random"):
        expected = llava_pope(category)
        for key, value in expected.items():
            assert out["scores"][category][key] == pytest.approx(value, abs=1e-12), (category, key)
    assert out["score"] == pytest.approx(100 * sum(llava_pope(c)["f1"] for c in labels) / 3)
    # matched by content, not position: a shuffled answer file scores the same
    rng.shuffle(answers)
    write_jsonl(afile, answers)
    code, shuffled, text = cli(capsys, "score", "pope", "--pred", afile, "--gt", gt, "--questions", qfile,
                               "--out", tmp_path / "r.json")
    assert code == 0 and shuffled["scores"] == out["scores"], text


# ================================================================================================ TextVQA
# The EvalAI answer processor of LLaVA's m4c_evaluator.py, written from its rules (contractions: the ones the
# answers below can produce).
CONTRACTIONS = {"dont": "don't", "cant": "can't", "whats": "what's", "isnt": "isn't"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def evalai(answer: str) -> str:
    a = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    a = a.replace("\n", " ").replace("\t", " ").strip()
    out = a
    for p in PUNCT:
        if (p + " " in a or " " + p in a) or re.search(r"(?<=\d)(\,)+(?=\d)", a) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out, re.UNICODE)
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def m4c_accuracy(prediction, gt_answers):
    answers = [evalai(a) for a in gt_answers]
    pred = evalai(prediction)
    accs = []
    for i in range(len(answers)):
        others = [a for j, a in enumerate(answers) if j != i]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs) if pred in answers else 0.0


TEXTVQA_WORDS = ["nokia", "Coca-Cola", "coca cola", "two", "2", "the sign", "stop", "3,000", "3000", "dont",
                 "yes", "whats up", "a.m.", "café", "12:30"]


def test_textvqa_reads_llavas_question_and_answer_files_with_repeated_image_ids(tmp_path, capsys):
    rng = random.Random(2)
    data, llava_questions, answers = [], [], []
    qid = 34602
    for i in range(40):
        image = "".join(rng.choice("0123456789abcdef") for _ in range(16))
        for question in rng.sample(["what brand is this?", "what is written on the sign?", "What number is shown?",
                                    "what time is it?"], rng.choice([1, 1, 2, 3])):
            gt = [rng.choice(TEXTVQA_WORDS) for _ in range(10)]
            data.append({"question": question, "image_id": image, "image_classes": ["Sign"],
                         "flickr_original_url": "u", "flickr_300k_url": "u", "image_width": 1024,
                         "image_height": 768, "answers": gt, "question_tokens": question.split(),
                         "question_id": qid, "set_name": "val"})
            ocr = rng.choice(["", "\nReference OCR token: Nokia, 3000, stop"])
            text = question.capitalize() + ocr + SUFFIX if rng.random() < 0.5 else question + ocr + SUFFIX
            llava_questions.append({"question_id": image, "image": f"{image}.jpg", "text": text})
            answers.append({"question_id": image, "prompt": text, "text": messy(rng, rng.choice(gt)),
                            "answer_id": str(qid), "model_id": "llava", "metadata": {}})
            qid += 1
    assert len({q["question_id"] for q in llava_questions}) < len(llava_questions)  # ids repeat, as in LLaVA's
    gt_file = write_json(tmp_path / "TextVQA_0.5.1_val.json",
                         {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    afile = write_jsonl(tmp_path / "llava-v1.5-7b.jsonl", answers)

    # LLaVA's eval_textvqa.py: annotations keyed by (image_id, question.lower()), answers by (question_id,
    # prompt_processor(prompt)); here every prompt has 2 or 3 lines and the question on the first.
    annotations = {(d["image_id"], d["question"].lower()): d for d in data}
    expected = sum(m4c_accuracy(a["text"], annotations[(a["question_id"], a["prompt"].split("\n")[0].lower())]
                                ["answers"]) for a in answers) / len(answers)
    code, out, text = cli(capsys, "score", "textvqa", "--pred", afile, "--gt", gt_file, "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["score"] == pytest.approx(100 * expected, abs=1e-9)
    assert out["scores"]["matched_by"] == "image_id+prompt"
    # the same answers keyed by TextVQA's own question ids: matched by id, same number
    by_qid = write_jsonl(tmp_path / "by_qid.jsonl", [{"question_id": int(a["answer_id"]), "text": a["text"]}
                                                    for a in answers])
    code, out2, text = cli(capsys, "score", "textvqa", "--pred", by_qid, "--gt", gt_file, "--out", tmp_path / "r.json")
    assert code == 0 and out2["score"] == pytest.approx(out["score"], abs=1e-12) and out2["scores"]["matched_by"] == "question_id"
    # an answer repeated for the same image and question is an error naming both lines
    write_jsonl(afile, answers + [answers[3]])
    code, _, text = cli(capsys, "score", "textvqa", "--pred", afile, "--gt", gt_file)
    assert code == 2 and f"llava-v1.5-7b.jsonl:{len(answers) + 1}" in text and "same question as line 4" in text


# ================================================================================================ GQA
def test_gqa_scores_balanced_questions_as_gqa_eval_py(tmp_path, capsys):
    rng = random.Random(3)
    questions, answers = {}, []
    kinds = [("verify", "attr"), ("query", "rel"), ("choose", "obj"), ("logical", "cat"), ("compare", "global"),
             ("query", "cat")]
    for i in range(120):
        qid = str(20968000 + i)
        structural, semantic = rng.choice(kinds)
        answer = rng.choice(["yes", "no", "left", "right", "cup", "blue", "wood"])
        questions[qid] = {"semantic": [], "entailed": [], "equivalent": [qid], "question": "Is it?",
                          "imageId": "n1", "isBalanced": rng.random() < 0.7, "groups": {"global": None, "local": "x"},
                          "answer": answer, "semanticStr": "", "annotations": {}, "types":
                          {"detailed": "d", "semantic": semantic, "structural": structural}, "fullAnswer": "."}
        if questions[qid]["isBalanced"] or rng.random() < 0.5:  # some unbalanced ones are predicted too
            answers.append({"question_id": qid, "text": messy(rng, answer) if rng.random() < 0.7 else answer})
    gt = write_json(tmp_path / "testdev_all_questions.json", questions)
    afile = write_jsonl(tmp_path / "merge.jsonl", answers)

    # LLaVA's convert_gqa_for_eval.py (rstrip('.').lower()) then eval.py: balanced questions only, exact match.
    predictions = {a["question_id"]: a["text"].rstrip(".").lower() for a in answers}
    hits = {q: predictions[q] == v["answer"] for q, v in questions.items() if v["isBalanced"]}
    per_type = defaultdict(list)
    for q, ok in hits.items():
        per_type[questions[q]["types"]["structural"]].append(ok)
    open_ = [ok for q, ok in hits.items() if questions[q]["types"]["structural"] == "query"]
    binary = [ok for q, ok in hits.items() if questions[q]["types"]["structural"] != "query"]

    code, out, text = cli(capsys, "score", "gqa", "--pred", afile, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["score"] == pytest.approx(100 * sum(hits.values()) / len(hits))
    assert out["scores"]["open"] == pytest.approx(sum(open_) / len(open_))
    assert out["scores"]["binary"] == pytest.approx(sum(binary) / len(binary))
    assert out["scores"]["per_structural_type"] == pytest.approx({t: sum(v) / len(v) for t, v in per_type.items()})
    assert out["coverage"]["expected"] == len(hits) and "not balanced" in text


# ================================================================================================ MMBench
REFUSALS = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer"]


def vlmevalkit_can_infer(answer, choices):
    """can_infer of VLMEvalKit e8e78f0 (matching_util.py), written from its rules."""
    def option():
        if "Failed to obtain answer via API" in answer:
            return False
        for err in REFUSALS:
            if err in answer:
                return "Z"
        mod = answer
        for c in ".()[],:;!*#{}":
            mod = mod.replace(c, " ")
        splits = [x.strip() for x in mod.split()]
        count = sum(1 for c in choices if c in splits)
        if count == 1:
            for ch in choices:
                if ch in splits and splits.index(ch) > len(splits) - 5:
                    return ch
        elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
            return "Z"
        m = re.search(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", answer)
        if m and m.group(1).upper() in choices:
            return m.group(1).upper()
        return False

    def text():
        low = answer.lower()
        if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
            return False
        cands = [k for k in choices if str(choices[k]).lower() in low]
        return cands[0] if len(cands) == 1 else False

    return option() or text()


MMB_OPTIONS = ["red", "blue", "none", "a cat", "the dog", "two", "B", "green light", "N/A", "12:30", "yes",
               "Café"]


def _mmbench_rows(rng):
    """Main questions and their rotated copies (copy k shows texts[-k:] + texts[:-k]), some with fewer copies
    than options, some options NA-like."""
    rows = []
    for index in range(30):
        n = rng.choice([2, 3, 4, 4])
        texts = rng.sample([o for o in MMB_OPTIONS if o not in ("N/A", "B")], n)
        if index % 7 == 3:
            texts[-1] = "none"  # a real option text: pandas keeps "none"
        answer = rng.randrange(n)
        category = rng.choice(["attribute_recognition", "image_scene", "ocr", "spatial_relationship"])
        l2 = {"attribute_recognition": "finegrained_perception (instance-level)", "image_scene": "coarse_perception",
              "ocr": "finegrained_perception (instance-level)", "spatial_relationship": "relation_reasoning"}[category]
        copies = n if index % 5 else max(1, n - 1)  # a question may have fewer copies than options
        for k in range(copies):
            shown = texts[-k:] + texts[:-k] if k else texts
            filler = "NA" if index % 6 == 1 else rng.choice(["", "nan", "N/A"])
            cells = shown + [filler] * (4 - n)  # absent options: cells pandas reads as NA
            rows.append([index + k * 1_000_000, f"Question {index}?", rng.choice(["", "A hint."]), *cells,
                         "ABCD"[(answer + k) % n], category, base64.b64encode(b"png").decode(), "src", l2, "",
                         "dev"])
    return rows


def test_mmbench_circular_matches_vlmevalkit_on_a_tsv_with_its_rotated_copies(tmp_path, capsys):
    import pandas as pd

    rng = random.Random(4)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = _mmbench_rows(rng)
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    with open(tsv, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([header, *rows])
    table = pd.read_csv(tsv, sep="\t")  # as VLMEvalKit's load()
    predictions = {}
    for item in table.to_dict("records"):
        choices = {c: item[c] for c in string.ascii_uppercase if c in item and not pd.isna(item[c])}
        right, right_text = item["answer"], str(choices[item["answer"]])
        predictions[item["index"]] = rng.choice([
            right, right + ".", f"({right}) {right_text}", f"The answer is {right}", f"the answer is {right.lower()}",
            right_text, right_text.upper(), f"I think it is {right}", "A B", "Z", "Cannot determine the answer", "",
            f"Answer: {rng.choice('ABCD')}", f"**{right}**", "Failed to obtain answer via API", "none",
            f"{right} is correct because the picture clearly shows that", rng.choice(MMB_OPTIONS),
            f"after looking at everything in this picture very carefully, it is {right_text}",  # too long for text
            f"{right} or D"])
        if item["index"] % 1_000_000 % 6 == 1 and pd.isna(item["D"]):
            predictions[item["index"]] = f"{right} or D"  # right only when the "NA" cell is no option D
    afile = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": int(k), "text": v} for k, v in predictions.items()])

    # VLMEvalKit mcq_circular_eval + report_acc: a main row (index < 1e6) hits when every row with the same
    # index % 1e6 is inferred right; overall, per l2-category and per category means over main rows.
    groups = defaultdict(list)
    for item in table.to_dict("records"):
        choices = {c: item[c] for c in string.ascii_uppercase if c in item and not pd.isna(item[c])}
        groups[int(item["index"] % 1e6)].append(vlmevalkit_can_infer(str(predictions[item["index"]]), choices)
                                                 == item["answer"])
    main_rows = table[table["index"] < 1_000_000]
    hit = {int(i): all(groups[int(i)]) for i in main_rows["index"]}
    by = {c: defaultdict(list) for c in ("category", "l2-category")}
    for item in main_rows.to_dict("records"):
        for c in by:
            by[c][item[c]].append(hit[item["index"]])

    code, out, text = cli(capsys, "score", "mmbench", "--pred", afile, "--gt", tsv, "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["score"] == pytest.approx(100 * sum(hit.values()) / len(hit))
    assert out["scores"]["per_category"] == pytest.approx({k: sum(v) / len(v) for k, v in by["category"].items()})
    assert out["scores"]["per_l2_category"] == pytest.approx({k: sum(v) / len(v) for k, v in by["l2-category"].items()})
    assert 0 < sum(hit.values()) < len(hit)
    # a byte-order mark at the start of the TSV reads the same (pandas drops it, as VLMEvalKit reads it)
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes())
    code, out_bom, text = cli(capsys, "score", "mmbench", "--pred", afile, "--gt", bom, "--out", tmp_path / "r.json")
    assert code == 0 and out_bom["scores"] == out["scores"], text


# ================================================================================================ NLVR2
def test_nlvr2_official_rule_counts_non_canonical_answers(tmp_path, capsys):
    rng = random.Random(5)
    records, answers = [], []
    for s in range(25):
        for pair in range(rng.choice([1, 2, 4])):
            identifier = f"test1-{s}-{pair}-{s % 3}"
            label = rng.choice(["True", "False"])
            records.append({"validation": {}, "sentence": "There are two dogs.", "left_url": "l", "writer": "w",
                            "label": label, "right_url": "r", "synset": "dog", "query": "dogs",
                            "identifier": identifier, "extra_validations": {}})
            answers.append({"question_id": identifier, "text": rng.choice(
                [label, label.lower(), label.upper(), label + ".", " " + label.lower(), "yes", "no", "1", "0",
                 "", "maybe", "true", "false"])})
    gt = write_jsonl(tmp_path / "test1.json", records)
    afile = write_jsonl(tmp_path / "answers.jsonl", answers)

    # lil-lab/nlvr nlvr2/eval/metrics.py: prediction.lower() == label.lower(); consistency over identifiers with
    # their third field blanked.
    preds = {a["question_id"]: a["text"] for a in answers}
    correct, consistent = 0, {}
    for r in records:
        key = r["identifier"].split("-")
        key[2] = ""
        key = "-".join(key)
        consistent.setdefault(key, True)
        if preds[r["identifier"]].lower() == r["label"].lower():
            correct += 1
        else:
            consistent[key] = False
    non_canonical = sum(p.lower() not in ("true", "false") for p in preds.values())

    code, out, text = cli(capsys, "score", "nlvr2", "--pred", afile, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["score"] == pytest.approx(100 * correct / len(records))
    assert out["scores"]["consistency"] == pytest.approx(sum(consistent.values()) / len(consistent))
    assert out["scores"]["non_canonical_answers"] == non_canonical > 0
    assert out["scores"]["numeric_answers"] == sum(p in ("1", "0") for p in preds.values())
    assert f"{non_canonical} answers are not 'true'/'false'" in text
    # --lenient-answers: the documented variants count too
    lenient = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
    expected = sum(lenient.get(p.strip().rstrip(".").strip().lower()) == (r["label"] == "True")
                   for p, r in zip(preds.values(), records))
    code, out, text = cli(capsys, "score", "nlvr2", "--pred", afile, "--gt", gt, "--lenient-answers",
                          "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(100 * expected / len(records)), text


# ============================================================================================== VQAv2, VL-T5's protocol
# (prediction, the ten human answers) and the per-question value x100 VL-T5's VQAEvaluator.evaluate_raw gives them:
# the literals were obtained by running the official class (j-min/VL-T5 a07d779 VL-T5/src/vqa_data.py, identical in
# NVlabs/DoRA 7e2f10a vqa_clip_data.py) on these cases in a scratch folder, not computed here.
VLT5_CASES = [
    ("two", ["two"] * 10, 0.0),  # the prediction becomes "2"; ten equal answers are not processed
    ("2", ["two"] * 10, 0.0),
    ("Two", ["two"] * 9 + ["2"], 30.0),  # answers are punctuation-processed only: "two" never becomes "2"
    ("Yes.", ["yes"] * 10, 100.0),  # the prediction is always normalised (GT-Vision: 0)
    ("yes", ["Yes"] * 10, 0.0),  # answers are not lowercased
    ("the dog", ["dog"] * 4 + ["the dog"] * 6, 100.0),
    ("3,000", ["3000"] * 5 + ["3,000"] * 5, 100.0),
    ("t-shirt", ["t-shirt"] * 10, 0.0),
    (" blue\n", [" blue"] * 3 + ["blue"] * 7, 100.0),
    ("blue", [" blue"] * 10, 0.0),  # answers are not whitespace-cleaned
    ("dont", ["don't"] * 5 + ["dont"] * 5, 100.0),
    ("a.m.", ["a.m."] * 6 + ["am"] * 4, 100.0),
    ("None", ["0"] * 5 + ["none"] * 5, 100.0),
    ("red", ["red"] * 2 + ["blue"] * 8, 60.0),
    ("Red", ["red"] * 3 + ["Red"] * 7, 90.0),
    ("an apple", ["apple"] * 10, 100.0),
    ("apple", ["an apple"] * 10, 0.0),
    ("red\twhite", ["red white"] * 4 + ["red, white"] * 6, 100.0),
    ("(left)", ["left"] * 2 + ["(left)"] * 8, 60.0),  # "(left)" -> " left ": spaces kept on the answer side
    ("1.5", ["1.5"] * 3 + ["1,5"] * 7, 90.0),
]
VLT5_OVERALL = 61.5  # evaluate_raw's "overall" on VLT5_CASES, from the official run

VLT5_WORDS = ["two", "2", "Two", "yes", "Yes", "yes.", "no", "none", "0", "zero", "the dog", "a dog", "dog", "dogs",
              "t-shirt", "t shirt", "3,000", "3000", "a.m.", "am", "1.5", "dont", "don't", "isnt", "red, white",
              "red white", "(red)", "red!", "blue ", " blue", "blue\t", "blue\nsky", "one", "One", "an apple",
              "apple", "three dogs", "3 dogs", "hes", "he's", "ten", "10", "it's", "its", "yes!", "no.", "white/blue",
              "white blue", "left-hand", "12:30", "café", "naïve", "DOG", "", " ", "50%", "$5", "5", "five"]
# evaluate_raw's "overall" on vlt5_random_set(seed, 400), from the official class run on this function's output in
# a scratch folder (seeds 0-19 all equal there); GT-Vision's vqaEval.py (raw prediction) gives 28.62 and 28.75.
VLT5_RANDOM_OVERALL = {3: 17.1, 13: 18.85}


def vlt5_random_set(seed: int, n: int):
    """Questions whose annotators agree, mostly agree with variants, or disagree; messy predictions."""
    rng = random.Random(seed)

    def vary(a):
        return rng.choice([a, a.upper(), a.capitalize(), a + ".", " " + a, a + " ", "\n" + a, a + "\t", f"the {a}",
                           f"a {a}", a.replace(" ", "-"), a + "!", f"\"{a}\"", a + ",", "\t" + a + "\n"])
    answers, preds = {}, {}
    for i in range(n):
        kind = rng.random()
        if kind < 0.3:
            ten = [rng.choice(VLT5_WORDS)] * 10
        elif kind < 0.5:
            base = rng.choice(VLT5_WORDS)
            ten = [base if rng.random() < 0.7 else vary(base) for _ in range(10)]
        else:
            ten = [rng.choice(VLT5_WORDS) for _ in range(10)]
        answers[1000 + i] = ten
        preds[1000 + i] = vary(rng.choice(ten + VLT5_WORDS[:8])) if rng.random() < 0.8 else rng.choice(VLT5_WORDS)
    return answers, preds


def write_vqav2(tmp_path, answers: dict, preds: dict):
    """The official annotation file (answers as {answer, answer_confidence, answer_id}) and a prediction file."""
    gt = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"info": {}, "license": {}, "annotations": [
        {"question_id": q, "image_id": 1, "question_type": "what", "answer_type": "other",
         "multiple_choice_answer": a[0],
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]}
        for q, a in answers.items()]})
    return gt, write_jsonl(tmp_path / "pred.jsonl", [{"question_id": q, "text": t} for q, t in preds.items()])


def test_vqav2_vlt5_protocol_gives_vlt5_evaluate_raw_numbers(tmp_path, capsys):
    from eval import vqa
    for prediction, answers, official in VLT5_CASES:
        assert round(100 * vqa.vlt5_vqa_score(prediction, answers), 2) == official, (prediction, answers)
    answers = {i + 1: a for i, (_, a, _) in enumerate(VLT5_CASES)}
    preds = {i + 1: p for i, (p, _, _) in enumerate(VLT5_CASES)}
    gt, pred = write_vqav2(tmp_path, answers, preds)
    code, out, text = cli(capsys, "score", "vqav2", "--pred", pred, "--gt", gt, "--protocol", "vlt5",
                          "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["score"] == VLT5_OVERALL and out["scores"]["protocol"] == "vlt5"
    assert "vqav2: 61.50  (VQA accuracy (VL-T5 evaluate_raw))" in text and "gt_vision_accuracy" in text
    gt_vision = sum(vqa.vqa_score(preds[q], answers[q], "evalai") for q in answers) / len(answers)
    assert out["scores"]["gt_vision_accuracy"] == pytest.approx(gt_vision)  # the number beside it
    # the default protocol is unchanged: GT-Vision
    code, out, _ = cli(capsys, "score", "vqav2", "--pred", pred, "--gt", gt, "--out", tmp_path / "r.json")
    assert out["score"] == pytest.approx(100 * gt_vision) and "protocol" not in out["scores"]
    # the protocol is vqav2's: elsewhere it is an error, not ignored
    code, _, text = cli(capsys, "score", "vizwiz", "--pred", pred, "--gt", gt, "--protocol", "vlt5")
    assert code == 2 and "--protocol vlt5 applies to vqav2 only" in text


@pytest.mark.parametrize("seed", sorted(VLT5_RANDOM_OVERALL))
def test_vqav2_vlt5_protocol_on_randomized_answers_matches_the_official_overall(tmp_path, capsys, seed):
    answers, preds = vlt5_random_set(seed, 400)
    gt, pred = write_vqav2(tmp_path, answers, preds)
    code, out, text = cli(capsys, "score", "vqav2", "--pred", pred, "--gt", gt, "--protocol", "vlt5",
                          "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == VLT5_RANDOM_OVERALL[seed], text  # rounded to 2 decimals as evaluate_raw


# ================================================================================================ TVQA / How2QA
@pytest.mark.parametrize("task,n", [("tvqa", 5), ("how2qa", 4)])
def test_video_qa_counts_only_exact_a_k(tmp_path, capsys, task, n):
    rng = random.Random(6 + n)
    records, answers = [], []
    for i in range(60):
        idx = rng.randrange(n)
        r = {"vid_name": f"v{i}", "ts": "1.0-5.0", "qid": 1000 + i, "q": "What?",
             **{f"a{k}": f"Choice {k}." for k in range(n)}, "answer_idx": idx}
        if task == "tvqa":
            r["show_name"] = rng.choice(["Friends", "House M.D.", "The Big Bang Theory"])
        records.append(r)
        answers.append({"question_id": 1000 + i, "text": rng.choice(
            [f"a{idx}", f"a{idx}", f"A{idx}", str(idx), f"a{idx}.", f"a0{idx}", f" a{idx}", f"a{(idx + 1) % n}",
             "", f"answer a{idx}", f"a{n}"])})
    gt = write_jsonl(tmp_path / f"{task}_val_release.jsonl", records)
    afile = write_jsonl(tmp_path / "answers.jsonl", answers)

    # NVlabs/DoRA TVQAEvaluator / How2QAEvaluator: pred == f"a{answer_idx}"; TVQA also per show (type).
    ok = {a["question_id"]: a["text"] == f"a{r['answer_idx']}" for a, r in zip(answers, records)}
    code, out, text = cli(capsys, "score", task, "--pred", afile, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["score"] == pytest.approx(100 * sum(ok.values()) / len(ok))
    assert out["scores"]["non_canonical_answers"] == sum(a["text"] not in [f"a{k}" for k in range(n)] for a in answers)
    if task == "tvqa":
        shows = defaultdict(list)
        for r in records:
            shows[r["show_name"]].append(ok[r["qid"]])
        assert out["scores"]["per_group"] == pytest.approx({s: sum(v) / len(v) for s, v in shows.items()})


# ================================================================================================ captions
CAPTIONS = {  # unicode, and captions ending in "x." (whose tokens depend on the next line)
    "391895": ["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road."],
    "522418": ["A woman wearing a net on her head cutting a cake.", "a woman cutting a large white sheet cake"],
    "184613": ["A child holding a flowered umbrella and petting a yak.", "the man’s naïve dog sits by the café"],
    "318219": ["A sign with the letter x.", "a sign with a large letter x."],
    "554625": ["A boy wearing headphones using one computer.", "the cat sits on the man’s laptop"],
}
PREDICTED = {"391895": "a man riding a motorcycle on a dirt road", "522418": "A woman cutting a cake.",
             "184613": "the naïve man’s dog near a café", "318219": "a sign with the letter x.",
             "554625": "A boy using a laptop computer."}


def pycocoevalcap_scores(refs, preds, ascii_spaces=False):
    """BLEU-4, ROUGE-L, CIDEr of pycocoevalcap fed in the dicts' order (references, then predictions)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def clean(text):
        return "".join(c if ord(c) < 128 else " " for c in text) if ascii_spaces else text
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": clean(c)} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": clean(p)}] for k, p in preds.items()})
    return {"Bleu_4": 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3],
            "ROUGE_L": 100 * Rouge().compute_score(gts, res)[0], "CIDEr": 100 * Cider().compute_score(gts, res)[0]}


def assert_scores(out, expected):
    for key, value in expected.items():
        assert out["scores"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_coco_caption_keeps_unicode_and_sends_lines_in_ground_truth_order(tmp_path, capsys):
    images = [{"filepath": "val2014", "sentids": [], "filename": f"COCO_val2014_{int(k):012d}.jpg", "imgid": i,
               "split": "test", "sentences": [{"tokens": [], "raw": c, "imgid": i, "sentid": 0} for c in v],
               "cocoid": int(k)} for i, (k, v) in enumerate(CAPTIONS.items())]
    images.insert(2, {"filename": "COCO_val2014_000000000009.jpg", "split": "train", "cocoid": 9, "imgid": 99,
                      "sentences": [{"raw": "ignored"}]})
    gt = write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    submission = list(PREDICTED.items())
    random.Random(7).shuffle(submission)  # the submission order must not matter for COCO
    afile = write_jsonl(tmp_path / "c.jsonl", [{"question_id": int(k), "text": v} for k, v in submission])

    # COCOEvalCap / language-evaluation: both sides in ground-truth image order, text as is.
    expected = pycocoevalcap_scores(CAPTIONS, {k: PREDICTED[k] for k in CAPTIONS})
    assert expected["CIDEr"] != pycocoevalcap_scores(dict(sorted(CAPTIONS.items())),
                                                     dict(sorted(PREDICTED.items())))["CIDEr"]  # order matters here
    assert expected["CIDEr"] != pycocoevalcap_scores(CAPTIONS, {k: PREDICTED[k] for k in CAPTIONS},
                                                     ascii_spaces=True)["CIDEr"]  # so does unicode
    code, out, text = cli(capsys, "score", "coco_caption", "--pred", afile, "--gt", gt, "--no-meteor",
                          "--out", tmp_path / "r.json")
    assert code == 0, text
    assert_scores(out, expected)


def _value_clips():
    clips = [{"vid_name": f"friends_s0{i}e01_seg02_clip_0{i}", "duration": 61.03, "ts": [5.8, 8.24],
              "clip_id": 86618 + 7 * i, "descs": [{"desc": c, "type": "v", "from_retrieval": False,
                                                   "desc_id": 109026 + 10 * i + j} for j, c in enumerate(v)]}
             for i, v in enumerate(CAPTIONS.values())]
    predicted = {str(c["clip_id"]): p for c, p in zip(clips, PREDICTED.values())}
    return clips, predicted


# Iteration orders of int-keyed dicts printed by CPython 2.7.18 (`list({k: 0 for k in keys}.keys())`), the
# runtime VALUE's scorer needs: facts of the official runtime, not results of eval/.
PY27_CASES = [
    ([86618 + 7 * i for i in range(5)], [86632, 86625, 86618, 86646, 86639]),
    ([3, 11, 19, 27, 35, 43, 2, 10, 1], [35, 2, 3, 1, 10, 11, 43, 19, 27]),
    ([100000 + 32 * i for i in range(40)] + [5, 37, 69], [100352, 100160, 5, 100384, 100448, 100512, 100576, 100640, 100704, 100768, 100832, 100896, 100960, 101024, 101088, 101152, 100000, 101216, 37, 100096, 100032, 100256, 100224, 101184, 100288, 69, 100416, 100480, 100544, 100608, 100672, 100736, 100800, 100864, 100928, 100992, 101056, 101120, 100320, 101248, 100192, 100064, 100128]),
    ([-1, -2, 7, -9, 15, 0, 8, 16, 24, 32, 40, 48, 56], [0, 32, 48, 7, 8, 15, 16, 40, 56, -1, -9, 24, -2]),
    ([109026 + 13 * ((i * 7919) % 61) for i in range(61)], [109312, 109442, 109572, 109702, 109065, 109195, 109325, 109455, 109585, 109715, 109078, 109208, 109338, 109468, 109598, 109728, 109091, 109221, 109351, 109481, 109611, 109741, 109104, 109234, 109364, 109494, 109624, 109754, 109117, 109247, 109377, 109507, 109637, 109767, 109130, 109260, 109390, 109520, 109650, 109780, 109143, 109273, 109403, 109533, 109663, 109793, 109026, 109156, 109286, 109416, 109546, 109676, 109806, 109039, 109169, 109299, 109429, 109559, 109689, 109052, 109182]),
]


@pytest.mark.parametrize("keys,order", PY27_CASES)
def test_python27_dict_order(keys, order):
    from eval.captions import py27_dict_order
    assert py27_dict_order(keys) == order


def test_tvc_value_protocol_matches_value_scorer(tmp_path, capsys):
    clips, predicted = _value_clips()
    gt = write_jsonl(tmp_path / "tvc_val_release.jsonl", clips)
    submission = list(predicted.items())
    random.Random(8).shuffle(submission)
    afile = write_jsonl(tmp_path / "tvc_val_predictions.jsonl", [{"question_id": int(k), "text": v} for k, v in submission])
    # VALUE's evaluate_tvc.py (Python 2.7): remove_nonascii (each non-ASCII character -> space); one item per clip
    # with all its descriptions; both sides keyed by the integer clip id in a dict, so sent in 2.7's dict order.
    refs = {str(c["clip_id"]): [d["desc"] for d in c["descs"]] for c in clips}
    py27 = [str(k) for k in PY27_CASES[0][1]]
    assert sorted(py27) == sorted(refs)
    expected = pycocoevalcap_scores({k: refs[k] for k in py27}, {k: predicted[k] for k in py27}, ascii_spaces=True)
    assert expected["CIDEr"] != pycocoevalcap_scores(refs, dict(submission), ascii_spaces=True)["CIDEr"]
    code, out, text = cli(capsys, "score", "tvc", "--pred", afile, "--gt", gt, "--tvc-protocol", "value",
                          "--no-meteor", "--out", tmp_path / "r.json")
    assert code == 0, text
    assert_scores(out, expected)


def test_tvc_per_description_protocol_matches_dora(tmp_path, capsys):
    clips, predicted = _value_clips()
    gt = write_jsonl(tmp_path / "tvc_val_release.jsonl", clips)
    afile = write_jsonl(tmp_path / "p.jsonl", [{"question_id": int(k), "text": v} for k, v in predicted.items()])
    # NVlabs/DoRA tvc_data.py + tvc.py: one item per description (ground-truth order), the description as its only
    # reference, the clip's caption as prediction; language-evaluation's CocoEvaluator keeps the text.
    items = [(str(c["clip_id"]), d["desc"]) for c in clips for d in c["descs"]]
    expected = pycocoevalcap_scores({i: [d] for i, (_, d) in enumerate(items)},
                                    {i: predicted[c] for i, (c, _) in enumerate(items)})
    code, out, text = cli(capsys, "score", "tvc", "--pred", afile, "--gt", gt, "--no-meteor", "--tvc-protocol",
                          "per-description", "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["scores"]["protocol"] == "per-description"
    assert_scores(out, expected)
    # the default is VALUE's protocol: the paper's video numbers come from the VALUE server (NVlabs/DoRA README)
    code, out, text = cli(capsys, "score", "tvc", "--pred", afile, "--gt", gt, "--no-meteor", "--out", tmp_path / "d.json")
    assert code == 0 and out["scores"]["protocol"] == "value", text


def test_caption_meteor_is_the_official_scorer_s(tmp_path, capsys):
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    gt = write_json(tmp_path / "captions_val2014.json", {
        "images": [{"id": int(k), "file_name": f"COCO_val2014_{int(k):012d}.jpg"} for k in CAPTIONS],
        "annotations": [{"image_id": int(k), "id": 10 * i + j, "caption": c}
                        for i, (k, v) in enumerate(CAPTIONS.items()) for j, c in enumerate(v)]})
    afile = write_jsonl(tmp_path / "p.jsonl", [{"question_id": int(k), "text": v} for k, v in PREDICTED.items()])
    tok = PTBTokenizer()
    meteor = Meteor()
    try:
        expected = 100 * meteor.compute_score(
            tok.tokenize({k: [{"caption": c} for c in v] for k, v in CAPTIONS.items()}),
            tok.tokenize({k: [{"caption": PREDICTED[k]}] for k in CAPTIONS}))[0]
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    code, out, text = cli(capsys, "score", "coco_caption", "--pred", afile, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["scores"]["METEOR"] == pytest.approx(expected, rel=1e-12)


# ================================================================================================ bad input
def _mmbench_tsv(path, rows, header=("index", "question", "A", "B", "C", "answer", "category")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([list(header), *rows])
    return path


def _bad_cases(tmp):
    """(argv, expected message fragments) for each bad input of issue 9."""
    vqa = write_json(tmp / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 1, "image_id": 9, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]}]})
    textvqa = write_json(tmp / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 5, "image_id": "ab12", "question": "what?", "answers": ["x"] * 10}]})
    gqa = write_json(tmp / "testdev_balanced_questions.json", {"201": {"answer": "yes", "isBalanced": True}})
    ok1 = write_jsonl(tmp / "ok1.jsonl", [{"question_id": 1, "text": "yes"}])
    bad_utf8 = tmp / "bad_utf8.jsonl"
    bad_utf8.write_bytes(b'{"question_id": 0, "text": "ok"}\n{"question_id": 1, "text": "caf\xe9"}\n')
    nlvr_bad_utf8 = tmp / "test1_bad.json"
    nlvr_bad_utf8.write_bytes(b'{"identifier": "test1-0-0-0", "label": "True"}\n'
                              b'{"identifier": "test1-0-0-1", "label": "Tr\xffue"}\n')
    tvqa = write_jsonl(tmp / "tvqa_val.jsonl", [
        {"qid": 7, "a0": "x", "a1": "x", "a2": "x", "a3": "x", "a4": "x", "answer_idx": 4, "show_name": "House"}])
    tvqa_two = write_jsonl(tmp / "tvqa_two.jsonl", [
        {"qid": 7, "a0": "x", "a1": "x", "a2": "x", "a3": "x", "a4": "x", "answer_idx": "two", "show_name": "House"}])
    p7 = write_jsonl(tmp / "p7.jsonl", [{"question_id": 7, "text": "a4"}])
    nlvr_nodash = write_jsonl(tmp / "test1_nodash.json", [{"identifier": "test10100", "label": "True"}])
    tvc_empty = write_jsonl(tmp / "tvc_empty.jsonl", [{"clip_id": 3, "descs": [{"desc": "a man"}]},
                                                       {"clip_id": 4, "descs": []}])
    p34 = write_jsonl(tmp / "p34.jsonl", [{"question_id": 3, "text": "a man"}, {"question_id": 4, "text": "b"}])
    mmb_index = _mmbench_tsv(tmp / "mmb_index.tsv", [[0, "q", "x", "y", "", "A", "c"], ["x1", "q", "x", "y", "", "A", "c"]])
    mmb_answer = _mmbench_tsv(tmp / "mmb_answer.tsv", [[0, "q", "x", "y", "", "A", "c"], [1, "q", "x", "y", "NA", "C", "c"]])
    p01 = write_jsonl(tmp / "p01.jsonl", [{"question_id": 0, "text": "A"}, {"question_id": 1, "text": "A"}])
    vlt5_vqa = write_json(tmp / "karpathy_test.json", [{"question_id": 1, "img_id": "COCO_1", "sent": "?",
                                                         "label": {"yes": 1}, "answers": [{"answer": "yes"}],
                                                         "answer_type": "yes/no", "question_type": "is"}])
    textvqa_pred = write_jsonl(tmp / "tv.jsonl", [{"question_id": "ab12", "prompt": "one line only", "text": "x"}])
    a_file = tmp / "a_file"
    a_file.write_text("x")
    return [
        (["vqav2", "--pred", bad_utf8, "--gt", vqa], ["bad_utf8.jsonl:2", "not UTF-8"]),
        (["nlvr2", "--pred", ok1, "--gt", nlvr_bad_utf8], ["test1_bad.json:2", "not UTF-8"]),
        (["gqa", "--pred", ok1, "--gt", textvqa], ["TextVQA_0.5.1_val.json", "looks like a TextVQA file"]),
        (["gqa", "--pred", ok1, "--gt", vlt5_vqa], ["karpathy_test.json", "looks like a VQA question list"]),
        (["textvqa", "--pred", ok1, "--gt", vqa], ["v2_mscoco_val2014_annotations.json", "looks like VQAv2 annotations"]),
        (["vqav2", "--pred", ok1, "--gt", textvqa], ["looks like a TextVQA file"]),
        (["scienceqa", "--pred", ok1, "--gt", gqa], ["looks like GQA questions"]),
        (["how2qa", "--pred", p7, "--gt", tvqa], ["tvqa_val.jsonl: line 1 (qid 7)", "TVQA file"]),
        (["tvqa", "--pred", p7, "--gt", tvqa_two], ["tvqa_two.jsonl: line 1 (qid 7)", "answer_idx 'two' is not an integer"]),
        (["nlvr2", "--pred", ok1, "--gt", nlvr_nodash], ["test1_nodash.json: line 1 (identifier 'test10100')",
                                                         "split-set-pair-sentence"]),
        (["tvc", "--pred", p34, "--gt", tvc_empty], ["tvc_empty.jsonl: line 2 (clip 4)", "no reference"]),
        (["mmbench", "--pred", p01, "--gt", mmb_index], ["mmb_index.tsv: data row 2 (line 3)", "'x1' is not an integer"]),
        (["mmbench", "--pred", p01, "--gt", mmb_answer], ["mmb_answer.tsv: data row 2 (line 3), index 1",
                                                          "answer 'C' is not one of its options ['A', 'B']"]),
        (["textvqa", "--pred", textvqa_pred, "--gt", textvqa], ["tv.jsonl:1 (question_id 'ab12')",
                                                                "cannot find the question"]),
        (["vqav2", "--pred", ok1, "--gt", vqa, "--out", a_file / "r.json"], ["--out", "a_file", "not a directory"]),
    ]


def test_every_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, capsys):
    for argv, fragments in _bad_cases(tmp_path):
        code, _, text = cli(capsys, "score", *argv)
        assert code == 2, (argv, text)
        assert text.startswith("error: ") and "Traceback" not in text, text
        for fragment in fragments:
            assert fragment in text, (fragment, text)


def test_the_real_entry_point_exits_2_without_a_traceback(tmp_path):
    import sys
    from pathlib import Path

    import subprocesses
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"question_id": 1, "text": "\xff"}\n')
    gt = write_json(tmp_path / "v.json", {"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}]})
    proc = subprocesses.run([sys.executable, "-m", "eval", "score", "vqav2", "--pred", str(bad), "--gt", str(gt)],
                            what="python -m eval score", timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "p.jsonl:1: not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
