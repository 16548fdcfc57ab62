"""Answer files that grow batch by batch, resume after a crash, and merge from shards (no torch here).

`python -m eval generate` appends each batch of answers to its --out file as soon as it is decoded (written,
flushed and fsynced), so a run killed at question 90,000 of VQAv2 test-dev keeps its 90,000 answers. Beside the
answers it keeps `<out>.run.json`: what the answers depend on (questions file contents, shard, model and adapter
files, decoding settings). A rerun with the same settings continues after the last complete answer; a
half-written last line (a kill mid-write) is dropped first. A rerun with other settings, or an answer file
that does not follow the question file, stops with an error instead of mixing two runs (`--restart` starts over).

Answers are matched to questions by position, not by id: the k-th answer line is the k-th question's, and its
question_id and prompt are checked against it (LLaVA's TextVQA file repeats question ids).

`python -m eval merge --questions Q.jsonl --out all.jsonl part0.jsonl ... partN-1.jsonl` puts the answers of
`--shard i/N` runs back in the question file's order (shard i answers questions i, i+N, i+2N, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import IO, Optional, Sequence

from .files import InputError, PathLike, iter_jsonl, write_jsonl, write_text

RUN_SUFFIX = ".run.json"


def run_file(out: PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + RUN_SUFFIX)


def file_digest(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(directory: Optional[PathLike]) -> Optional[list]:
    """Name, size and modification time of a model or adapter folder's files: a model saved again to the same
    folder (a new training run merged) is another model, and its answers must not continue the old ones."""
    if not directory:
        return None
    directory = Path(directory)
    if not directory.exists():  # a hub id: its snapshot in the local cache (from_pretrained reads the same)
        try:
            from huggingface_hub import snapshot_download
            directory = Path(snapshot_download(str(directory), local_files_only=True))
        except Exception:
            raise InputError(f"{directory}: not a folder, and not a hub id in the local cache") from None
    files = sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else [directory]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def read_questions(path: Path) -> list[dict]:
    """LLaVA's question JSONL: {"question_id", "image" (optional), "text"} per line."""
    questions = []
    for n, q in iter_jsonl(path, "question file"):
        if not isinstance(q, dict) or "question_id" not in q or "text" not in q:
            raise InputError(f"{path}:{n}: a question needs 'question_id' and 'text'")
        questions.append(q)
    return questions


def shard_of(questions: Sequence[dict], shard: Optional[tuple[int, int]]) -> list[dict]:
    if shard is None:
        return list(questions)
    index, count = shard
    return list(questions[index::count])


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: expected i/n with 0 <= i < n")
    return index, count


def _check_answer(path: Path, n: int, answer, question: Optional[dict]) -> None:
    if question is None:
        raise InputError(f"{path}:{n}: more answers than questions; the file belongs to another question file "
                         f"(use --restart to start over)")
    if not isinstance(answer, dict) or answer.get("question_id") != question["question_id"] \
            or answer.get("prompt") != question["text"]:
        got = answer.get("question_id") if isinstance(answer, dict) else answer
        raise InputError(f"{path}:{n}: answer for question {got!r} where question {question['question_id']!r} "
                         f"comes next; the file belongs to another question file or order (use --restart)")


def read_completed(path: Path, questions: Sequence[dict]) -> int:
    """How many of `questions` (in order) the answer file already answers. A last line without its newline (a
    kill mid-write) is cut off the file; any other bad line is an error naming it."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the unfinished last line
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    done = 0
    for n, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            answer = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg}); the answer file is damaged "
                             f"(use --restart to start over)") from None
        _check_answer(path, n, answer, questions[done] if done < len(questions) else None)
        done += 1
    return done


class AnswerLog:
    """Appends answer batches to `out`; `open` says how many questions an earlier run already answered."""

    def __init__(self, out: PathLike, questions: Sequence[dict], settings: dict, restart: bool = False):
        self.out = Path(out)
        self.questions = questions
        self.settings = settings
        self.restart = restart
        self.done = 0
        self._file: Optional[IO[bytes]] = None

    def open(self) -> int:
        meta = run_file(self.out)
        if self.out.exists() and not self.restart:
            if not meta.is_file():
                raise InputError(f"--out {self.out} exists but was not written by `eval generate` (no {meta.name}): "
                                 f"use --restart to overwrite it, or another --out")
            try:
                previous = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{meta}: unreadable ({e}); use --restart to start over") from None
            changed = sorted(k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k))
            if changed:
                raise InputError(f"--out {self.out} holds answers of another run ({', '.join(changed)} differ; "
                                 f"see {meta.name}): use --restart to start over, or another --out")
            self.done = read_completed(self.out, self.questions)
        else:
            # settings last: a kill in between leaves answers without settings, which a rerun refuses, never old
            # answers under new settings
            meta.unlink(missing_ok=True)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_bytes(b"")
            write_text(meta, json.dumps(self.settings, indent=1) + "\n")
            self.done = 0
        self._file = open(self.out, "ab")
        return self.done

    def append(self, answers: Sequence[dict]) -> None:
        data = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers).encode("utf-8")
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())  # a kill loses at most the batch being decoded
        self.done += len(answers)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "AnswerLog":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_shards(questions_path: PathLike, parts: Sequence[PathLike], out: PathLike,
                 questions: Optional[list[dict]] = None, source: Optional[tuple[str, str]] = None) -> int:
    """The answers of N `--shard i/N` runs (parts in shard order) in the question file's order; every part must
    be complete. Returns the number of answers written. A run over a dataset split gives its `questions` and
    `source` (the run-file key that identifies the split, its value) instead of reading a question file."""
    if questions is None:
        questions = read_questions(Path(questions_path))
    count = len(parts)
    if count == 0:
        raise InputError("merge: no answer files given")
    key, digest = source if source is not None else ("questions_sha256", file_digest(questions_path))
    merged: list[Optional[dict]] = [None] * len(questions)
    first: Optional[tuple[Path, dict]] = None
    for index, part in enumerate(parts):
        part = Path(part)
        meta_path = run_file(part)
        if not meta_path.is_file():
            print(f"warning: {part} has no {meta_path.name}: only its question order is checked", file=sys.stderr)
        else:
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{meta_path}: unreadable ({e})") from None
            shard = meta.get("shard") or [0, 1]
            if shard != [index, count]:
                raise InputError(f"{part}: written for --shard {shard[0]}/{shard[1]}, given as part {index} of "
                                 f"{count}: list the parts in shard order")
            if meta.get(key) != digest:
                raise InputError(f"{part}: answers different questions than {questions_path}")
            if first is None:
                first = (part, meta)
            else:
                changed = sorted(k for k in set(meta) | set(first[1]) if k != "shard"
                                 and meta.get(k) != first[1].get(k))
                if changed:
                    raise InputError(f"{part} and {first[0]} come from different runs ({', '.join(changed)} "
                                     f"differ)")
        mine = shard_of(questions, (index, count))
        answers = [a for _, a in iter_jsonl(part, "answer file")]
        for n, answer in enumerate(answers, start=1):
            _check_answer(part, n, answer, mine[n - 1] if n <= len(mine) else None)
        if len(answers) < len(mine):
            raise InputError(f"{part}: {len(answers)} of its {len(mine)} answers; finish it first (rerun the same "
                             f"`eval generate --shard {index}/{count}` command: it resumes)")
        for k, answer in enumerate(answers):
            merged[index + k * count] = answer
    write_jsonl(out, merged)
    return len(merged)
