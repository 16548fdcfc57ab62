"""Benchmark splits as `datasets` (eval/dataset_splits.py): the same small set written in the official / LLaVA files
and in lmms-eval's hub layout (images embedded, save_to_disk, parquet, a hub id in the local cache) scores the same,
and `eval generate` asks the same prompts and gets the same answers from both."""
import csv
import io
import json
from pathlib import Path

import pytest

from eval.cli import main

SHORT = "\nAnswer the question using a single word or phrase."


def png(colour) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preds(path: Path, answers: dict) -> Path:
    return write_jsonl(path, [{"question_id": k, "text": v} for k, v in answers.items()])


def score(capsys, task, pred, *truth) -> dict:
    out = pred.with_suffix(".scores.json")
    code = main(["score", task, "--pred", str(pred), *map(str, truth), "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    result = json.loads(out.read_text())
    return {k: result[k] for k in ("score", "scores", "coverage")}


def save(rows, features: dict, folder: Path, split: str):
    """A DatasetDict {split: rows} written by save_to_disk, and the split as a parquet file (hub naming)."""
    import datasets
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    datasets.DatasetDict({split: ds}).save_to_disk(str(folder / "saved"))
    (folder / "parquet").mkdir(parents=True)
    ds.to_parquet(str(folder / "parquet" / f"{split}-00000-of-00001.parquet"))
    return folder / "saved", folder / "parquet" / f"{split}-00000-of-00001.parquet"


def hub_cache(cache: Path, repo: str, files: dict) -> None:
    """A hub dataset as huggingface_hub caches it: refs/main -> snapshots/<commit>/<path in the repository>."""
    root = cache / ("datasets--" + repo.replace("/", "--"))
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for inside, source in files.items():
        target = root / "snapshots" / commit / inside
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(source).read_bytes())


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # parquet is converted into datasets' Arrow cache: keep it in the test's folder; the hub cache is empty
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def vqa_features():
    import datasets as d
    return {"question_type": d.Value("string"), "multiple_choice_answer": d.Value("string"),
            "answers": [{"answer": d.Value("string"), "answer_confidence": d.Value("string"),
                         "answer_id": d.Value("int64")}],
            "image_id": d.Value("int64"), "answer_type": d.Value("string"), "question_id": d.Value("int64"),
            "question": d.Value("string"), "image": d.Image()}


# ------------------------------------------------------------------------------------------------ scoring
TEXTVQA = [  # question_id, image_id, question, answers
    (34602, "abc", "what brand is this?", ["Nokia"] * 10),
    (34603, "abc", "what is written on top?", ["stop"] * 6 + ["STOP sign"] * 4),
    (34604, "def", "what number is shown?", ["2"] * 2 + ["22"] * 8),
]


def textvqa_rows(images: dict):
    return [{"image_id": img, "question_id": qid, "question": q, "question_tokens": q.split(),
             "image": {"bytes": images[img], "path": None}, "image_width": 8, "image_height": 8,
             "flickr_original_url": "", "flickr_300k_url": "", "answers": answers, "image_classes": ["sign"],
             "set_name": "val", "ocr_tokens": ["nokia", "stop"]} for qid, img, q, answers in TEXTVQA]


def textvqa_features():
    import datasets as d
    return {"image_id": d.Value("string"), "question_id": d.Value("int32"), "question": d.Value("string"),
            "question_tokens": d.Sequence(d.Value("string")), "image": d.Image(), "image_width": d.Value("int32"),
            "image_height": d.Value("int32"), "flickr_original_url": d.Value("string"),
            "flickr_300k_url": d.Value("string"), "answers": d.Sequence(d.Value("string")),
            "image_classes": d.Sequence(d.Value("string")), "set_name": d.Value("string"),
            "ocr_tokens": d.Sequence(d.Value("string"))}


def test_textvqa_scores_equal_from_llavas_files_a_saved_split_parquet_and_a_cached_hub_id(tmp_path, capsys,
                                                                                        monkeypatch):
    gt = tmp_path / "TextVQA_0.5.1_val.json"
    gt.write_text(json.dumps({"data": [{"question_id": q, "image_id": i, "question": t, "answers": a}
                                       for q, i, t, a in TEXTVQA]}))
    saved, parquet = save(textvqa_rows({"abc": png("red"), "def": png("blue")}), textvqa_features(), tmp_path,
                          "validation")
    hub_cache(tmp_path / "hub-cache", "lmms-lab/textvqa", {"data/validation-00000-of-00001.parquet": parquet})
    # LLaVA's answer file keys TextVQA by image id + the prompt's question; the dataset's answers by question id
    suffix = "\nReference OCR token: nokia, stop" + SHORT
    llava = write_jsonl(tmp_path / "llava.jsonl", [
        {"question_id": "abc", "prompt": "what brand is this?" + suffix, "text": "nokia"},
        {"question_id": "abc", "prompt": "what is written on top?" + suffix, "text": "Stop sign"},
        {"question_id": "def", "prompt": "what number is shown?" + suffix, "text": "two"}])
    by_id = preds(tmp_path / "by_id.jsonl", {34602: "nokia", 34603: "Stop sign", 34604: "two"})
    official = score(capsys, "textvqa", llava, "--gt", gt)
    assert official["score"] == pytest.approx(100 * (1 + 1 + 0.6) / 3)  # "two" -> "2": 2 of 10 answers
    for source in (saved, parquet, parquet.parent, "lmms-lab/textvqa"):
        got = score(capsys, "textvqa", by_id, "--dataset", source)
        assert got["score"] == official["score"] and got["coverage"] == official["coverage"], source
    # scoring reads no image
    import PIL.Image
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("image read")))
    assert score(capsys, "textvqa", by_id, "--dataset", saved)["score"] == official["score"]


