"""Every `python -m eval score` task as an `evaluate` metric (eval/metrics/<task>/<task>.py), loaded the way a user
loads it: `evaluate.load(<path in the repository>)` in a fresh process started outside the repository, offline, with
the repository on PYTHONPATH; its numbers equal the CLI's on the same questions written as official files."""
import csv
import json
import os
import subprocesses
import sys
from pathlib import Path

import pytest

from eval.cli import main

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [["a man riding a wave on top of a surfboard", "a surfer rides a large wave in the ocean"],
            ["two dogs playing with a frisbee in the grass", "a pair of dogs play in a park"],
            ["a plate of food with broccoli and rice", "a meal of rice and vegetables on a plate"]]
CAPTIONED = ["a man riding a wave on a surfboard", "two dogs play in the grass", "a plate of rice with broccoli"]


def jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def js(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def cases(tmp: Path) -> dict:
    """task -> (CLI arguments after --pred, {prediction id: text}, the metric's compute arguments)."""
    out = {}
    vqa = [["yes"] * 10, ["two"] * 3 + ["three"] * 7, ["blue"] * 2 + ["navy"] * 8]
    vqa_pred = ["Yes", "2", "navy"]
    out["vqav2"] = (["--gt", js(tmp / "vqa.json", {"annotations": [
        {"question_id": k, "answers": [{"answer": a} for a in ans]} for k, ans in enumerate(vqa)]})],
        dict(enumerate(vqa_pred)), {"references": vqa})
    out["vizwiz"] = (["--gt", js(tmp / "val.json", [{"image": f"VizWiz_val_{k}.jpg", "question": "?",
                                                     "answers": [{"answer": a} for a in ans]}
                                                    for k, ans in enumerate(vqa)]), "--prediction-processing", "none"],
                     {f"VizWiz_val_{k}.jpg": p for k, p in enumerate(vqa_pred)},
                     {"references": vqa, "prediction_processing": "none"})
    tv = [["Nokia"] * 10, ["stop"] * 6 + ["STOP sign"] * 4, ["2"] * 2 + ["22"] * 8]
    out["textvqa"] = (["--gt", js(tmp / "textvqa.json", {"data": [
        {"question_id": 100 + k, "image_id": f"i{k}", "question": "?", "answers": a} for k, a in enumerate(tv)]})],
        {100 + k: p for k, p in enumerate(["nokia", "Stop sign", "two"])}, {"references": tv})
    gqa = [("yes", True, "verify", "attr"), ("left", True, "query", "rel"), ("cat", False, "query", "cat"),
           ("no", True, "verify", "obj")]
    out["gqa"] = (["--gt", js(tmp / "gqa.json", {str(k): {"answer": a, "isBalanced": b,
                                                          "types": {"structural": s, "semantic": m}}
                                                 for k, (a, b, s, m) in enumerate(gqa)})],
                  dict(enumerate(["Yes.", "right", "cat", "no"])),
                  {"references": [g[0] for g in gqa], "balanced": [g[1] for g in gqa],
                   "structural": [g[2] for g in gqa], "semantic": [g[3] for g in gqa]})
    pope = [("yes", "random"), ("no", "random"), ("no", "adversarial"), ("yes", "adversarial"), ("yes", "popular")]
    pope_pred = ["Yes.", "No, there is not.", "No.", "No, there is no car.", "Yes"]
    out["pope"] = (["--gt", jsonl(tmp / "pope.jsonl", [{"question_id": k, "label": lab, "category": c}
                                                      for k, (lab, c) in enumerate(pope)])],
                   dict(enumerate(pope_pred)),
                   {"references": [p[0] for p in pope], "categories": [p[1] for p in pope]})
    sqa = [(["a", "b"], 1, True), (["x", "y", "z"], 2, False), (["p", "q"], 0, True)]
    js(tmp / "pid_splits.json", {"test": ["0", "1", "2"]})
    out["scienceqa"] = (["--gt", js(tmp / "problems.json", {str(k): {"choices": c, "answer": a,
                                                                     "image": "i.png" if im else None}
                                                            for k, (c, a, im) in enumerate(sqa)})],
                        dict(enumerate(["B", "The answer is C.", "B. q"])),
                        {"references": [s[1] for s in sqa], "choices": [s[0] for s in sqa],
                         "has_image": [s[2] for s in sqa]})
    mm = [(0, "red", "blue", "green", "B", "attr", "x"), (1, "one", "two", "", "A", "count", "y"),
          (1000000, "green", "red", "blue", "C", "attr", "x"), (2000000, "blue", "green", "red", "A", "attr", "x"),
          (1000001, "two", "one", "", "B", "count", "y")]
    tsv = tmp / "mmbench.tsv"
    with open(tsv, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["index", "question", "A", "B", "C", "answer", "category",
                                                  "l2-category"]] + [[i, "?", a, b, c, ans, cat, l2]
                                                                     for i, a, b, c, ans, cat, l2 in mm])
    mm_pred = {0: "B", 1: "A", 1000000: "C", 2000000: "A", 1000001: "A"}
    out["mmbench"] = (["--gt", str(tsv)], mm_pred,
                      {"references": [m[4] for m in mm], "indices": [m[0] for m in mm],
                       "choices": [{k: v for k, v in zip("ABC", m[1:4]) if v} for m in mm],
                       "categories": [m[5] for m in mm], "l2_categories": [m[6] for m in mm]})
    nl = [("test1-0-1-0", True), ("test1-0-1-1", False), ("test1-0-2-0", False)]
    out["nlvr2"] = (["--gt", jsonl(tmp / "nlvr2.jsonl", [{"identifier": i, "label": str(lab)} for i, lab in nl])],
                    dict(zip([n[0] for n in nl], ["true", "false", "True"])),
                    {"references": [n[1] for n in nl], "identifiers": [n[0] for n in nl]})
    tq = [(2, "Friends"), (4, "House"), (0, "House")]
    out["tvqa"] = (["--gt", jsonl(tmp / "tvqa.jsonl", [{"qid": k, **{f"a{j}": "x" for j in range(5)},
                                                       "answer_idx": a, "show_name": s}
                                                      for k, (a, s) in enumerate(tq)])],
                   dict(enumerate(["a2", "a1", "a0"])), {"references": [t[0] for t in tq], "groups": [t[1] for t in tq]})
    out["how2qa"] = (["--gt", jsonl(tmp / "how2qa.jsonl", [{"qid": k, **{f"a{j}": "x" for j in range(4)},
                                                           "answer_idx": a} for k, a in enumerate([3, 1])]),
                      "--lenient-answers"], dict(enumerate(["A3", "a2"])),
                     {"references": [3, 1], "lenient_answers": True})
    images = [{"cocoid": k, "split": "test", "sentences": [{"raw": c} for c in refs]} for k, refs in enumerate(CAPTIONS)]
    out["coco_caption"] = (["--gt", js(tmp / "dataset_coco.json", {"images": images}), "--no-meteor"],
                           dict(enumerate(CAPTIONED)), {"references": CAPTIONS, "meteor": False})
    clips = [{"clip_id": k, "descs": [{"desc": c} for c in refs]} for k, refs in enumerate(CAPTIONS)]
    out["tvc"] = (["--gt", jsonl(tmp / "tvc.jsonl", clips), "--no-meteor", "--tvc-protocol", "per-description"],
                  dict(enumerate(CAPTIONED)), {"references": CAPTIONS, "meteor": False,
                                               "tvc_protocol": "per-description"})
    out["yc2c"] = (["--gt", jsonl(tmp / "yc2c.jsonl", clips), "--no-meteor"], dict(enumerate(CAPTIONED)),
                   {"references": CAPTIONS, "meteor": False})
    return out


