"""A sharded, memory-mapped store of precomputed features, keyed by string id, and its command line.

Each entry is a 2-D tensor `(N, D)`: a CLIP RN101 grid is `(49, 2048)`, a video is `(frames, 512)` with `frames`
different per video, so nothing here assumes a fixed `N`. Layout of a store directory:

    store.json                      {"format", "version", "metadata"}: what made the features (model, weights,
                                    preprocessing, grid, dtype); a writer with other metadata is refused
    {prefix}-{n:06d}.safetensors    shards: one tensor per id, tensor name = id
    index-{prefix}.json             {"shards": {shard file: [ids]}}, one per writer prefix
    failures-{prefix}.json          {id: reason} for inputs that could not be read (not in the store)

A shard's safetensors header may also hold "notes": JSON {id: {...}} of facts about some of its entries (e.g. a
video read by a fallback decoder, or with frames it had to fill in), written with the entries themselves.

Why safetensors shards:
- reads are memory-mapped: `safe_open` maps a shard once and `get_tensor` returns a view into the mapping, so a
  lookup touches only that entry's pages (no whole-file load, no pickle, no per-entry file as in the reference's
  one-h5-per-image layout, which costs an open() per sample and millions of inodes);
- safetensors is already a dependency, and the files load anywhere (numpy, jax, Rust) without our code;
- a shard is written under a temporary name and renamed when complete, so a killed run leaves only whole shards;
  resuming is "skip the ids the complete shards hold". The index is a cache of the shards' headers: a shard whose
  rename happened but whose index update did not is found by its header, by readers and by the next writer.
- concurrent writers (`--shard i/n`, one per GPU or node) use different prefixes: each owns its shard names and
  its own index file, guarded by a lock file, and readers merge all indexes.

    python -m data.features images --images-dir DIR --out STORE [--model RN101] [--pretrained openai] ...
    python -m data.features info STORE
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

FORMAT = "dora-vl-features"
VERSION = 1
STORE_FILE = "store.json"
SHARD_SUFFIX = ".safetensors"
DEFAULT_PREFIX = "part"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_]+")
_SHARD_RE = re.compile(r"([A-Za-z0-9_]+)-(\d{6})\.safetensors")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# safetensors header dtype codes -> torch dtypes (for stores written without a "dtype" in their metadata)
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class StoreError(RuntimeError):
    """A store directory that is damaged or used inconsistently (names the file at fault)."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported feature dtype {dtype}; use one of {sorted(_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------------------------- files

def _fsync_dir(path: Path) -> None:
    # makes a rename durable across a power cut, not just a process kill; some filesystems refuse it
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _normalise(obj: Any) -> Any:
    """JSON round trip, so that tuples and lists (and int/float keys) compare as they will once stored."""
    return json.loads(json.dumps(obj))


