"""The VALUE video tasks as VL-BART examples: readers on VALUE-format files, the reference's input text, the
subtitles-first truncation, the 64-frame features, and the video recipe end to end on the generated demo."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data.value import encode_with_context, read_subtitles, read_video_captions, read_video_qa
from data.vlbart import Example, FeatureLookup, TaskDataError, TaskDataset
import subprocesses

ROOT = Path(__file__).resolve().parents[1]


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from recipes.vlbart.demo_models import train_tokenizer
    texts = ["[Subs] Chase : hello there how are you today", "[Q] What colour does the square turn?",
             "[TS] [Choices] a0: red. a1: blue. tvqa: how2qa: tvc: yc2c:"] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_tvqa_input_is_the_references_text(tmp_path):
    subs = read_subtitles(jsonl(tmp_path / "tv_subtitles.jsonl", [
        {"vid_name": "s01e01_seg02_clip_00", "sub": [{"text": " Chase : Hello. ", "start": 0.1, "end": 1.0},
                                                     {"text": "House : No.", "start": 1.2, "end": 2.0}]}]))
    qa = jsonl(tmp_path / "tvqa_val.jsonl", [
        {"qid": 7, "vid_name": "s01e01_seg02_clip_00", "q": " Who speaks first? ", "ts": "0.10-2.00",
         "a0": "Chase.", "a1": " House", "a2": "Foreman..", "a3": "Cuddy", "a4": "Wilson", "answer_idx": 1,
         "show_name": "House M.D."}])
    (example,) = read_video_qa(qa, "tvqa", subs)
    assert example.context == "[Subs] Chase : Hello. House : No."
    assert example.text == ("[Q] Who speaks first? [TS] (0.10-2.00) [Choices] a0: Chase. a1: House. a2: Foreman. "
                            "a3: Cuddy. a4: Wilson.")
    assert example.answers == {"a1": 1.0} and example.id == "7" and example.images == ("s01e01_seg02_clip_00",)
    # a 5-choice file read as How2QA (4 choices) is refused, an answer index out of range is an error
    with pytest.raises(TaskDataError, match="a4: a 5-choice file given as how2qa"):
        read_video_qa(qa, "how2qa", subs)
    jsonl(qa, [{"qid": 1, "vid_name": "v", "q": "q", "ts": "0-1", **{f"a{i}": "x" for i in range(5)},
                "answer_idx": 5}])
    with pytest.raises(TaskDataError, match=r"tvqa_val.jsonl:1 \(qid 1\): answer_idx 5"):
        read_video_qa(qa, "tvqa", subs)


def test_caption_examples_per_description_for_training_per_clip_for_evaluation(tmp_path):
    tvc = jsonl(tmp_path / "tvc_train_release.jsonl", [
        {"vid_name": "v1", "clip_id": 3, "ts": [35.73, 40.9], "duration": 60.0,
         "descs": [{"desc": "He sits.", "desc_id": 11}, {"desc": "She waves. ", "desc_id": 12}]}])
    train = read_video_captions(tvc, "tvc", {"v1": "[Subs] hi"}, per_description=True)
    assert [(e.id, e.answers) for e in train] == [("11", {"He sits.": 1.0}), ("12", {"She waves.": 1.0})]
    assert train[0].text == "[TS] ([35.73, 40.9])"  # the reference writes the Python list
    (clip,) = read_video_captions(tvc, "tvc", {"v1": "[Subs] hi"}, per_description=False)
    assert clip.id == "3" and clip.answers is None
    yc2 = jsonl(tmp_path / "yc2c.jsonl", [{"vid_name": "v2", "clip_id": 4, "duration": 5.0,
                                           "descs": [{"desc": "cut the onion", "desc_id": 1}]}])
    (y,) = read_video_captions(yc2, "yc2c", {}, per_description=True)
    assert y.text == "" and y.context == "[Subs]"  # no timestamps for YC2C, and a video without subtitles


def test_truncation_cuts_the_subtitles_first_never_the_question_or_choices(tok):
    context = "[Subs] " + " ".join(["hello there how are you today"] * 40)
    text = "[Q] What colour does the square turn? [TS] (0.00-4.00) [Choices] a0: red. a1: blue."
    full = tok(f"{context} {text} tvqa: ")["input_ids"]
    ids = encode_with_context(tok, context, text, "tvqa: ", 60)
    assert len(full) > 60 and len(ids) <= 60
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded.endswith(f"{text} tvqa: ") and decoded.startswith("[Subs] hello")
    assert len(ids) >= 58  # the subtitles fill what the rest leaves
    # the reference's right truncation loses the prompt and the choices first
    right = tok.decode(encode_with_context(tok, context, text, "tvqa: ", 60, truncate="right"),
                       skip_special_tokens=True)
    assert "tvqa:" not in right and "[Choices]" not in right
    # within the limit nothing changes
    assert encode_with_context(tok, "[Subs] hi", text, "tvqa: ", 600) == tok(f"[Subs] hi {text} tvqa: ")["input_ids"]


def official_video_input(task: str, record: dict, subtitles: list[dict], n_choices: int = 5) -> str:
    """The text NVlabs/DoRA's video/{tvqa,how2qa,tvc,yc2c}_data.py (7e2f10a) encode, written from their rules."""
    subs = "[Subs] " + " ".join(f"{t['text'].strip()}" for t in subtitles)
    if task in ("tvqa", "how2qa"):
        choices = "[Choices] " + " ".join(f"a{i}: {record[f'a{i}'].strip('. ')}." for i in range(n_choices))
        parts = [subs, f"[Q] {record['q'].strip()}", f"[TS] ({record['ts']})", choices]
    elif task == "tvc":
        parts = [subs, f"[TS] ({record['ts']})"]
    else:
        parts = [subs]
    return " ".join(parts) + f" {task}: "