LOAD_ALL = """
import json, sys
import evaluate
calls = json.load(open(sys.argv[1]))
out = {}
for task, (predictions, kwargs) in calls.items():
    metric = evaluate.load(sys.argv[2] + "/eval/metrics/" + task)
    out[task] = metric.compute(predictions=predictions, **kwargs)
print(json.dumps(out))
"""


def user_env(tmp: Path, pythonpath: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    return env


def test_every_task_loads_with_evaluate_and_gives_the_clis_numbers(tmp_path, capsys):
    from eval.tasks import TASKS
    data = cases(tmp_path)
    assert sorted(data) == sorted(TASKS)  # every scorer has its metric
    assert sorted(p.name for p in (ROOT / "eval" / "metrics").iterdir()) == sorted(TASKS)
    expected, calls = {}, {}
    for task, (argv, predictions, kwargs) in data.items():
        pred = jsonl(tmp_path / f"{task}_pred.jsonl", [{"question_id": k, "text": v} for k, v in predictions.items()])
        out = tmp_path / f"{task}_scores.json"
        assert main(["score", task, "--pred", pred, *argv, "--out", str(out)]) == 0, capsys.readouterr().err
        result = json.loads(out.read_text())
        expected[task] = {"score": result["score"], **result["scores"], "coverage": result["coverage"]}
        calls[task] = (list(predictions.values()), kwargs)
    capsys.readouterr()
    assert 0 < expected["mmbench"]["score"] < 100 and 0 < expected["vqav2"]["score"] < 100
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    (tmp_path / "load_all.py").write_text(LOAD_ALL)
    user = tmp_path / "elsewhere"  # a user's folder: the repository is not the working directory
    user.mkdir()
    done = subprocesses.run([sys.executable, str(tmp_path / "load_all.py"), str(tmp_path / "calls.json"), str(ROOT)],
                            what="evaluate.load of every metric from another folder", timeout=300, cwd=user,
                            env=user_env(tmp_path, pythonpath=True))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for task in TASKS:
        assert got[task] == expected[task], task  # the same code: the same floats


def test_without_the_repository_importable_the_metric_says_what_to_do(tmp_path):
    code = f"import evaluate; evaluate.load({str(ROOT / 'eval' / 'metrics' / 'textvqa')!r})"
    done = subprocesses.run([sys.executable, "-c", code], what="evaluate.load without the repository importable",
                            timeout=300, cwd=tmp_path, env=user_env(tmp_path, pythonpath=False))
    assert done.returncode != 0
    assert ("ImportError: the textvqa metric runs the scorers of the dora-vl repository (its `eval` package), which "
            "is not importable here") in done.stderr and "pip install -e <repository>" in done.stderr


def test_a_wrong_argument_is_refused():
    from eval.hf_metrics import compute
    with pytest.raises(ValueError, match=r"choices=\[\.\.\.\] is required"):
        compute("scienceqa", ["A"], [0])
    with pytest.raises(ValueError, match="categories has 1 values for 2 predictions"):
        compute("pope", ["yes", "no"], ["yes", "no"], categories=["random"])
    with pytest.raises(ValueError, match=r"unknown arguments \['lenient'\]"):
        compute("nlvr2", ["true"], [True], identifiers=["test1-0-1-0"], lenient=True)