def test_vqav2(tmp_path, capsys):
    import datasets as d  # noqa: F401
    anns = [(1, 9, "is it red?", ["yes"] * 10), (2, 9, "how many?", ["two"] * 3 + ["three"] * 7),
            (3, 10, "what colour?", ["blue"] * 2 + ["navy"] * 8)]
    gt = tmp_path / "v2_mscoco_val2014_annotations.json"
    entries = lambda a: [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]  # noqa
    gt.write_text(json.dumps({"annotations": [{"question_id": q, "image_id": i, "answers": entries(a)}
                                              for q, i, _, a in anns]}))
    rows = [{"question_type": "what", "multiple_choice_answer": a[0], "answers": entries(a), "image_id": i,
             "answer_type": "other", "question_id": q, "question": t, "image": {"bytes": png("red"), "path": None}}
            for q, i, t, a in anns]
    saved, _ = save(rows, vqa_features(), tmp_path, "validation")
    p = preds(tmp_path / "a.jsonl", {1: "Yes", 2: "2", 3: "navy"})
    official = score(capsys, "vqav2", p, "--gt", gt)
    assert official["score"] == pytest.approx(100 * (1 + 0.9 + 1) / 3)
    assert score(capsys, "vqav2", p, "--dataset", saved) == official


def test_gqa_questions_and_the_separate_image_table(tmp_path, capsys):
    import datasets as d
    qs = [("201", "img1", "is it red?", "yes", True, "verify", "attr"),
          ("202", "img1", "which side?", "left", True, "query", "rel"),
          ("203", "img2", "what is it?", "cat", False, "query", "cat"),
          ("204", "img2", "is there a dog?", "no", True, "verify", "obj")]
    gt = tmp_path / "testdev_balanced_questions.json"
    gt.write_text(json.dumps({q: {"imageId": i, "question": t, "answer": a, "isBalanced": b,
                                  "types": {"structural": s, "semantic": m, "detailed": "x"}}
                              for q, i, t, a, b, s, m in qs}))
    rows = [{"id": q, "imageId": i, "question": t, "answer": a, "fullAnswer": f"It is {a}.", "isBalanced": b,
             "types": {"structural": s, "semantic": m, "detailed": "x"}, "semanticStr": ""}
            for q, i, t, a, b, s, m in qs]
    features = {"id": d.Value("string"), "imageId": d.Value("string"), "question": d.Value("string"),
                "answer": d.Value("string"), "fullAnswer": d.Value("string"), "isBalanced": d.Value("bool"),
                "types": {"structural": d.Value("string"), "semantic": d.Value("string"),
                          "detailed": d.Value("string")}, "semanticStr": d.Value("string")}
    saved, _ = save(rows, features, tmp_path / "instructions", "testdev")
    p = preds(tmp_path / "a.jsonl", {"201": "Yes.", "202": "right", "203": "cat", "204": "no"})
    official = score(capsys, "gqa", p, "--gt", gt)
    assert official["score"] == pytest.approx(200 / 3)  # 203 is not balanced: not scored
    assert score(capsys, "gqa", p, "--dataset", saved) == official
    # generate's questions: each one's image is the image table's row of its imageId, decoded when asked for
    from eval.dataset_splits import read_questions
    table, _ = save([{"id": "img2", "image": {"bytes": png("blue"), "path": None}},
                     {"id": "img1", "image": {"bytes": png("red"), "path": None}}],
                    {"id": d.Value("string"), "image": d.Image()}, tmp_path / "images", "testdev")
    questions, image_of = read_questions("gqa", str(saved), images=str(table))
    assert [q["text"] for q in questions][:1] == ["is it red?" + SHORT]
    assert [image_of(q).getpixel((0, 0)) for q in questions] == [(255, 0, 0)] * 2 + [(0, 0, 255)] * 2


