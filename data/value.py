"""The VALUE benchmark's video-text tasks (TVQA, How2QA, TVC, YC2C) as VL-BART examples.

Files in the VALUE release formats (VALUE-Leaderboard/DataRelease; see docs/vlbart.md):
- subtitles `{tv,how2,yc2}_subtitles.jsonl`: {"vid_name", "sub": [{"text", "start", "end"}, ...]}
- TVQA / How2QA `*.jsonl`: {"qid", "vid_name", "q", "a0".."a4" (How2QA: "a3"), "answer_idx" (not in test), "ts": "st-ed"}
- TVC / YC2C `*.jsonl`: {"clip_id", "vid_name", "ts": [st, ed] (TVC only), "descs": [{"desc", "desc_id"}, ...]}

Inputs are built as NVlabs/DoRA's VL-BART builds them (facts in docs/vlbart.md): the whole video's subtitles
"[Subs] ...", then for QA "[Q] question [TS] (st-ed) [Choices] a0: ... a1: ...", for TVC "[TS] ([st, ed])", and
the task prompt at the end ("... tvqa: "). Targets: "a{answer_idx}", or the description. Training makes one
example per description (TVC has 2 per training clip); evaluation one per clip (its descriptions are the
references of the scorer).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .vlbart import Example, TaskDataError

VIDEO_PROMPTS = {"tvqa": "tvqa: ", "how2qa": "how2qa: ", "tvc": "tvc: ", "yc2c": "yc2c: "}
N_CHOICES = {"tvqa": 5, "how2qa": 4}


def _jsonl(path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{path}:{n}: not a JSON object")
            out.append((n, record))
    return out


def _need(record: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise TaskDataError(f"{where}: lacks {missing}")


def read_subtitles(paths: str | Sequence[str]) -> dict[str, str]:
    """vid_name -> "[Subs] line line ..." (every subtitle line of the video, stripped, in file order)."""
    out = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for n, r in _jsonl(path):
            _need(r, ("vid_name", "sub"), f"{path}:{n}")
            out[str(r["vid_name"])] = "[Subs] " + " ".join(str(s.get("text", "")).strip() for s in r["sub"])
    return out


def read_video_qa(path, task: str, subtitles: dict[str, str]) -> list[Example]:
    """TVQA (5 choices) or How2QA (4): the question, timestamps and choices as text, "a{k}" as the target."""
    n_choices = N_CHOICES[task]
    out = []
    for n, r in _jsonl(path):
        where = f"{path}:{n}"
        _need(r, ("qid", "vid_name", "q", "ts", *[f"a{i}" for i in range(n_choices)]), where)
        if f"a{n_choices}" in r:
            raise TaskDataError(f"{where}: has a{n_choices}: a {n_choices + 1}-choice file given as {task}?")
        choices = " ".join(f"a{i}: {str(r[f'a{i}']).strip('. ')}." for i in range(n_choices))
        text = f"[Q] {str(r['q']).strip()} [TS] ({r['ts']}) [Choices] {choices}"
        answers = None
        if "answer_idx" in r:
            k = r["answer_idx"]
            if not isinstance(k, int) or not 0 <= k < n_choices:
                raise TaskDataError(f"{where} (qid {r['qid']}): answer_idx {k!r} is not 0..{n_choices - 1}")
            answers = {f"a{k}": 1.0}
        out.append(Example(str(r["qid"]), text, (str(r["vid_name"]),), answers,
                           context=subtitles.get(str(r["vid_name"]), "[Subs]")))
    return out


def read_video_captions(path, task: str, subtitles: dict[str, str], per_description: bool) -> list[Example]:
    """TVC ("[TS] ([st, ed])" after the subtitles) or YC2C (subtitles only). `per_description`: one training
    example per description; else one per clip, id = clip_id."""
    out = []
    for n, r in _jsonl(path):
        where = f"{path}:{n}"
        _need(r, ("clip_id", "vid_name"), where)
        text = f"[TS] ({list(r['ts'])})" if task == "tvc" and "ts" in r else ""
        context = subtitles.get(str(r["vid_name"]), "[Subs]")
        video = (str(r["vid_name"]),)
        if per_description:
            descs = r.get("descs") or []
            if not descs:
                raise TaskDataError(f"{where} (clip {r['clip_id']}): no descriptions to train on")
            out += [Example(str(d.get("desc_id", f"{r['clip_id']}#{k}")), text, video, {str(d["desc"]).strip(): 1.0},
                            context=context) for k, d in enumerate(descs)]
        else:
            out.append(Example(str(r["clip_id"]), text, video, None, context=context))
    return out


def video_examples(task: str, paths: Sequence[str], subtitles: dict[str, str], train: bool) -> list[Example]:
    if task in N_CHOICES:
        return [e for p in paths for e in read_video_qa(p, task, subtitles)]
    if task in ("tvc", "yc2c"):
        return [e for p in paths for e in read_video_captions(p, task, subtitles, per_description=train)]
    raise TaskDataError(f"unknown video task {task!r}")


def encode_with_context(tokenizer, context: str, text: str, prompt: str, max_length: Optional[int],
                        truncate: str = "context") -> list[int]:
    """Token ids of "{context} {text} {prompt}" (the prompt last, as the reference), at most `max_length` with
    special tokens. `truncate="context"` shortens the subtitles first, so the question, timestamps, choices and
    prompt are never cut (only when they alone exceed the limit is their end cut); `truncate="right"` cuts the end
    as the reference did (the prompt and the choices go first)."""
    full = " ".join(p for p in (context, text) if p) + f" {prompt}"
    if max_length is None or truncate == "right":
        return tokenizer(full, max_length=max_length, truncation=max_length is not None)["input_ids"]
    ids = tokenizer(full)["input_ids"]
    budget = len(tokenizer(context, add_special_tokens=False)["input_ids"]) - (len(ids) - max_length)
    while len(ids) > max_length and budget > 0:
        enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        cut = context[: enc["offset_mapping"][budget - 1][1]] if budget <= len(enc["input_ids"]) else context
        ids = tokenizer(" ".join(p for p in (cut, text) if p) + f" {prompt}")["input_ids"]
        budget -= max(1, len(ids) - max_length)
    if len(ids) > max_length:  # the subtitles are gone and the rest alone is too long
        ids = tokenizer(" ".join(p for p in ("", text) if p) + f" {prompt}", max_length=max_length,
                        truncation=True)["input_ids"]
    return ids
