"""`python -m eval` end to end, per task, on small files in the official formats written by the tests."""
import csv
import json
import sys
from pathlib import Path

import pytest

from eval.cli import main
import subprocesses

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def preds(path: Path, answers: dict) -> Path:
    return write_jsonl(path, [{"question_id": k, "text": v} for k, v in answers.items()])


def run(capsys, *argv) -> tuple[int, dict, str]:
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    out = {}
    if "--out" in argv and code == 0:
        out = json.loads(Path(argv[argv.index("--out") + 1]).read_text())
    return code, out, captured.out + captured.err


def vqa_annotations(tmp_path):
    anns = [
        {"question_id": 1, "image_id": 9, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                                      for i, a in enumerate(["yes"] * 10)]},
        {"question_id": 2, "image_id": 9, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                                      for i, a in enumerate(["two"] * 3 + ["three"] * 7)]},
    ]
    return write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": anns})


def test_vqav2_official_and_evalai_processing(tmp_path, capsys):
    gt = vqa_annotations(tmp_path)
    p = preds(tmp_path / "answers.jsonl", {1: "Yes", 2: "2"})
    code, out, text = run(capsys, "score", "vqav2", "--pred", p, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(100 * (1.0 + 0.9) / 2)
    assert "vqav2: 95.00" in text
    code, out, _ = run(capsys, "score", "vqav2", "--pred", p, "--gt", gt, "--prediction-processing", "none",
                       "--out", tmp_path / "r.json")
    assert out["score"] == pytest.approx(100 * (0.0 + 0.9) / 2)  # raw "Yes" vs ten identical "yes": 0


def test_vizwiz_keys_by_image(tmp_path, capsys):
    gt = write_json(tmp_path / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "what?", "answers": [{"answer": "unanswerable"}] * 10},
        {"image": "VizWiz_val_00000001.jpg", "question": "what?",
         "answers": [{"answer": "soup"}] * 4 + [{"answer": "can"}] * 6}])
    p = preds(tmp_path / "a.jsonl", {"VizWiz_val_00000000": "unanswerable", "VizWiz_val_00000001.jpg": "soup"})
    code, out, _ = run(capsys, "score", "vizwiz", "--pred", p, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(100.0)


def test_textvqa(tmp_path, capsys):
    gt = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "image_id": "abc", "question": "what brand?", "answers": ["Nokia"] * 10}]})
    p = preds(tmp_path / "a.jsonl", {34602: "nokia"})
    code, out, _ = run(capsys, "score", "textvqa", "--pred", p, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(100.0)


def test_gqa(tmp_path, capsys):
    gt = write_json(tmp_path / "testdev_balanced_questions.json",
                    {"201": {"answer": "yes", "question": "?"}, "202": {"answer": "left", "question": "?"}})
    p = preds(tmp_path / "a.jsonl", {"201": "Yes.", "202": "right"})
    code, out, _ = run(capsys, "score", "gqa", "--pred", p, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(50.0)


def test_pope_official_files_matched_through_the_question_file(tmp_path, capsys):
    d = tmp_path / "pope"
    d.mkdir()
    # as the official files: each category numbers its questions from 1
    write_jsonl(d / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}])
    write_jsonl(d / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 2, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"}])
    suffix = "\nAnswer the question using a single word or phrase."  # as in LLaVA's llava_pope_test.jsonl
    questions = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10, "image": "a.jpg", "text": "Is there a dog in the image?" + suffix, "category": "random"},
        {"question_id": 11, "image": "a.jpg", "text": "Is there a cat in the image?" + suffix, "category": "random"},
        {"question_id": 12, "image": "a.jpg", "text": "Is there a cat in the image?" + suffix,
         "category": "adversarial"},
        {"question_id": 13, "image": "b.jpg", "text": "Is there a car in the image?" + suffix,
         "category": "adversarial"}])
    # predictions in another order than the questions, and one wrong
    p = preds(tmp_path / "a.jsonl", {13: "No, there is no car.", 12: "No.", 11: "No, there is not.", 10: "Yes."})
    code, out, text = run(capsys, "score", "pope", "--pred", p, "--gt", d, "--questions", questions,
                          "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["scores"]["random"]["accuracy"] == 1.0 and out["scores"]["adversarial"]["accuracy"] == 0.5
    assert out["scores"]["adversarial"]["recall"] == 0.0
    code, _, text = run(capsys, "score", "pope", "--pred", p, "--gt", d)  # ids repeat: the question file is needed
    assert code == 2 and "pass the question file" in text


def test_scienceqa(tmp_path, capsys):
    gt = write_json(tmp_path / "problems.json", {
        "10": {"choices": ["a", "b"], "answer": 1, "image": "image.png"},
        "11": {"choices": ["a", "b"], "answer": 0, "image": None},
        "12": {"choices": ["a", "b"], "answer": 0, "image": None}})
    write_json(tmp_path / "pid_splits.json", {"test": ["10", "11"], "train": ["12"]})
    p = preds(tmp_path / "a.jsonl", {"10": "B", "11": "The answer is B."})
    code, out, _ = run(capsys, "score", "scienceqa", "--pred", p, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(100.0)
    assert out["scores"]["accuracy"] == pytest.approx(0.5)


def test_mmbench_copies_in_the_file_are_grouped_and_generated_only_when_absent(tmp_path, capsys):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]
    rows = [[0, "colour?", "nan", "red", "blue", "green", "", "B", "attr", "x", "dev"],
            [1, "count?", "nan", "one", "two", "", "", "A", "count", "x", "dev"]]
    tsv = tmp_path / "mmbench_dev.tsv"
    with open(tsv, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([header, *rows])
    p = preds(tmp_path / "a.jsonl", {0: "B", 1: "A"})
    code, out, text = run(capsys, "score", "mmbench", "--pred", p, "--gt", tsv, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(100.0), text
    # --circular on a file without copies: copy k shows texts[-k:] + texts[:-k]
    # question 0: (green, red, blue) -> C, (blue, green, red) -> A; question 1: (two, one) -> B
    p = preds(tmp_path / "c.jsonl", {0: "B", 1000000: "C", 2000000: "A", 1: "A", 1000001: "A"})
    code, out, text = run(capsys, "score", "mmbench", "--pred", p, "--gt", tsv, "--circular", "--out",
                          tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(50.0), text
    # the same copies written into the TSV (as the official dev TSV holds them): no --circular needed
    with open(tsv, "a", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([
            [1000000, "colour?", "nan", "green", "red", "blue", "", "C", "attr", "x", "dev"],
            [2000000, "colour?", "nan", "blue", "green", "red", "", "A", "attr", "x", "dev"],
            [1000001, "count?", "nan", "two", "one", "", "", "B", "count", "x", "dev"]])
    code, out2, text = run(capsys, "score", "mmbench", "--pred", p, "--gt", tsv, "--out", tmp_path / "r.json")
    assert code == 0 and out2["scores"] == out["scores"], text
    code, _, text = run(capsys, "score", "mmbench", "--pred", preds(tmp_path / "m.jsonl", {0: "B", 1: "A"}),
                        "--gt", tsv)
    assert code == 2 and "rotated copies" in text


def test_nlvr2_official_jsonl(tmp_path, capsys):
    gt = write_jsonl(tmp_path / "test1.json", [
        {"identifier": "test1-0-1-0", "sentence": "s", "label": "True"},
        {"identifier": "test1-0-1-1", "sentence": "s", "label": "False"},
        {"identifier": "test1-0-2-0", "sentence": "s", "label": "False"}])
    p = preds(tmp_path / "a.jsonl", {"test1-0-1-0": "true", "test1-0-1-1": "false", "test1-0-2-0": "true"})
    code, out, _ = run(capsys, "score", "nlvr2", "--pred", p, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(200 / 3)
    assert out["scores"]["consistency"] == pytest.approx(0.5)


def test_tvqa_and_how2qa(tmp_path, capsys):
    gt = write_jsonl(tmp_path / "tvqa_val.jsonl", [
        {"qid": 5, "q": "?", "a0": "x", "a1": "y", "a2": "z", "a3": "w", "a4": "v", "answer_idx": 2,
         "show_name": "Friends", "vid_name": "f", "ts": "1.0-2.0"},
        {"qid": 6, "q": "?", "a0": "x", "a1": "y", "a2": "z", "a3": "w", "a4": "v", "answer_idx": 4,
         "show_name": "House", "vid_name": "h", "ts": "1.0-2.0"}])
    p = preds(tmp_path / "a.jsonl", {5: "a2", 6: "a1"})
    code, out, _ = run(capsys, "score", "tvqa", "--pred", p, "--gt", gt, "--out", tmp_path / "r.json")
    assert code == 0 and out["score"] == pytest.approx(50.0)
    assert out["scores"]["per_group"] == {"Friends": 1.0, "House": 0.0}
    code, out, text = run(capsys, "score", "how2qa", "--pred", p, "--gt", gt)
    assert code == 2 and "tvqa_val.jsonl: line 1 (qid 5): has a4/show_name: this is a TVQA file" in text


CAPTIONS = {
    "101": ["a man riding a wave on top of a surfboard", "a surfer rides a large wave in the ocean"],
    "102": ["two dogs playing with a frisbee in the grass", "a pair of dogs play in a park"],
    "103": ["a plate of food with broccoli and rice", "a meal of rice and vegetables on a plate"],
}
PREDICTED = {"101": "a man riding a wave on a surfboard", "102": "two dogs play in the grass",
             "103": "a plate of rice with broccoli"}


def _direct_pycocoevalcap(refs, preds_):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds_[k]}] for k in refs})
    return Bleu(4).compute_score(gts, res, verbose=0)[0][3], Cider().compute_score(gts, res)[0]


def test_coco_caption_karpathy_equals_pycocoevalcap(tmp_path, capsys):
    images = [{"cocoid": int(k), "filename": f"COCO_val2014_{int(k):012d}.jpg", "split": "test",
               "sentences": [{"raw": c} for c in v]} for k, v in CAPTIONS.items()]
    images.append({"cocoid": 999, "filename": "x.jpg", "split": "train", "sentences": [{"raw": "ignored"}]})
    gt = write_json(tmp_path / "dataset_coco.json", {"images": images})
    p = preds(tmp_path / "a.jsonl", PREDICTED)
    code, out, text = run(capsys, "score", "coco_caption", "--pred", p, "--gt", gt, "--no-meteor",
                          "--out", tmp_path / "r.json")  # METEOR: tests/test_eval_official.py
    assert code == 0, text
    bleu4, cider = _direct_pycocoevalcap(CAPTIONS, PREDICTED)
    assert out["scores"]["CIDEr"] == pytest.approx(100 * cider, rel=1e-9)
    assert out["scores"]["Bleu_4"] == pytest.approx(100 * bleu4, rel=1e-9)
    assert out["score"] == pytest.approx(100 * cider, rel=1e-9)
    assert "METEOR" not in out["scores"] and 0 < out["scores"]["ROUGE_L"] < 100


def test_tvc_value_release(tmp_path, capsys):
    gt = write_jsonl(tmp_path / "tvc_val_release.jsonl", [
        {"vid_name": "v", "clip_id": int(k), "ts": [0, 1], "duration": 5,
         "descs": [{"desc": c, "desc_id": i, "type": "v"} for i, c in enumerate(v)]} for k, v in CAPTIONS.items()])
    p = preds(tmp_path / "a.jsonl", PREDICTED)
    code, out, text = run(capsys, "score", "tvc", "--pred", p, "--gt", gt, "--no-meteor", "--tvc-protocol", "value",
                          "--out", tmp_path / "r.json")
    assert code == 0, text
    assert out["scores"]["CIDEr"] == pytest.approx(100 * _direct_pycocoevalcap(CAPTIONS, PREDICTED)[1], rel=1e-9)
    code, out, text = run(capsys, "score", "yc2c", "--pred", p, "--gt", gt, "--no-meteor", "--out", tmp_path / "r.json")
    assert code == 0, text


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_prediction_files_name_the_line(tmp_path, capsys):
    gt = vqa_annotations(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": \n')
    code, _, text = run(capsys, "score", "vqav2", "--pred", bad, "--gt", gt)
    assert code == 2 and "bad.jsonl:2: not valid JSON" in text
    dup = preds(tmp_path / "dup.jsonl", {1: "yes"})
    dup.write_text(dup.read_text() + '{"question_id": "1", "text": "no"}\n')
    code, _, text = run(capsys, "score", "vqav2", "--pred", dup, "--gt", gt)
    assert code == 2 and "dup.jsonl:2: duplicate question_id '1'" in text
    extra = preds(tmp_path / "extra.jsonl", {1: "yes", 2: "2", 77: "no"})
    code, _, text = run(capsys, "score", "vqav2", "--pred", extra, "--gt", gt)
    assert code == 2 and "'77' (line 3)" in text
    nokey = write_jsonl(tmp_path / "nokey.jsonl", [{"question_id": 1, "answer": "yes"}])
    code, _, text = run(capsys, "score", "vqav2", "--pred", nokey, "--gt", gt)
    assert code == 2 and "nokey.jsonl:1: expected an object with 'question_id' and 'text'" in text


def test_missing_predictions_need_allow_partial_and_report_coverage(tmp_path, capsys):
    gt = vqa_annotations(tmp_path)
    p = preds(tmp_path / "a.jsonl", {2: ""})
    code, _, text = run(capsys, "score", "vqav2", "--pred", p, "--gt", gt)
    assert code == 2 and "1 of 2 questions have no prediction" in text
    code, out, text = run(capsys, "score", "vqav2", "--pred", p, "--gt", gt, "--allow-partial",
                          "--out", tmp_path / "r.json")
    assert code == 0 and "MISSING" in text and "1 empty answers" in text
    assert out["coverage"] == {"predicted": 1, "expected": 2, "fraction": 0.5, "missing": 1, "empty_answers": 1}


def test_submission_writers(tmp_path, capsys):
    questions = write_json(tmp_path / "test2015_questions.json",
                           {"questions": [{"question_id": 5, "image_id": 1, "question": "?"},
                                          {"question_id": 6, "image_id": 1, "question": "?"}]})
    p = preds(tmp_path / "a.jsonl", {5: "Two."})
    code, _, _ = run(capsys, "submit", "vqav2", "--pred", p, "--questions", questions, "--out", tmp_path / "s.json")
    assert code == 0
    assert json.loads((tmp_path / "s.json").read_text()) == [{"question_id": 5, "answer": "2"},
                                                             {"question_id": 6, "answer": ""}]
    vizwiz_q = write_json(tmp_path / "test.json", [{"image": "VizWiz_test_00000000.jpg", "question": "?"}])
    p = preds(tmp_path / "b.jsonl", {"VizWiz_test_00000000": "Unanswerable"})
    code, _, _ = run(capsys, "submit", "vizwiz", "--pred", p, "--questions", vizwiz_q, "--out", tmp_path / "v.json")
    assert code == 0
    assert json.loads((tmp_path / "v.json").read_text()) == [{"image": "VizWiz_test_00000000.jpg",
                                                              "answer": "unanswerable"}]


def test_real_entry_point_lists_tasks():
    proc = subprocesses.run([sys.executable, "-m", "eval", "tasks"], what="python -m eval tasks", timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    for task in ("vqav2", "vizwiz", "textvqa", "gqa", "pope", "scienceqa", "mmbench", "nlvr2", "coco_caption",
                 "tvqa", "how2qa", "tvc", "yc2c"):
        assert task in proc.stdout


def test_mmbench_submission_adds_copies_only_to_a_tsv_without_them(tmp_path, capsys):
    import pandas as pd
    tsv = tmp_path / "mmbench_test_en.tsv"
    with open(tsv, "w", newline="") as f:  # the test split has no answer column
        csv.writer(f, delimiter="\t").writerows([["index", "question", "hint", "A", "B", "C", "category"],
                                                 [3, "colour?", "nan", "red", "blue", "green", "attr"]])
    p = preds(tmp_path / "a.jsonl", {3: "A", 1000003: "B", 2000003: "C"})
    code = main(["submit", "mmbench", "--pred", str(p), "--questions", str(tsv), "--out", str(tmp_path / "s.xlsx"),
                 "--circular"])
    assert code == 0, capsys.readouterr()
    sheet = pd.read_excel(tmp_path / "s.xlsx")
    assert list(sheet["index"]) == [3, 1000003, 2000003] and list(sheet["prediction"]) == ["A", "B", "C"]
    assert list(sheet.loc[1, ["A", "B", "C"]]) == ["green", "red", "blue"]  # copy 1: texts[-1:] + texts[:-1]
    code, _, text = run(capsys, "submit", "mmbench", "--pred", p, "--questions", tsv, "--out", tmp_path / "s.xlsx")
    assert code == 2 and "2 ids are not in" in text  # without --circular the file has no copies to answer


def test_value_qa_submission_parses_answers_as_the_reference_when_asked(tmp_path, capsys):
    """multitask_video.py writes int(pred['answer'][1]), 0 when that fails; `exact` (the CLI's default) writes -1
    for anything but a{k}."""
    from eval.submission import value_answer_index

    table = {"a3": (3, 3), "a3.": (3, -1), "A1": (1, -1), "b2": (2, -1), "a9": (9, -1), "a": (0, -1), "": (0, -1),
             " a3": (0, -1), "answer a2": (0, -1)}
    for text, (official, exact) in table.items():
        assert value_answer_index(text, 5, "official") == official, text
        assert value_answer_index(text, 5, "exact") == exact, text
    questions = tmp_path / "tvqa_test_release.jsonl"
    questions.write_text("".join(json.dumps({"qid": i, "vid_name": "v", "q": "q", "ts": "0-1",
                                             **{f"a{k}": "x" for k in range(5)}}) + "\n" for i in range(3)))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in enumerate(["a3.", "a1", "x"])))
    out = tmp_path / "tvqa_test_predictions.json"
    assert main(["submit", "tvqa", "--pred", str(pred), "--questions", str(questions), "--out", str(out),
                 "--answer-parsing", "official"]) == 0
    assert json.loads(out.read_text()) == {"0": 3, "1": 1, "2": 0}
    assert main(["submit", "tvqa", "--pred", str(pred), "--questions", str(questions), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"0": -1, "1": 1, "2": -1}
    capsys.readouterr()
    assert main(["submit", "tvc", "--pred", str(pred), "--questions", str(questions), "--out", str(out),
                 "--answer-parsing", "official"]) == 2
    assert "--answer-parsing applies to tvqa and how2qa" in capsys.readouterr().err


def test_value_submissions_in_the_servers_format(tmp_path, capsys):
    """VALUE-Leaderboard/EvaluationTools' sample submission: QA {qid: index}; captions one JSON line per clip."""
    def jsonl(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def submit(capsys, *argv):
        code = main(list(map(str, argv)))
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    tvqa = jsonl(tmp_path / "tvqa_test_release.jsonl", [
        {"qid": q, "vid_name": f"s01e0{q}_seg02_clip_0{q}", "q": "?", "ts": "1.0-2.0",
         **{f"a{i}": str(i) for i in range(5)}} for q in (11, 12, 13)])
    pred = jsonl(tmp_path / "p.jsonl", [{"question_id": 11, "text": "a3"}, {"question_id": 12, "text": "a0"},
                                        {"question_id": 13, "text": "A3."}])
    out = tmp_path / "tvqa" / "tvqa_test_predictions.json"
    code, text = submit(capsys, "submit", "tvqa", "--pred", pred, "--questions", tvqa, "--out", out)
    assert code == 0, text
    assert json.loads(out.read_text()) == {"11": 3, "12": 0, "13": -1}  # only an exact a{k} is an answer
    assert '"non_canonical_answers": 1' in text
    # How2QA has 4 choices: a4 is not one of them
    jsonl(pred, [{"question_id": q, "text": "a4"} for q in (11, 12, 13)])
    code, text = submit(capsys, "submit", "how2qa", "--pred", pred, "--questions", tvqa, "--out", tmp_path / "h.json")
    assert code == 0 and set(json.loads((tmp_path / "h.json").read_text()).values()) == {-1}
    jsonl(pred, [{"question_id": 11, "text": "a1"}])
    code, text = submit(capsys, "submit", "tvqa", "--pred", pred, "--questions", tvqa, "--out", out)
    assert code == 2 and "2 questions unanswered" in text

    tvc = jsonl(tmp_path / "tvc_test_release.jsonl", [
        {"vid_name": "friends_s01e01_seg02_clip_00", "clip_id": 7, "ts": [1.5, 4.0], "duration": 60.0},
        {"vid_name": "friends_s01e01_seg02_clip_01", "clip_id": 9, "ts": [0.0, 2.0], "duration": 60.0}])
    jsonl(pred, [{"question_id": 9, "text": "he sits down."}, {"question_id": 7, "text": "she laughs."}])
    code, text = submit(capsys, "submit", "tvc", "--pred", pred, "--questions", tvc, "--out", tmp_path / "tvc.jsonl")
    assert code == 0, text
    lines = [json.loads(line) for line in (tmp_path / "tvc.jsonl").read_text().splitlines()]
    assert lines == [{"vid_name": "friends_s01e01_seg02_clip_00", "clip_id": 7, "ts": [1.5, 4.0],
                      "descs": [{"desc": "she laughs."}]},
                     {"vid_name": "friends_s01e01_seg02_clip_01", "clip_id": 9, "ts": [0.0, 2.0],
                      "descs": [{"desc": "he sits down."}]}]
    code, text = submit(capsys, "submit", "yc2c", "--pred", pred, "--questions", tvc, "--out", tmp_path / "y.jsonl")
    assert code == 0 and "ts" not in json.loads((tmp_path / "y.jsonl").read_text().splitlines()[0])