def pope_sets(tmp_path):
    import datasets as d
    # the official files number each category from 1; the hub's rows have a unique id besides
    items = [("random", 1, "a.jpg", "Is there a dog in the image?", "yes"),
             ("random", 2, "a.jpg", "Is there a cat in the image?", "no"),
             ("adversarial", 1, "a.jpg", "Is there a cat in the image?", "no"),
             ("adversarial", 2, "b.jpg", "Is there a car in the image?", "yes")]
    folder = tmp_path / "pope"
    folder.mkdir()
    for cat in ("random", "adversarial"):
        write_jsonl(folder / f"coco_pope_{cat}.json", [{"question_id": n, "image": im, "text": t, "label": lab}
                                                      for c, n, im, t, lab in items if c == cat])
    questions = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10 + k, "image": im, "text": t + SHORT, "category": c} for k, (c, _, im, t, _) in
        enumerate(items)])
    rows = [{"id": str(k), "question_id": str(n), "question": t, "answer": lab, "image_source": Path(im).stem,
             "image": {"bytes": png("red"), "path": None}, "category": c}
            for k, (c, n, im, t, lab) in enumerate(items)]
    features = {"id": d.Value("string"), "question_id": d.Value("string"), "question": d.Value("string"),
                "answer": d.Value("string"), "image_source": d.Value("string"), "image": d.Image(),
                "category": d.Value("string")}
    saved, _ = save(rows, features, tmp_path / "hub", "test")
    return folder, questions, saved


def test_pope(tmp_path, capsys):
    folder, questions, saved = pope_sets(tmp_path)
    answers = ["Yes.", "No, there is not.", "No.", "No, there is no car."]
    official = score(capsys, "pope", preds(tmp_path / "a.jsonl", {10 + k: a for k, a in enumerate(answers)}),
                     "--gt", folder, "--questions", questions)
    assert official["scores"]["adversarial"]["accuracy"] == 0.5
    got = score(capsys, "pope", preds(tmp_path / "b.jsonl", {str(k): a for k, a in enumerate(answers)}),
                "--dataset", saved)
    assert got == official


MMBENCH = [  # index, question, A, B, C, D, answer, category, l2
    (0, "colour?", "red", "blue", "green", None, "B", "attr", "x"),
    (1, "count?", "one", "two", None, None, "A", "count", "y"),
    (1000000, "colour?", "green", "red", "blue", None, "C", "attr", "x"),
    (2000000, "colour?", "blue", "green", "red", None, "A", "attr", "x"),
    (1000001, "count?", "two", "one", None, None, "B", "count", "y"),
]


