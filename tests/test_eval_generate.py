"""`eval generate` answer files: appended per batch, resumed after a kill -9, guarded against mixing runs, and
shards merged back into the question file's order (eval/answer_log.py, eval/generate.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.answer_log import AnswerLog, merge_shards, read_completed, run_file
from eval.cli import main as eval_main
from eval.files import InputError
import subprocesses

ROOT = Path(__file__).resolve().parents[1]


def questions_file(path: Path, n: int, repeat_ids: bool = False) -> Path:
    # TextVQA's LLaVA file repeats question ids: answers are matched by position
    rows = [{"question_id": (k // 2 if repeat_ids else k), "text": f"question {k}?"} for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answers(questions, start=0, stop=None):
    return [{"question_id": q["question_id"], "prompt": q["text"], "text": f"answer {k}", "model_id": "m"}
            for k, q in enumerate(questions[start:stop], start=start)]


QS = [{"question_id": k // 2, "text": f"question {k}?"} for k in range(10)]
SETTINGS = {"model": "m", "max_new_tokens": 8}


def test_batches_are_appended_and_a_rerun_continues_after_them(tmp_path):
    out = tmp_path / "a.jsonl"
    with AnswerLog(out, QS, SETTINGS) as log:
        assert log.done == 0
        log.append(answers(QS, 0, 4))
        assert len(out.read_text().splitlines()) == 4  # on disk before the next batch
    assert json.loads(run_file(out).read_text()) == SETTINGS
    with AnswerLog(out, QS, SETTINGS) as log:
        assert log.done == 4
        log.append(answers(QS, 4))
    assert [json.loads(line) for line in out.read_text().splitlines()] == answers(QS)
    with AnswerLog(out, QS, SETTINGS, restart=True) as log:
        assert log.done == 0 and out.read_bytes() == b""


def test_a_half_written_last_line_is_dropped(tmp_path):
    out = tmp_path / "a.jsonl"
    with AnswerLog(out, QS, SETTINGS) as log:
        log.append(answers(QS, 0, 3))
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"question_id": 1, "prom')  # killed mid-write
    assert read_completed(out, QS) == 3 and out.read_bytes() == whole
    with AnswerLog(out, QS, SETTINGS) as log:
        assert log.done == 3


def test_answers_of_another_run_are_not_continued(tmp_path):
    out = tmp_path / "a.jsonl"
    with AnswerLog(out, QS, SETTINGS) as log:
        log.append(answers(QS, 0, 2))
    with pytest.raises(InputError, match=r"another run \(max_new_tokens differ"):
        AnswerLog(out, QS, {**SETTINGS, "max_new_tokens": 16}).open()
    other = [{**q, "text": q["text"].upper()} for q in QS]
    with pytest.raises(InputError, match=r"a\.jsonl:1: answer for question 0 where question 0 comes next"):
        AnswerLog(out, other, SETTINGS).open()  # same ids, other questions: the prompt tells
    with pytest.raises(InputError, match="more answers than questions"):
        AnswerLog(out, QS[:1], SETTINGS).open()
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(InputError, match=r"a\.jsonl:2: not valid JSON"):
        AnswerLog(out, QS, SETTINGS).open()
    foreign = tmp_path / "b.jsonl"
    foreign.write_text("{}\n")
    with pytest.raises(InputError, match="not written by `eval generate`"):
        AnswerLog(foreign, QS, SETTINGS).open()


def test_shards_merge_into_the_question_order(tmp_path):
    qfile = questions_file(tmp_path / "q.jsonl", 10, repeat_ids=True)
    parts = []
    from eval.answer_log import file_digest, shard_of
    for i in range(3):
        part = tmp_path / f"part{i}.jsonl"
        mine = shard_of(QS, (i, 3))
        with AnswerLog(part, mine, {"shard": [i, 3], "questions_sha256": file_digest(qfile)}) as log:
            log.append([{**a, "text": q["text"]} for a, q in zip(answers(mine), mine)])
        parts.append(part)
    assert eval_main(["merge", "--questions", str(qfile), "--out", str(tmp_path / "all.jsonl"), *map(str, parts)]) == 0
    merged = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [a["text"] for a in merged] == [q["text"] for q in QS]  # every answer back at its question
    with pytest.raises(InputError, match="list the parts in shard order"):
        merge_shards(qfile, [parts[1], parts[0], parts[2]], tmp_path / "x.jsonl")
    lines = parts[2].read_text().splitlines()
    parts[2].write_text(lines[0] + "\n")
    with pytest.raises(InputError, match=r"part2\.jsonl: 1 of its 3 answers; finish it first"):
        merge_shards(qfile, parts, tmp_path / "x.jsonl")


def test_kill_9_loses_at_most_the_batch_being_decoded(llava_assets, llava_dir, tmp_path):
    """A real `eval generate` killed with SIGKILL mid-run, rerun with the same command: the answers equal those of
    a run that was never interrupted. 240 questions (ids repeating), batches of 2."""
    base = [json.loads(line) for line in Path(llava_assets["questions"]).read_text().splitlines()]
    qfile = tmp_path / "q.jsonl"
    rows = [{**base[k % len(base)], "question_id": base[k % len(base)]["question_id"]} for k in range(240)]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def command(out):
        return [sys.executable, "-m", "eval", "generate", "--model", str(llava_dir), "--questions", str(qfile),
                "--image-folder", str(llava_assets["images"]), "--out", str(out), "--max-new-tokens", "4",
                "--batch-size", "2"]

    killed = tmp_path / "killed.jsonl"
    proc = subprocesses.start(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if killed.is_file() and killed.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "generation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    subprocesses.finish(proc, what="eval generate after SIGKILL", timeout=60)
    kept = killed.read_bytes().count(b"\n")
    assert 20 <= kept < 240

    resumed = subprocesses.run(command(killed), what="eval generate, resumed", timeout=600, cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["answers"] == 240 and report["resumed_after"] >= kept - 1  # a torn last line may be dropped

    reference = tmp_path / "reference.jsonl"
    done = subprocesses.run(command(reference), what="eval generate, uninterrupted", timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert killed.read_text() == reference.read_text()
    # the same command once more: nothing left to answer, the model is not even loaded
    again = subprocesses.run(command(reference), what="eval generate, all answered", timeout=600, cwd=ROOT, env=env)
    assert json.loads(again.stdout.strip().splitlines()[-1])["resumed_after"] == 240
    # a model saved again to the same folder is another model: its answers must not continue these
    (llava_dir / "config.json").touch()
    os.utime(llava_dir / "config.json", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = subprocesses.run(command(reference), what="eval generate, model changed", timeout=600, cwd=ROOT,
                               env=env)
    assert changed.returncode == 2 and "model_files differ" in changed.stderr


def test_merge_takes_one_unsharded_file_and_refuses_parts_of_different_runs(tmp_path):
    from eval.answer_log import file_digest, shard_of

    qfile = questions_file(tmp_path / "q.jsonl", 10, repeat_ids=True)
    digest = file_digest(qfile)
    whole = tmp_path / "whole.jsonl"
    with AnswerLog(whole, QS, {"shard": None, "questions_sha256": digest, "model": "a"}) as log:
        log.append(answers(QS))
    assert merge_shards(qfile, [whole], tmp_path / "all.jsonl") == 10
    parts = []
    for i, model in enumerate(("a", "b")):
        part = tmp_path / f"p{i}.jsonl"
        with AnswerLog(part, shard_of(QS, (i, 2)), {"shard": [i, 2], "questions_sha256": digest,
                                                    "model": model}) as log:
            log.append(answers(shard_of(QS, (i, 2))))
        parts.append(part)
    with pytest.raises(InputError, match=r"different runs \(model differ"):
        merge_shards(qfile, parts, tmp_path / "x.jsonl")


def test_a_restart_killed_before_its_settings_are_written_is_never_continued(tmp_path, monkeypatch):
    import eval.answer_log as answer_log

    out = tmp_path / "a.jsonl"
    with AnswerLog(out, QS, SETTINGS) as log:
        log.append(answers(QS, 0, 4))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(answer_log, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        AnswerLog(out, QS, {**SETTINGS, "model": "new"}, restart=True).open()
    monkeypatch.undo()
    with pytest.raises(InputError, match="not written by `eval generate`"):  # old answers, no settings: refused
        AnswerLog(out, QS, {**SETTINGS, "model": "new"}).open()


def test_a_model_given_by_hub_id_must_be_in_the_local_cache(tmp_path, monkeypatch):
    from eval.answer_log import weights_fingerprint

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError, match="not a hub id in the local cache"):
        weights_fingerprint("nobody/no-such-model")
    assert weights_fingerprint(tmp_path) == []  # a local folder: its files (none here)


# ------------------------------------------------------------------------------------ shared image prefixes
IMG = 9  # the image token id in the unit tests below


def test_questions_about_one_image_share_the_prompt_up_to_the_image():
    from eval.generate import shared_image_prefixes

    system = [1, 5, 6]
    rows = [system + [IMG] * 3 + [7, 8], system + [IMG] * 3 + [4], system + [IMG] * 3 + [2, 2, 2],
            system + [IMG] * 3 + [7]]
    # two questions about a.png, one about b.png (same ids up to the image: the file tells them apart), a.png again
    assert shared_image_prefixes(rows, ["a.png", "a.png", "b.png", "a.png"], IMG) == (6, [0, 0, 1, 0], [0, 2])
    assert shared_image_prefixes(rows, ["a.png", "b.png", "c.png", "d.png"], IMG) is None  # no image asked twice
    assert shared_image_prefixes(rows, ["a.png", "a.png", None, "a.png"], IMG) is None  # a question without image
    longer = [system + [3] + [IMG] * 3 + [7]]  # another system text: a prefix of another length
    assert shared_image_prefixes(rows + longer, ["a.png"] * 5, IMG) is None
    assert shared_image_prefixes([system + [IMG] * 3] * 2, ["a.png"] * 2, IMG) is None  # nothing after the image


@pytest.fixture(scope="module")
def wide_llava(llava_dir):
    """The tiny LLaVA with its language model drawn wide (std 0.2): greedy answers then differ from question to
    question, and any change in what a question sees (a padding token attended to, a position shifted) changes
    them (the briefly pretrained model answers nearly everything alike)."""
    import torch

    from eval.generate import load_model

    model, tokenizer, image_processor = load_model(str(llava_dir), dtype="fp32")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model, tokenizer, image_processor


def test_batched_answers_with_shared_image_prefixes_equal_one_question_at_a_time(llava_assets, wide_llava,
                                                                                 monkeypatch):
    """The demo's question file asks 3 questions per image one after the other (as VQAv2's does). Batches of 5 with
    the prefix shared, batches of 5 without, and one question at a time (LLaVA's loop) give the same answers; the
    shared path is taken in every batch that repeats an image."""
    import eval.generate as generate
    from eval.answer_log import read_questions

    model, tokenizer, image_processor = wide_llava
    questions = read_questions(llava_assets["questions"])
    assert len(questions) == 12 and len({q["image"] for q in questions}) == 4
    shared_batches = []
    real_prefix_cache = generate.prefix_cache

    def counted(model, ids, pixels, rows):
        shared_batches.append((ids.shape[0], rows.tolist()))
        return real_prefix_cache(model, ids, pixels, rows)
    monkeypatch.setattr(generate, "prefix_cache", counted)

    def answer(batch_size, share):
        return [a["text"] for batch in generate.answer_batches(
            model, tokenizer, image_processor, questions, llava_assets["images"], batch_size=batch_size,
            max_new_tokens=8, progress=False, share_prefixes=share) for a in batch]

    one_by_one = answer(1, True)
    assert shared_batches == []  # a batch of one has nothing to share
    assert answer(5, False) == one_by_one and shared_batches == []
    assert answer(5, True) == one_by_one
    # batches: questions 0-4 (images 0,0,0,1,1), 5-9 (1,2,2,2,3), 10-11 (3,3)
    assert shared_batches == [(2, [0, 0, 0, 1, 1]), (3, [0, 1, 1, 1, 2]), (1, [0, 0])]
    assert len(set(one_by_one)) >= 9, one_by_one  # answers that tell questions apart
    # a cache_implementation in the generation config: generate refuses a cache passed in, so prompts go whole
    shared_batches.clear()
    monkeypatch.setattr(model.generation_config, "cache_implementation", "dynamic")
    assert answer(5, True) == one_by_one and shared_batches == []


def test_prefixes_are_not_shared_under_a_sliding_window():
    # the padding between prefix and question takes cache slots, and a window counts slots
    from types import SimpleNamespace

    from transformers import GenerationConfig, LlavaConfig

    from eval.generate import prefix_sharing_supported

    def model(text_config, **generation):
        return SimpleNamespace(config=LlavaConfig(text_config=text_config),
                               generation_config=GenerationConfig(**generation))
    assert prefix_sharing_supported(model({"model_type": "llama"}))
    assert not prefix_sharing_supported(model({"model_type": "mistral", "sliding_window": 4096}))
    assert prefix_sharing_supported(model({"model_type": "mistral", "sliding_window": None}))
    assert prefix_sharing_supported(model({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}))
    assert not prefix_sharing_supported(model({"model_type": "llama"}, cache_implementation="static"))