def _shard_header_ids(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # a complete-looking name with a broken body: say which file
        raise StoreError(f"shard {path} cannot be read ({type(e).__name__}: {e})") from None


def _list_shards(root: Path) -> list[str]:
    # names starting with "." are temporaries of a writer (complete or killed): never read
    return sorted(p.name for p in root.iterdir() if _SHARD_RE.fullmatch(p.name))


def _scan(root: Path) -> tuple[dict[str, str], dict[str, list[str]], int]:
    """id -> shard over every complete shard of the store; per-prefix {shard: ids}; number of duplicate ids.

    The index files give most shards' ids without opening them; a shard that no index lists (its writer was
    killed between the rename and the index update) is read from its header."""
    by_prefix: dict[str, dict[str, list[str]]] = {}
    indexed: dict[str, list[str]] = {}
    for path in sorted(root.glob("index-*.json")):
        prefix = path.stem[len("index-"):]
        shards = _read_json(path).get("shards", {})
        for name, ids in shards.items():
            if not (root / name).is_file():
                raise StoreError(f"{path} lists shard {name}, which is not in {root} (store damaged)")
            indexed[name] = list(ids)
        by_prefix[prefix] = dict(shards)
    id_to_shard: dict[str, str] = {}
    duplicates = 0
    for name in _list_shards(root):
        ids = indexed.get(name)
        if ids is None:
            ids = _shard_header_ids(root / name)
            by_prefix.setdefault(_SHARD_RE.fullmatch(name).group(1), {})[name] = ids
        for i in ids:
            if i in id_to_shard:
                duplicates += 1  # two writers did the same id (same metadata, so the same values): keep the first
                continue
            id_to_shard[i] = name
    return id_to_shard, by_prefix, duplicates


def _read_store_file(root: Path) -> dict:
    path = root / STORE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a feature store (no {STORE_FILE})")
    doc = _read_json(path)
    if doc.get("format") != FORMAT:
        raise StoreError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise StoreError(f"{path}: version {doc.get('version')!r}, this code reads version {VERSION}")
    return doc


# ---------------------------------------------------------------------------------------------------------- read

class FeatureStore:
    """Read side. `store.get(id)` -> `(N, D)` tensor in the stored dtype.

    Shards are opened lazily, once per process: the handles are dropped when the object is pickled or when it
    finds itself in a forked child, so one store can be handed to DataLoader workers (fork or spawn) and each
    worker maps the shards itself. `refresh()` re-reads the indexes of a store that is still being written.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        doc = _read_store_file(self.root)
        self.metadata: dict = doc.get("metadata") or {}
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self.refresh()

    def refresh(self) -> None:
        self._id_to_shard, _, self.duplicates = _scan(self.root)

    # pickling (spawned DataLoader workers): the mapped shards are not picklable and belong to one process
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _handle(self, shard: str):
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open
            path = self.root / shard
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:
                raise StoreError(f"shard {path} cannot be opened ({type(e).__name__}: {e})") from None
            self._handles[shard] = h
        return h

    def verify(self) -> None:
        """Read every shard's header once (no feature data): a truncated or overwritten shard raises StoreError
        naming it. Training and evaluation call it at start-up, so that a damaged shard stops a run before it
        starts, not in the middle of an epoch in whichever process reads it."""
        for shard in sorted(set(self._id_to_shard.values())):
            _shard_header_ids(self.root / shard)

    def close(self) -> None:
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return len(self._id_to_shard)

    def __contains__(self, key: object) -> bool:
        return key in self._id_to_shard

    def __iter__(self) -> Iterator[str]:
        return iter(self._id_to_shard)

    def ids(self) -> list[str]:
        return list(self._id_to_shard)

    keys = ids

    def shard_of(self, key: str) -> str:
        try:
            return self._id_to_shard[key]
        except KeyError:
            raise KeyError(f"id {key!r} is not in feature store {self.root}") from None

    def get(self, key: str, *, copy: bool = True) -> torch.Tensor:
        """The `(N, D)` tensor of `key`, in the stored dtype.

        The read comes from the shard's memory mapping. copy=True (default) returns the entry's own memory;
        copy=False returns a view into the mapping with no copy at all, but the mapping is private to this
        process and shared by every later get of the same shard, so an in-place edit of such a view would show
        up in later reads (not in the file)."""
        shard = self.shard_of(key)
        t = self._handle(shard).get_tensor(key)
        return t.clone() if copy else t

    __getitem__ = get

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of an entry, from the shard header (no data read)."""
        return tuple(self._handle(self.shard_of(key)).get_slice(key).get_shape())

    @property
    def feature_dim(self) -> Optional[int]:
        if "feature_dim" in self.metadata:
            return int(self.metadata["feature_dim"])
        first = next(iter(self._id_to_shard), None)
        return None if first is None else self.shape(first)[-1]

    @property
    def dtype(self) -> Optional[torch.dtype]:
        if "dtype" in self.metadata:
            return dtype_from_name(self.metadata["dtype"])
        first = next(iter(self._id_to_shard), None)
        if first is None:
            return None
        return _ST_DTYPES[self._handle(self.shard_of(first)).get_slice(first).get_dtype()]

    def failures(self) -> dict[str, str]:
        """{id: reason} of inputs that could not be read, over every writer prefix (ids since stored excluded)."""
        out: dict[str, str] = {}
        for path in sorted(self.root.glob("failures-*.json")):
            out.update(_read_json(path))
        return {k: v for k, v in out.items() if k not in self._id_to_shard}

    def notes(self) -> dict[str, dict]:
        """{id: note} of the entries written with a note (`FeatureWriter.add(..., note=)`); reads every shard's
        header."""
        out: dict[str, dict] = {}
        for shard in sorted(set(self._id_to_shard.values())):
            text = (self._handle(shard).metadata() or {}).get("notes")
            if text:
                out.update((k, v) for k, v in json.loads(text).items() if self._id_to_shard.get(k) == shard)
        return out

    def summary(self) -> dict:
        return {"store": str(self.root), "ids": len(self), "feature_dim": self.feature_dim,
                "dtype": None if self.dtype is None else dtype_name(self.dtype),
                "shards": len(set(self._id_to_shard.values())), "failures": len(self.failures()),
                "duplicates": self.duplicates, "notes": len(self.notes()), "metadata": self.metadata}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, ids={len(self)})"