def test_mmbench_rows_with_rotated_copies(tmp_path, capsys):
    import datasets as d
    tsv = tmp_path / "mmbench_dev_en.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]
    with open(tsv, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([header] + [[i, q, "nan", a, b, c or "", dd or "", ans, cat, l2, "dev"]
                                                          for i, q, a, b, c, dd, ans, cat, l2 in MMBENCH])
    # the hub's en config: index as a string, absent options "nan" (or null), L2-category
    rows = [{"index": str(i), "question": q, "hint": "nan", "answer": ans, "A": a, "B": b, "C": c or "nan",
             "D": dd, "category": cat, "image": {"bytes": png("red"), "path": None}, "source": "s",
             "L2-category": l2, "comment": "", "split": "dev"} for i, q, a, b, c, dd, ans, cat, l2 in MMBENCH]
    features = {k: d.Value("string") for k in ("index", "question", "hint", "answer", "A", "B", "C", "D", "category")}
    features.update(image=d.Image(), source=d.Value("string"), **{"L2-category": d.Value("string")},
                    comment=d.Value("string"), split=d.Value("string"))
    saved, _ = save(rows, features, tmp_path / "hub", "dev")
    # "one, not nan" is option A by the text rule only while the "nan" cell is no option (pandas' NA rule)
    p = preds(tmp_path / "a.jsonl", {0: "B", 1000000: "C", 2000000: "A", 1: "one, not nan", 1000001: "A"})
    official = score(capsys, "mmbench", p, "--gt", tsv)
    assert official["score"] == pytest.approx(50.0) and official["scores"]["single_pass_accuracy"] == 1.0
    assert score(capsys, "mmbench", p, "--dataset", saved) == official


def test_scienceqa_img_rows_are_numbered(tmp_path, capsys):
    import datasets as d
    problems = [("10", ["a", "b"], 1, True), ("11", ["x", "y", "z"], 2, True), ("12", ["p", "q"], 0, True)]
    gt = tmp_path / "problems.json"
    gt.write_text(json.dumps({pid: {"question": "?", "choices": c, "answer": a, "image": "image.png" if im else None,
                                    "hint": ""} for pid, c, a, im in problems}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": [p[0] for p in problems]}))
    rows = [{"image": {"bytes": png("red"), "path": None}, "question": "?", "choices": c, "answer": a, "hint": "",
             "task": "closed choice", "grade": "grade5", "subject": "natural science", "topic": "t", "category": "c",
             "skill": "s", "lecture": "", "solution": ""} for _, c, a, _ in problems]
    features = {"image": d.Image(), "question": d.Value("string"), "choices": d.Sequence(d.Value("string")),
                "answer": d.Value("int8"), **{k: d.Value("string") for k in (
                    "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")}}
    saved, _ = save(rows, features, tmp_path / "hub", "test")
    answers = ["B", "The answer is A.", "A. p"]
    official = score(capsys, "scienceqa", preds(tmp_path / "a.jsonl", {p[0]: a for p, a in zip(problems, answers)}),
                     "--gt", gt)
    assert official["score"] == pytest.approx(200 / 3)
    got = score(capsys, "scienceqa", preds(tmp_path / "b.jsonl", {k: a for k, a in enumerate(answers)}),
                "--dataset", saved)
    assert got == official


def test_an_image_struct_with_neither_bytes_nor_path_is_no_image():
    """ScienceQA's image subset counts a row as an image question only if it holds an image: a null image, and an
    image struct whose bytes and path are both null (parquet written by other tools), are none."""
    import datasets as d
    import pyarrow as pa

    from eval.dataset_splits import _has_image
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": b"png", "path": None}, {"bytes": None, "path": "a.png"}, {"bytes": None, "path": None}, None]
    ds = d.Dataset(pa.table({"image": pa.array(rows, type=image)}))
    assert _has_image(ds) == [True, True, False, False]


def test_a_hub_id_not_in_the_cache_and_a_wrong_layout_are_one_line_errors(tmp_path, capsys):
    p = preds(tmp_path / "a.jsonl", {1: "yes"})
    assert main(["score", "textvqa", "--pred", str(p), "--dataset", "lmms-lab/textvqa"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dataset lmms-lab/textvqa: not a local folder or file, and not a dataset in the "
                          "local hub cache") and err.count("\n") == 1
    folder, _, saved = pope_sets(tmp_path)
    assert main(["score", "textvqa", "--pred", str(p), "--dataset", str(saved), "--dataset-split", "test"]) == 2
    assert "no ['image_id', 'answers'] column for textvqa" in capsys.readouterr().err
    assert main(["score", "pope", "--pred", str(p), "--dataset", str(saved), "--gt", str(folder)]) == 2
    assert "one of them" in capsys.readouterr().err


def test_a_split_is_memory_mapped(tmp_path):
    from eval.dataset_splits import open_split
    saved, parquet = save(textvqa_rows({"abc": png("red"), "def": png("blue")}), textvqa_features(), tmp_path,
                          "validation")
    for source in (saved, parquet):
        ds = open_split(str(source), "validation")
        assert ds.cache_files and len(ds) == 3  # backed by Arrow files on disk, not a table in memory


# ------------------------------------------------------------------------------------------------ generate
def test_generate_asks_the_same_prompts_and_gets_the_same_answers_from_both_forms(llava_assets, llava_dir, tmp_path,
                                                                                 capsys):
    """The acceptance check: TextVQA as LLaVA's question file + image folder, and as lmms-eval's dataset with the same
    images embedded; generate + score give the same prompts, answers and score."""
    images = Path(llava_assets["images"])
    demo = [json.loads(line) for line in Path(llava_assets["questions"]).read_text().splitlines()][:6]
    files = sorted({q["image"] for q in demo})
    questions = [(5000 + k, Path(q["image"]).stem, q["text"].split("\n")[0]) for k, q in enumerate(demo)]
    ocr = ["sale", "open"]

    def rows(answers):
        return [{"image_id": img, "question_id": qid, "question": text, "question_tokens": text.split(),
                 "image": {"bytes": (images / f"{img}.png").read_bytes(), "path": None}, "image_width": 48,
                 "image_height": 48, "flickr_original_url": "", "flickr_300k_url": "", "answers": answers[qid],
                 "image_classes": [], "set_name": "val", "ocr_tokens": ocr} for qid, img, text in questions]
    assert all((images / f).suffix == ".png" for f in files)
    qfile = write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": img, "image": f"{img}.png", "text": f"{text}\nReference OCR token: {', '.join(ocr)}{SHORT}"}
        for _, img, text in questions])
    saved, _ = save(rows({q: ["x"] * 10 for q, _, _ in questions}), textvqa_features(), tmp_path / "first",
                    "validation")
    common = ["--model", str(llava_dir), "--max-new-tokens", "3", "--batch-size", "4", "--dtype", "fp32"]
    assert main(["generate", *common, "--questions", str(qfile), "--image-folder", str(images),
                 "--out", str(tmp_path / "llava_answers.jsonl")]) == 0
    assert main(["generate", *common, "--dataset", str(saved), "--task", "textvqa",
                 "--out", str(tmp_path / "dataset_answers.jsonl")]) == 0
    capsys.readouterr()
    from_files = [json.loads(x) for x in (tmp_path / "llava_answers.jsonl").read_text().splitlines()]
    from_split = [json.loads(x) for x in (tmp_path / "dataset_answers.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in from_split] == [a["prompt"] for a in from_files]
    assert [a["text"] for a in from_split] == [a["text"] for a in from_files]
    assert [a["question_id"] for a in from_split] == [q for q, _, _ in questions]
    # the same run in two shards, merged by the split they answered
    parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        assert main(["generate", *common, "--dataset", str(saved), "--task", "textvqa", "--shard", f"{i}/2",
                     "--out", str(part)]) == 0
    assert main(["merge", *map(str, parts), "--dataset", str(saved), "--task", "textvqa",
                 "--out", str(tmp_path / "merged.jsonl")]) == 0
    merged = [json.loads(x) for x in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["text"]) for a in merged] == [(a["question_id"], a["text"]) for a in from_split]
    capsys.readouterr()
    other, _ = save(rows({q: ["y"] * 10 for q, _, _ in questions}), textvqa_features(), tmp_path / "other",
                    "validation")
    assert main(["merge", *map(str, parts), "--dataset", str(other), "--task", "textvqa",
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "answers different questions" in capsys.readouterr().err
    from PIL import Image

    from eval.dataset_splits import read_questions
    split_questions, image_of = read_questions("textvqa", str(saved))  # each row's own image, as the folder's file
    for q, (_, img, _) in zip(split_questions, questions):
        assert image_of(q).tobytes() == Image.open(images / f"{img}.png").convert("RGB").tobytes()
    # ground truth where half the model's answers are right, in both forms
    answers = {q: ([a["text"]] * 10 if k % 2 else ["zzz"] * 10)
               for k, ((q, _, _), a) in enumerate(zip(questions, from_split))}
    gt = tmp_path / "TextVQA_0.5.1_val.json"
    gt.write_text(json.dumps({"data": [{"question_id": q, "image_id": img, "question": text, "answers": answers[q]}
                                       for q, img, text in questions]}))
    scored, _ = save(rows(answers), textvqa_features(), tmp_path / "second", "validation")
    official = score(capsys, "textvqa", tmp_path / "llava_answers.jsonl", "--gt", gt)
    assert official["scores"]["matched_by"] == "image_id+prompt" and official["score"] == pytest.approx(50.0)
    got = score(capsys, "textvqa", tmp_path / "dataset_answers.jsonl", "--dataset", scored)
    assert got["score"] == official["score"] and got["coverage"] == official["coverage"]