def test_paper_config_builds_the_references_encoder_ids_for_over_length_inputs(tok, tmp_path):
    """The video paper config's `truncate` gives, for inputs over its 600 tokens, the ids the reference builds:
    tokenizer.encode(f"{sent} {prompt}", max_length=600, truncation=True), the end cut. (In a scratch folder the
    same examples through transformers 4.2.1's slow BartTokenizer, as the reference ran, gave these ids too.)
    The project's `context` cut gives other ids for them."""
    from recipes.config import load_config
    from recipes.vlbart.tasks import TaskConfig, read_examples

    config = load_config(ROOT / "recipes/vlbart/configs/vlbart_video_dora.yaml")
    words = "Chase : hello there how are you today House : no what colour does the square turn".split()
    rng = __import__("random").Random(0)
    subtitles = {f"v{i}": [{"text": " " + " ".join(rng.choice(words) for _ in range(8)) + " ", "start": 0.0, "end": 1.0}
                           for _ in range(n)] for i, n in enumerate([2, 8, 150, 400])}  # under and over 600 tokens
    subs_file = jsonl(tmp_path / "subs.jsonl", [{"vid_name": v, "sub": s} for v, s in subtitles.items()])
    n_choices = {"tvqa": 5, "how2qa": 4}
    for task in ("tvqa", "how2qa", "tvc", "yc2c"):
        if task in n_choices:
            records = [{"qid": i, "vid_name": v, "q": " What colour does the square turn? ", "ts": "0.10-2.00",
                        **{f"a{k}": rng.choice(["Red.", " blue", "green..", "no one"]) for k in range(n_choices[task])},
                        "answer_idx": 1} for i, v in enumerate(subtitles)]
        else:
            records = [{"clip_id": i, "vid_name": v, "ts": [1.5, 7.25], "descs": [{"desc": "d", "desc_id": i}]}
                       for i, v in enumerate(subtitles)]
        path = jsonl(tmp_path / f"{task}.jsonl", records)
        section = dict(config["tasks"][task], test=str(path), subtitles=[str(subs_file)])
        paper = TaskConfig.from_dict(task, section)
        examples = read_examples(paper, "test")
        want = [tok.encode(official_video_input(task, r, subtitles[r["vid_name"]], n_choices.get(task, 5)),
                           max_length=600, truncation=True) for r in records]
        over = [len(tok(official_video_input(task, r, subtitles[r["vid_name"]], n_choices.get(task, 5)))["input_ids"])
                > 600 for r in records]
        assert over == [False, False, True, True], (task, over)
        for cut in (paper.truncate, "context"):
            ds = TaskDataset(task, examples, FeatureLookup([]), tok, prompt=paper.prompt,
                             max_input_length=paper.max_input_length, train=False, truncate=cut)
            got = [ds.encode_input(e) for e in examples]
            assert got[:2] == want[:2]  # within the limit both cuts are the reference's
            assert (got[2:] == want[2:]) == (cut == "right"), (task, cut)
        assert paper.truncate == "right"


