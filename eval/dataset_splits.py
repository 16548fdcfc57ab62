"""Benchmark splits as `datasets` hold them, in the layouts lmms-eval's task definitions read (images embedded).

    python -m eval generate --model DIR --dataset lmms-lab/textvqa --task textvqa --out answers.jsonl
    python -m eval score textvqa --pred answers.jsonl --dataset lmms-lab/textvqa

`--dataset` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, a parquet or Arrow file,
a folder of them, or a hub id whose files are in the local hub cache (never downloaded: an id not cached is an
error). Splits are memory-mapped; ground truth is read from the text columns only, and an image is decoded when
its row is answered.

Columns read (lmms-eval's lmms_eval/tasks/<task>/*.yaml and utils.py, and the datasets' cards):
    textvqa    lmms-lab/textvqa, validation: question_id, image_id, question, answers [str], ocr_tokens, image
    vqav2      lmms-lab/VQAv2, validation: question_id, image_id, question, answers [{answer, ...}], image
    gqa        lmms-lab/GQA testdev_balanced_instructions, testdev: id, imageId, question, answer, isBalanced,
               types {structural, semantic}; images in the testdev_balanced_images table: id, image
    pope       lmms-lab/POPE, test: id, question_id, question, answer (yes/no), category, image_source, image
    mmbench    lmms-lab/MMBench en, dev: index, question, hint, A..D, answer, category, L2-category, split, image
               (rotated copies as rows index + k*1e6, as the official dev TSV)
    scienceqa  lmms-lab/ScienceQA ScienceQA-IMG, test: question, hint, choices [str], answer (index), image
               (no id column: a question's id is its row number)

Each task's ground truth is returned in the form the file readers (readers.py, mmbench.py) return, so scoring is
the same code for both forms.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .choice import GQAQuestion
from .files import InputError
from .mmbench import MMBenchQuestion


@dataclass(frozen=True)
class Layout:
    config: Optional[str]  # the hub configuration (a folder of the hub repository); None: the default
    split: str
    id_column: Optional[str]  # None: the row number
    image_key: Optional[str]  # the column naming an image (questions about one image share its encoding)
    images_config: Optional[str] = None  # GQA: the separate image table, joined on image_key


LAYOUTS = {
    "textvqa": Layout(None, "validation", "question_id", "image_id"),
    "vqav2": Layout(None, "validation", "question_id", "image_id"),
    "gqa": Layout("testdev_balanced_instructions", "testdev", "id", "imageId", "testdev_balanced_images"),
    "pope": Layout(None, "test", "id", "image_source"),
    "mmbench": Layout("en", "dev", "index", None),
    "scienceqa": Layout("ScienceQA-IMG", "test", None, None),
}
TASK_CHOICES = ("textvqa", "vqav2", "gqa", "pope", "mmbench", "scienceqa")
LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
# pandas' default NA strings: an MMBench option cell that reads as one of them is absent, as in the TSV reader
NA_STRINGS = frozenset(['', '#N/A', '#N/A N/A', '#NA', '-1.#IND', '-1.#QNAN', '-NaN', '-nan', '1.#IND', '1.#QNAN',
                        '<NA>', 'N/A', 'NA', 'NULL', 'NaN', 'None', 'n/a', 'nan', 'null'])


def _datasets():
    import datasets
    return datasets


def add_dataset_arguments(parser, what: str) -> None:
    parser.add_argument("--dataset", help=f"{what}: a save_to_disk folder, parquet / Arrow files, or a hub id in the "
                                          "local cache, in lmms-eval's layout (docs/eval_datasets_and_metrics.md)")
    parser.add_argument("--dataset-split", help="the split to read (default: lmms-eval's: validation, testdev, test, dev)")
    parser.add_argument("--dataset-config", help="the hub configuration (default: lmms-eval's, e.g. ScienceQA-IMG)")


# ------------------------------------------------------------------------------------------------ opening
def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub dataset, from the cache only (nothing is downloaded)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:
        from huggingface_hub import constants
        raise InputError(f"--dataset {repo_id}: not a local folder or file, and not a dataset in the local hub cache "
                         f"({constants.HF_HUB_CACHE}); download it first (huggingface-cli download --repo-type "
                         f"dataset {repo_id}) or give its save_to_disk folder / parquet files") from None


def _data_files(folder: Path, split: str) -> list[Path]:
    """The parquet / Arrow files of one split in a folder: <split>-*.parquet (the hub's naming), <split>/*, or,
    when no file is named for a split, every file of the folder."""
    files = []
    for ext in ("parquet", "arrow"):
        files += sorted(folder.glob(f"{split}-*.{ext}")) + sorted(folder.glob(f"{split}/*.{ext}"))
    if not files:
        named = [p for ext in ("parquet", "arrow") for p in folder.glob(f"*.{ext}")]
        # files named for other splits (test-00000-of-00001.parquet) are not this split's
        files = sorted(p for p in named if "-of-" not in p.name and not p.name.startswith("data-0"))
        files = files or sorted(p for p in named if p.name.startswith("data-0"))  # Arrow shards of a save_to_disk
    return files


def _from_files(files: list[Path], where: str):
    ds = _datasets()
    arrow = [f for f in files if f.suffix == ".arrow"]
    if arrow and len(arrow) == len(files):
        # Arrow files (save_to_disk's shards, or the cache's) are memory-mapped as they are
        return ds.concatenate_datasets([ds.Dataset.from_file(str(f)) for f in arrow])
    if arrow:
        raise InputError(f"{where}: both parquet and Arrow files; give one kind")
    # parquet is converted once into datasets' Arrow cache, which is memory-mapped
    return ds.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def open_split(source: str, split: Optional[str] = None, config: Optional[str] = None, what: str = "--dataset"):
    """A `datasets.Dataset` (memory-mapped) from a save_to_disk folder, a parquet / Arrow file or folder, or a hub id
    in the local cache. `split` picks one split of a DatasetDict or of a folder of split files; `config` a hub
    configuration's folder."""
    path = Path(source)
    if not path.exists():
        if source.count("/") != 1 or source.startswith((".", "/")):
            raise InputError(f"{what} {source}: not found (a folder, a parquet / Arrow file, or a hub id owner/name)")
        snapshot = _hub_snapshot(source)
        folder = snapshot / config if config and (snapshot / config).is_dir() else snapshot / "data"
        if not folder.is_dir():
            raise InputError(f"{what} {source}: no configuration folder {config or 'data'!r} in its cached snapshot "
                             f"{snapshot} (folders: {sorted(p.name for p in snapshot.iterdir() if p.is_dir())})")
        files = _data_files(folder, split) if split else []
        if not files:
            raise InputError(f"{what} {source}: no {split!r} files in {folder} (configuration {config or 'default'})")
        return _from_files(files, f"{what} {source}")
    if path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
        loaded = _datasets().load_from_disk(str(path))
        if isinstance(loaded, _datasets().DatasetDict):
            if split not in loaded:
                raise InputError(f"{what} {source}: no split {split!r} (splits: {sorted(loaded)}); pass --split")
            loaded = loaded[split]
        return loaded
    if path.is_dir():
        folder = path / config if config and (path / config).is_dir() else path
        files = _data_files(folder, split or "")
        if not files:
            raise InputError(f"{what} {source}: no parquet or Arrow files (and not a save_to_disk folder)")
        return _from_files(files, f"{what} {source}")
    if path.suffix not in (".parquet", ".arrow"):
        raise InputError(f"{what} {source}: not a parquet or Arrow file, nor a folder")
    return _from_files([path], f"{what} {source}")


def _require(ds, columns, task: str, where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise InputError(f"{where}: no {missing} column for {task} (lmms-eval's layout; columns: "
                         f"{ds.column_names[:14]})")


def _text_columns(ds, columns):
    """The rows of a few text columns (never the image column: no image is read to score)."""
    return ds.select_columns(list(columns)).to_list()


def _ids(ds, layout: Layout, where: str) -> list[str]:
    if layout.id_column is None:
        return [str(i) for i in range(len(ds))]
    ids = [str(v) for v in ds[layout.id_column]]
    seen = set()
    for row, qid in enumerate(ids):
        if qid in seen:
            raise InputError(f"{where}: row {row}: {layout.id_column} {qid} repeats; question ids must be unique")
        seen.add(qid)
    return ids


# ------------------------------------------------------------------------------------------------ ground truth
def _answers(value, where):
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: no answers")
    out = [a.get("answer") if isinstance(a, dict) else a for a in value]
    if not all(isinstance(a, str) for a in out):
        raise InputError(f"{where}: an answer is not a string")
    return out


def truth_textvqa(ds, where):
    _require(ds, ("question_id", "image_id", "question", "answers"), "textvqa", where)
    out = []
    for row, r in enumerate(_text_columns(ds, ("question_id", "image_id", "question", "answers"))):
        w = f"{where}: row {row} (question {r['question_id']})"
        out.append({"question_id": str(r["question_id"]), "image_id": str(r["image_id"]),
                    "question": str(r["question"]), "answers": _answers(r["answers"], w), "where": w})
    return out


def truth_vqav2(ds, where):
    _require(ds, ("question_id", "answers"), "vqav2", where)
    rows = _text_columns(ds, ("question_id", "answers"))
    return {str(r["question_id"]): _answers(r["answers"], f"{where}: row {i} (question {r['question_id']})")
            for i, r in enumerate(rows)}, {}


def truth_gqa(ds, where):
    _require(ds, ("id", "answer"), "gqa", where)
    cols = [c for c in ("id", "answer", "isBalanced", "types") if c in ds.column_names]
    out = {}
    for r in _text_columns(ds, cols):
        types = r.get("types") if isinstance(r.get("types"), dict) else {}
        balanced = r.get("isBalanced")
        out[str(r["id"])] = GQAQuestion(str(r["answer"]), True if balanced is None else bool(balanced),
                                        types.get("structural"), types.get("semantic"))
    return "official", out


def truth_pope(ds, where):
    _require(ds, ("id", "answer", "category"), "pope", where)
    ids = _ids(ds, LAYOUTS["pope"], where)
    labels, categories = {}, {}
    for qid, r in zip(ids, _text_columns(ds, ("answer", "category"))):
        label = str(r["answer"]).strip().lower()
        if label not in ("yes", "no"):
            raise InputError(f"{where}: id {qid}: answer {r['answer']!r} is not yes/no")
        labels[qid], categories[qid] = label, str(r["category"])
    return labels, categories


def _has_image(ds) -> list[bool]:
    if "image" not in ds.column_names:
        return [False] * len(ds)
    import pyarrow as pa
    import pyarrow.compute as pc
    column = ds.select_columns(["image"]).with_format("arrow")[:].column("image")  # as stored, not decoded
    has = column.is_valid()
    if pa.types.is_struct(column.type):  # datasets.Image: {bytes, path}; a row with neither holds no image
        parts = [pc.struct_field(column, name).is_valid() for name in ("bytes", "path")
                 if column.type.get_field_index(name) >= 0]
        if parts:
            has = pc.and_(has, pc.or_(*parts) if len(parts) == 2 else parts[0])
    return [bool(v) for v in has.to_pylist()]


def truth_scienceqa(ds, where):
    _require(ds, ("choices", "answer"), "scienceqa", where)
    images = _has_image(ds)
    return {str(i): {"choices": list(r["choices"]), "answer": int(r["answer"]), "image": images[i]}
            for i, r in enumerate(_text_columns(ds, ("choices", "answer")))}


def _option(value):
    return None if value is None or (isinstance(value, str) and value in NA_STRINGS) else value


def truth_mmbench(ds, where):
    _require(ds, ("index", "A", "B", "answer"), "mmbench", where)
    letters = [c for c in "ABCDEFGHI" if c in ds.column_names]
    l2 = "L2-category" if "L2-category" in ds.column_names else "l2-category"
    extra = [c for c in ("category", l2, "split") if c in ds.column_names]
    out = {}
    for row, r in enumerate(_text_columns(ds, ["index", "answer", *letters, *extra])):
        try:
            index = int(r["index"])
        except (TypeError, ValueError):
            raise InputError(f"{where}: row {row}: index {r['index']!r} is not an integer") from None
        choices = {c: r[c] for c in letters if _option(r[c]) is not None}
        if r["answer"] not in choices:
            raise InputError(f"{where}: row {row}, index {index}: answer {r['answer']!r} is not one of its options "
                             f"{sorted(choices)}")
        if str(index) in out:
            raise InputError(f"{where}: index {index} appears on more than one row")
        out[str(index)] = MMBenchQuestion(index, r["answer"], choices, str(r.get("category") or ""),
                                          str(r.get(l2) or ""), str(r.get("split") or ""))
    return out


TRUTH: dict[str, Callable[[Any, str], Any]] = {
    "textvqa": truth_textvqa, "vqav2": truth_vqav2, "gqa": truth_gqa, "pope": truth_pope,
    "scienceqa": truth_scienceqa, "mmbench": truth_mmbench,
}


def open_task_split(task: str, source: str, split: Optional[str] = None, config: Optional[str] = None):
    if task not in LAYOUTS:
        raise InputError(f"--dataset is read for {', '.join(LAYOUTS)}, not {task}")
    layout = LAYOUTS[task]
    return open_split(source, split or layout.split, config or layout.config)


def read_truth(task: str, source: str, split: Optional[str] = None, config: Optional[str] = None):
    """The ground truth of a benchmark split held as a dataset, in the form of the task's file reader."""
    ds = open_task_split(task, source, split, config)
    if len(ds) == 0:
        raise InputError(f"--dataset {source}: no rows")
    return TRUTH[task](ds, f"--dataset {source}")


# ------------------------------------------------------------------------------------------------ questions
def prompt(task: str, row: dict) -> str:
    """The question text a model is given: LLaVA-1.5's evaluation prompts (its question files; MMBench and
    ScienceQA as its model_vqa_mmbench / science_qa prompts, which lmms-eval's ScienceQA prompt equals)."""
    if task == "textvqa":
        ocr = ", ".join(row.get("ocr_tokens") or [])
        return f"{row['question']}\nReference OCR token: {ocr}{LLAVA_SHORT_ANSWER}"
    if task in ("vqav2", "gqa", "pope"):
        return f"{row['question'].strip()}{LLAVA_SHORT_ANSWER}"
    if task == "scienceqa":
        context = f"Context: {row['hint']}\n" if row.get("hint") else ""
        options = "\n".join(f"{chr(ord('A') + k)}. {c}" for k, c in enumerate(row["choices"]))
        return f"{context}{row['question']}\n{options}{LETTER_ANSWER}"
    if task == "mmbench":
        hint = _option(row.get("hint"))
        question = f"{hint}\n{row['question']}" if hint is not None else row["question"]
        options = "".join(f"\n{c}. {row[c]}" for c in "ABCDEFGHI" if c in row and _option(row[c]) is not None)
        return f"{question}{options}{LETTER_ANSWER}"
    raise InputError(f"no prompt for {task}")


class SplitImages:
    """Each question's image, decoded from its row (or, for GQA, from the image table row of its imageId) when the
    question is answered."""

    def __init__(self, ds, rows_of_key: Optional[dict] = None):
        self.images = ds.select_columns(["image"])
        self.rows_of_key = rows_of_key

    def __call__(self, question: dict):
        from data.llava import open_image_source
        row = question["_row"] if self.rows_of_key is None else self.rows_of_key[question["image"]]
        return open_image_source(self.images[row]["image"])


def read_questions(task: str, source: str, split: Optional[str] = None, config: Optional[str] = None,
                   images: Optional[str] = None, open_images: bool = True):
    """(questions as LLaVA's question files hold them: question_id, text, image (a key naming the image), and the
    function giving a question's image). GQA's images come from `images` (default: the hub id's
    testdev_balanced_images configuration, or a folder / file of that table)."""
    layout = LAYOUTS.get(task)
    ds = open_task_split(task, source, split, config)
    where = f"--dataset {source}"
    needed = {"textvqa": ("question",), "vqav2": ("question",), "gqa": ("question", "imageId"),
              "pope": ("question",), "mmbench": ("question", "A", "B"), "scienceqa": ("question", "choices")}[task]
    _require(ds, needed, task, where)
    ids = _ids(ds, layout, where)
    columns = [c for c in ds.column_names if c != "image"]
    rows = _text_columns(ds, columns)
    questions = []
    for row, (qid, r) in enumerate(zip(ids, rows)):
        key = str(r[layout.image_key]) if layout.image_key else f"row {row}"
        questions.append({"question_id": r[layout.id_column] if layout.id_column else row, "text": prompt(task, r),
                          "image": key, "_row": row})
    if not open_images:  # `eval merge` needs the questions only
        return questions, None
    if task == "gqa":
        image_source = images or (source if not Path(source).exists() else None)
        if image_source is None:
            raise InputError("gqa: give the image table (--images: its save_to_disk folder or parquet files, "
                             "columns id and image)")
        table = open_split(image_source, split or layout.split, layout.images_config, what="--images")
        _require(table, ("id", "image"), task, f"--images {image_source}")
        rows_of = {str(k): i for i, k in enumerate(table["id"])}
        missing = [q["image"] for q in questions if q["image"] not in rows_of]
        if missing:
            raise InputError(f"--images {image_source}: no image {missing[0]!r} ({len(missing)} questions' images "
                             f"are missing)")
        return questions, SplitImages(table, rows_of)
    _require(ds, ("image",), task, where)
    return questions, SplitImages(ds)


def dataset_fingerprint(source: str, split: Optional[str], config: Optional[str], task: str) -> str:
    """What identifies the split's contents for `eval generate`'s resume check."""
    ds = open_task_split(task, source, split, config)
    return getattr(ds, "_fingerprint", "") or str(len(ds))
