"""Reading and writing the files the evaluators meet, with errors a user can act on.

Every problem with an input file is an `InputError` whose message names the file and, where it can, the line
and the id; the CLI prints it and exits with code 2 (never a traceback).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Union

PathLike = Union[str, Path]


class InputError(ValueError):
    """A prediction or ground-truth file that cannot be scored as it is."""


def read_text(path: PathLike, what: str = "file") -> str:
    """The file's text as UTF-8 (a leading byte-order mark is dropped); bad bytes name their line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        line = data[: e.start + bom].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {data[e.start + bom]:#04x} at offset "
                         f"{e.start + bom}); save the file as UTF-8") from None


def load_json(path: PathLike, what: str = "ground-truth file") -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def iter_jsonl(path: PathLike, what: str = "ground-truth file") -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line of a JSON-lines file."""
    # split on "\n" only: str.splitlines would also split inside JSON strings at U+2028 and friends
    for n, line in enumerate(read_text(path, what).split("\n"), start=1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def load_records(path: PathLike, what: str = "ground-truth file") -> list[tuple[str, Any]]:
    """A JSON list or JSON lines (the official NLVR2 and VALUE files are JSON lines), each record with the
    place to name in a message: 'line N' for JSON lines, 'record N' for a JSON list."""
    text = read_text(path, what)
    if text.lstrip().startswith("["):
        data = load_json(path, what)
        return [(f"record {i}", r) for i, r in enumerate(data)]
    return [(f"line {n}", r) for n, r in iter_jsonl(path, what)]


def check_writable(path: PathLike) -> None:
    """Fail before any scoring work when the output cannot be written."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path.is_dir():
        raise InputError(f"--out {path} is a directory")
    if not parent.is_dir():
        raise InputError(f"--out {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--out {path}: not writable")


def write_text(path: PathLike, text: str) -> None:
    """Write a file under a temporary name and rename it: a crash never leaves half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def write_jsonl(path: PathLike, records: Iterable[Mapping]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