def test_video_features_are_resized_to_the_task_frames(tok):
    class Store:
        def __init__(self, frames):
            self.frames = frames

        def __contains__(self, key):
            return True

        def get(self, key):
            return self.frames

    for n, want in ((40, None), (100, None)):
        frames = torch.randn(n, 8)
        ds = TaskDataset("tvqa", [Example("1", "[Q] q", ("v",), {"a1": 1.0}, context="[Subs]")],
                         FeatureLookup([Store(frames)]), tok, prompt="tvqa: ", max_input_length=600, frames=64)
        feats = ds[0]["vis_feats"]
        assert feats.shape == (1, 64, 8)
        if n < 64:
            assert torch.equal(feats[0, :n], frames) and not feats[0, n:].any()  # zero-padded at the end
        else:
            want = torch.nn.functional.adaptive_max_pool1d(frames.t()[None], 64)[0].t()
            torch.testing.assert_close(feats[0], want)


def test_video_recipe_trains_and_scores_on_the_generated_demo(tmp_path):
    """The video config's path on tiny data: VALUE files, decord frames, features, DoRA training, the scorers."""
    from data.video import extract_video_features, find_videos
    from data.video_demo import write_video_demo
    from recipes.vlbart.demo import DEMO_TOWER, video_texts
    from recipes.vlbart.demo_models import make_tiny_bart

    data = tmp_path / "data"
    write_video_demo(data, n_train_videos=6, n_test_videos=3, seed=0)
    for source in ("tv", "how2", "yc2"):
        extract_video_features(find_videos(data / "videos" / source), tmp_path / f"features_{source}",
                               model_name="demo-video-rn", pretrained=None, model_config=DEMO_TOWER, n_frames=8,
                               num_workers=0, progress=False, calibrate_batchnorm=2)
    make_tiny_bart(tmp_path / "bart", video_texts(data / "ann"), steps=0, d_model=32, dropout=0.0)
    text = (ROOT / "recipes/vlbart/configs/demo_video.yaml").read_text().replace("runs/vlbart_video_demo", str(tmp_path))
    config = yaml.safe_load(text)
    for task in config["tasks"].values():
        task["batch_size"] = 4
    config["train"].update(epochs=1, max_steps=6, save_steps=0)
    path = tmp_path / "video.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocesses.run([sys.executable, str(ROOT / "recipes/vlbart/train.py"), str(path)],
                            what="VL-BART video training", timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tvqa 24" in proc.stdout and "tvc 12" in proc.stdout  # 4 questions / 2 descriptions per training video
    proc = subprocesses.run([sys.executable, "-m", "recipes.vlbart.evaluate", str(tmp_path / "run"), "--batch-size", "8"],
                            what="recipes.vlbart.evaluate", timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == {"tvqa", "how2qa", "tvc", "yc2c"}
    details = json.loads((tmp_path / "run" / "eval" / "scores.json").read_text())["details"]
    assert details["tvc"]["scores"]["protocol"] == "value" and details["tvqa"]["coverage"]["expected"] == 12