# ---------------------------------------------------------------------------------------------------------- write

def _metadata_differences(stored: dict, wanted: dict) -> list[str]:
    stored, wanted = _normalise(stored), _normalise(wanted)
    missing = object()
    diffs = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k, missing), wanted.get(k, missing)
        if a != b:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            diffs.append(f"{k}: store has {show(a)}, this writer has {show(b)}")
    return diffs


def _create_or_check_store_file(root: Path, metadata: Optional[dict]) -> dict:
    path = root / STORE_FILE
    if not path.exists():
        doc = {"format": FORMAT, "version": VERSION, "metadata": _normalise(metadata or {})}
        tmp = root / f".{STORE_FILE}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if a concurrent writer created it first: then we check against theirs
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem
            if not path.exists():
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    doc = _read_store_file(root)
    stored = doc.get("metadata") or {}
    if metadata is not None:
        diffs = _metadata_differences(stored, metadata)
        if diffs:
            raise ValueError(f"feature store {root} was made with other settings; refusing to mix features "
                             f"(use another --out, or delete it):\n  " + "\n  ".join(diffs))
    return stored


_OPEN_PREFIXES: set[tuple[str, str]] = set()


class FeatureWriter:
    """Write side: `add(id, tensor)` buffers entries; every `shard_size` entries (or `max_shard_bytes`) they are
    written as one shard (temporary name, fsync, rename) and then the writer's index is replaced atomically.

    Reopening a store resumes it: `id in writer` is true for every id any complete shard holds (all prefixes),
    and `add` refuses those ids. A run killed with -9 loses only what is not yet in a renamed shard: the buffer
    (< shard_size entries) and, with background=True, the one shard being written. `metadata` is checked
    against the store's (a difference is a ValueError listing it); None adopts the store's. If the metadata has
    `feature_dim` / `dtype`, every entry must match them; otherwise entries must agree with the first one.
    `background=True` writes shards on a thread so the caller's loop keeps running (one shard in flight at most).
    """

    def __init__(self, root: str | Path, metadata: Optional[dict] = None, *, shard_size: int = 1024,
                 prefix: str = DEFAULT_PREFIX, max_shard_bytes: int = 1 << 30, background: bool = False):
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"writer prefix {prefix!r}: use letters, digits and '_' only")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.prefix = prefix
        self.shard_size = shard_size
        self.max_shard_bytes = max_shard_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.metadata = _create_or_check_store_file(self.root, metadata)
        self._lock_fd = self._lock()
        try:
            self._open()
        except BaseException:
            self._unlock()
            raise
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="feature-writer") if background else None
        self._pending: Optional[Future] = None
        self._closed = False

    def _lock(self) -> Optional[int]:
        # POSIX record locks (lockf): owned by this process only, so DataLoader workers forked from it do not
        # inherit them and a kill -9 frees the prefix at once (flock would stay held by orphaned workers).
        # They do not conflict within one process, hence the in-process set as well.
        key = (os.path.realpath(self.root), self.prefix)
        if key in _OPEN_PREFIXES:
            raise StoreError(f"prefix {self.prefix!r} of {self.root} is already open for writing in this process")
        fd = None
        try:
            import fcntl
        except ImportError:  # not POSIX: only the in-process guard
            fcntl = None
        if fcntl is not None:
            fd = os.open(self.root / f".lock-{self.prefix}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreError(f"another process is writing prefix {self.prefix!r} of {self.root}; concurrent "
                                 "writers need different prefixes (--shard i/n)") from None
        _OPEN_PREFIXES.add(key)
        self._lock_key = key
        return fd

    def _unlock(self) -> None:
        _OPEN_PREFIXES.discard(getattr(self, "_lock_key", None))
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self) -> None:
        # what a killed writer of this prefix left: temporaries (shards, its index) are incomplete by construction
        stale = [*self.root.glob(f".{self.prefix}-*{SHARD_SUFFIX}.tmp-*"),
                 *self.root.glob(f".{self._index_path().name}.tmp-*")]
        for p in stale:
            p.unlink()
        id_to_shard, by_prefix, _ = _scan(self.root)
        self._done: set[str] = set(id_to_shard)
        self._shards: dict[str, list[str]] = dict(by_prefix.get(self.prefix, {}))
        index = self._index_path()
        listed = _read_json(index).get("shards", {}) if index.is_file() else {}
        if set(listed) != set(self._shards):
            self._save_index()  # a shard renamed but not indexed: record it now
        numbers = [int(_SHARD_RE.fullmatch(n).group(2)) for n in self._shards]
        self._next_number = max(numbers, default=-1) + 1
        self._failures: dict[str, str] = {}
        failures = self.root / f"failures-{self.prefix}.json"
        if failures.is_file():
            self._failures = {k: v for k, v in _read_json(failures).items() if k not in self._done}
        self._buffer: dict[str, torch.Tensor] = {}
        self._notes: dict[str, Any] = {}  # of the buffered entries
        self._buffer_bytes = 0
        self._feature_dim = self.metadata.get("feature_dim")
        self._dtype = dtype_from_name(self.metadata["dtype"]) if "dtype" in self.metadata else None
        if self._done and (self._feature_dim is None or self._dtype is None):
            first = next(iter(id_to_shard))
            with FeatureStore(self.root) as store:
                t = store.get(first, copy=False)
            self._feature_dim = self._feature_dim or t.shape[-1]
            self._dtype = self._dtype or t.dtype

    def _index_path(self) -> Path:
        return self.root / f"index-{self.prefix}.json"

    def _save_index(self) -> None:
        _atomic_write_json(self._index_path(), {"shards": self._shards})

    def _save_failures(self) -> None:
        path = self.root / f"failures-{self.prefix}.json"
        if self._failures or path.exists():
            _atomic_write_json(path, self._failures)

    # -------------------------------------------------------------------------------------------------- api
    def __contains__(self, key: object) -> bool:
        return key in self._done

    def __len__(self) -> int:
        """Ids in the store, complete shards and this writer's buffer together."""
        return len(self._done)

    @property
    def failures(self) -> dict[str, str]:
        return dict(self._failures)

    def add(self, key: str, tensor: torch.Tensor, note: Optional[dict] = None) -> None:
        """Buffer one entry; `note` (JSON-able) is kept with it in its shard (`FeatureStore.notes`)."""
        if self._closed:
            raise StoreError(f"writer of {self.root} is closed")
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise ValueError(f"feature id must be a non-empty string other than '__metadata__', got {key!r}")
        if key in self._done:
            raise ValueError(f"id {key!r} is already in feature store {self.root}")
        if tensor.dim() != 2:
            raise ValueError(f"id {key!r}: features must be 2-D (N, D), got shape {tuple(tensor.shape)}")
        if self._feature_dim is None:
            self._feature_dim = tensor.shape[1]
        if self._dtype is None:
            self._dtype = tensor.dtype
        if tensor.shape[1] != self._feature_dim:
            raise ValueError(f"id {key!r}: feature dim {tensor.shape[1]}, store {self.root} has {self._feature_dim}")
        if tensor.dtype != self._dtype:
            raise ValueError(f"id {key!r}: dtype {tensor.dtype}, store {self.root} has {self._dtype}")
        # own memory: safetensors refuses tensors that share storage (rows of one batch tensor do)
        t = tensor.detach().to("cpu", copy=True).contiguous()
        self._buffer[key] = t
        if note:
            self._notes[key] = _normalise(note)
        self._buffer_bytes += t.numel() * t.element_size()
        self._done.add(key)
        self._failures.pop(key, None)
        if len(self._buffer) >= self.shard_size or self._buffer_bytes >= self.max_shard_bytes:
            self._flush_buffer()

    def add_failure(self, key: str, reason: str) -> None:
        """Record that `key` could not be made (kept in failures-{prefix}.json with the reason)."""
        self._failures[key] = reason

    def _flush_buffer(self) -> None:
        if not self._buffer:
            return
        name = f"{self.prefix}-{self._next_number:06d}{SHARD_SUFFIX}"
        self._next_number += 1
        entries, self._buffer, self._buffer_bytes = self._buffer, {}, 0
        notes, self._notes = self._notes, {}
        if self._executor is None:
            self._write_shard(name, entries, notes)
        else:
            self._wait()  # at most one shard in flight: bounds memory, keeps index updates in order
            self._pending = self._executor.submit(self._write_shard, name, entries, notes)
        self._save_failures()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write here

    def _write_shard(self, name: str, entries: dict[str, torch.Tensor], notes: Optional[dict] = None) -> None:
        from safetensors.torch import save_file
        path = self.root / name
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        header = {"format": FORMAT, "prefix": self.prefix}
        if notes:
            header["notes"] = json.dumps(notes)  # in the shard itself: a note exists exactly when its entry does
        save_file(entries, str(tmp), metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # the shard exists complete or not at all
        _fsync_dir(self.root)
        self._shards[name] = list(entries)
        self._save_index()

    def flush(self) -> None:
        """Write the buffered entries as a shard now and wait for it."""
        self._flush_buffer()
        self._wait()
        self._save_failures()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._unlock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # an unclosed writer keeps its buffer unwritten (as a killed run would); only release the lock
        with contextlib.suppress(Exception):
            self._unlock()


# ---------------------------------------------------------------------------------------------------------- CLI

def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n: this process extracts every n-th id starting at the i-th (sorted ids)."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def find_images(images_dir: str | Path, glob: Optional[str] = None,
                ids: Optional[list[str]] = None) -> dict[str, Optional[Path]]:
    """{id: path} with id = file stem (VL-T5's image ids, e.g. COCO_val2014_000000391895).

    `glob` (relative to images_dir, '**' recurses) defaults to the image files directly in images_dir. With
    `ids`, only those ids, and an id with no file maps to None (extraction records it as a failure)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} not found")
    if glob:
        files = [p for p in images_dir.glob(glob) if p.is_file()]
    else:
        files = [p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    by_stem: dict[str, Path] = {}
    for p in sorted(files):
        if p.stem in by_stem:
            raise ValueError(f"two files have the id {p.stem!r}: {by_stem[p.stem]} and {p}; narrow --glob")
        by_stem[p.stem] = p
    if ids is None:
        return by_stem
    return {i: by_stem.get(i) for i in ids}


def _read_ids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: repeated ids")
    return ids


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.features",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("images", help="CLIP ResNet grid features (before attention pooling) of an image folder")
    p.add_argument("--images-dir", required=True)
    p.add_argument("--out", required=True, help="store directory (created, or resumed)")
    p.add_argument("--ids", help="file with one id (file stem) per line; default every image in the folder")
    p.add_argument("--glob", help="file pattern relative to --images-dir (e.g. '*.jpg', '**/*.png')")
    p.add_argument("--model", default="RN101", help="open_clip model name (a ModifiedResNet tower)")
    p.add_argument("--model-config", help="JSON file with an open_clip model config, registered as --model")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or checkpoint file; 'none' "
                   "for random init (tests, benchmarks)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding images")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--resize", choices=("squash", "crop"), default="squash",
                   help="squash: 224x224 ignoring aspect (the reference's features); crop: shorter side + centre crop")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float16", help="storage dtype")
    p.add_argument("--shard", type=parse_shard, help="i/n: extract the i-th of n disjoint parts (0-based) into "
                   "its own shard prefix, so n processes can fill one store at once")
    p.add_argument("--shard-size", type=int, default=1024, help="entries per shard file")
    p.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("info", help="print a store's summary as JSON")
    q.add_argument("store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "info":
        print(json.dumps(FeatureStore(args.store).summary()))
        return 0

    from .image_features import extract_image_features
    images = find_images(args.images_dir, args.glob, _read_ids(args.ids) if args.ids else None)
    model_config = None
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as f:
            model_config = json.load(f)
    report = extract_image_features(
        images, args.out, model_name=args.model,
        pretrained=None if args.pretrained.lower() == "none" else args.pretrained,
        model_config=model_config, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
        dtype=dtype_from_name(args.dtype), resize=args.resize, image_size=args.image_size,
        progress=not args.no_progress, shard=args.shard, shard_size=args.shard_size)
    print(json.dumps(report.summary()))
    return 0


# What a command of data/ reports as a user's mistake (a missing folder or store, a damaged shard, a store made
# with other settings, repeated ids, an unknown model): one line, exit status 2, as every command of the project.
# data/ checks its inputs with ValueError; one raised inside torch, numpy or another library is a bug and keeps
# its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, StoreError)


def _raised_here(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().parent == Path(__file__).resolve().parent


def run_cli(main, errors: tuple = USER_ERRORS) -> int:
    try:
        return main()
    except errors as e:
        if isinstance(e, ValueError) and not _raised_here(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli(main))
