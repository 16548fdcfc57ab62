"""LLaVA visual-instruction data: records -> token ids, labels and pixel values, and their batching.

Records are LLaVA's: {"id", "image" (optional, relative to the image folder), "conversations": [...]}, or the
`messages` + `images` format of TRL and the hub's VLM sets (`normalize_record`), in a JSON list, JSON lines, a
parquet file or a folder written by `datasets`' save_to_disk; images as paths, bytes or `datasets.Image` columns
(`open_image_source`). Files go through `datasets` (`open_records`): converted once into its Arrow cache and
memory-mapped, so that no process holds the records in RAM and a 665k-record file opens in a fraction of a second
after its first conversion (about 20 s here). A file that is not valid JSON fails at load time naming the line,
and a missing image folder fails at start-up. A sample that cannot be used (malformed record or wrong-typed field, missing or
unreadable image, image tokens cut by truncation, answer entirely truncated) comes back as {"skip": reason}: it
is logged with its id and index here, left out of the batch by the collator, and counted by reason by the
trainer, which prints the counts at the end of every epoch and stops when they pass `train.max_skip_rate`.
Nothing is masked silently.

Token ids follow LLaVA's `tokenizer_image_token`: the text before and after "<image>" is tokenized by separate
calls, so with a sentencepiece tokenizer the text after the image starts with its own "▁" (see `encode`).
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from .conversation import IMAGE_TOKEN, ConversationError, Rendered, parse_turns, render

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A data file that cannot be read at all (not JSON, not a list of records)."""


class SampleError(ValueError):
    """One sample that cannot be used; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_records(path: str | Path) -> list[dict]:
    """A JSON list of records, or JSON lines (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file {path} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not records:
        raise DataFormatError(f"{path}: no records")
    return records


def _datasets():
    import datasets
    return datasets


def open_records(path: str | Path) -> Sequence[dict]:
    """The records of a data file or folder: a `datasets.Dataset` memory-mapped from datasets' Arrow cache (a
    parquet file, JSON lines or a JSON list, converted once) or from a save_to_disk folder (its "train" split if it
    holds several). A JSON file whose records share no schema (a malformed record among them) is read into memory
    by `load_records` instead, so that each bad record stays a counted skip."""
    path = Path(path)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            raise DataFormatError(f"{path}: a folder, but not one written by datasets' save_to_disk")
        records = _datasets().load_from_disk(str(path))
        if not hasattr(records, "column_names") or isinstance(records.column_names, dict):  # a DatasetDict
            if "train" not in records:
                raise DataFormatError(f"{path}: a dataset with splits {sorted(records)} and no 'train' split")
            records = records["train"]
    elif not path.is_file():
        raise DataFormatError(f"data file {path} not found")
    elif path.suffix.lower() == ".parquet":
        records = _datasets().load_dataset("parquet", data_files=str(path), split="train")
    else:
        try:
            records = _datasets().load_dataset("json", data_files=str(path), split="train")
        except Exception:  # not JSON (load_records names the line), or records of different shapes
            return load_records(path)
    if len(records) == 0:
        raise DataFormatError(f"{path}: no records")
    return records


def normalize_record(record):
    """A record in the `messages` + `images` format ({"messages": [{"role", "content": a string or a list of
    {"type": "image"} and {"type": "text", "text"} items}], "images": [...]}) as a LLaVA record: each image item
    becomes "<image>\\n" where it is in its turn, the images stay as given. Other records are returned as they are."""
    if not isinstance(record, dict) or "messages" not in record or record.get("conversations") is not None:
        return record
    messages = record["messages"]
    if not isinstance(messages, list):
        raise SampleError("malformed record", f"'messages' is a {type(messages).__name__}, not a list")
    conversations = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise SampleError("malformed record", f"message {i} is not an object with a 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":  # written as LLaVA writes it: on a line of its own
                    parts.append(IMAGE_TOKEN + "\n")
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise SampleError("malformed record", f"message {i}: a content item of type {kind!r}")
            content = "".join(parts)
        if not isinstance(content, str):
            raise SampleError("malformed record", f"message {i}: content is a {type(content).__name__}")
        conversations.append({"from": m["role"], "value": content})
    out = {k: v for k, v in record.items() if k not in ("messages", "images")}
    images = record.get("images")
    return {**out, "conversations": conversations, **({"image": images} if images else {})}


def open_image_source(source, folder: str | Path = "") -> Image.Image:
    """An image in RGB from a path (relative to `folder`), bytes, datasets' {"bytes", "path"} storage or an image
    `datasets.Image` already decoded."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(source)) as im:
                return im.convert("RGB")
        except Exception as e:
            raise SampleError("unreadable image", f"embedded image: {e}") from None
    if not isinstance(source, str) or not source:
        raise SampleError("malformed record", f"an image given as a {type(source).__name__}")
    path = Path(folder) / source
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise SampleError("missing image", str(path)) from None
    except Exception as e:  # truncated or not an image
        raise SampleError("unreadable image", f"{path}: {e}") from None


@dataclass
class SkipLog:
    """Logs skipped samples with id and index, the first few of each reason (per process: the trainer counts)."""

    max_logged_per_reason: int = 5
    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str, index: int, sample_id, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= self.max_logged_per_reason:
            log.warning("skipped sample %s (index %d): %s%s", sample_id, index, reason, f" ({detail})" if detail else "")



def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's image_aspect_ratio=pad: centre the image on a square of the processor's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def load_image(path: Path, image_processor, aspect_ratio: str = "pad") -> torch.Tensor:
    """One image as the model sees it: RGB, padded to a square of the processor's mean colour (LLaVA-1.5's
    image_aspect_ratio=pad), then the processor's resize, crop and normalisation. (3, H, W)."""
    if not path.is_file():
        raise SampleError("missing image", str(path))
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as e:  # PIL raises several types for corrupt or truncated files
        raise SampleError("unreadable image", f"{path}: {e}") from None
    return process_image(image, image_processor, aspect_ratio)


def process_image(image: Image.Image, image_processor, aspect_ratio: str = "pad") -> torch.Tensor:
    if aspect_ratio == "pad":
        fill = tuple(int(255 * x) for x in getattr(image_processor, "image_mean", (0.5, 0.5, 0.5)))
        image = expand_to_square(image, fill)
    elif aspect_ratio != "none":
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'none', not {aspect_ratio!r}")
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the rendered text ((s, s) for BOS)


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < e and end > s for s, e in spans)


def _encode_piece(tokenizer, text: str, base: int, content: Sequence[tuple[int, int]], add_special_tokens: bool,
                  special_ids: set[int]) -> Encoding:
    """One tokenizer call. Special-token strings inside the messages' own text (a "</s>" typed in an answer)
    are kept as text: the piece is tokenized again with `split_special_tokens`, and the template's own special
    tokens are put back where they were. A token that straddles one of those and the text around it cannot be
    put back: the sample is skipped."""
    def call(split):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        split_special_tokens=split)
        return list(enc["input_ids"]), [(s + base, e + base) for s, e in enc["offset_mapping"]]

    ids, offsets = call(False)
    special = [(t, s, e) for t, (s, e) in zip(ids, offsets) if t in special_ids and e > s]
    if not any(_overlaps(s, e, content) for _, s, e in special):
        return Encoding(ids, offsets)
    controls = [(t, s, e) for t, s, e in special if not _overlaps(s, e, content)]
    out_ids, out_offsets = [], []
    for t, (s, e) in zip(*call(True)):
        control = next(((ct, cs, ce) for ct, cs, ce in controls if s < ce and e > cs), None)
        if control is None:
            out_ids.append(t)
            out_offsets.append((s, e))
        elif control[1] <= s and e <= control[2]:
            if not out_offsets or out_offsets[-1] != control[1:]:  # the control token's first piece
                out_ids.append(control[0])
                out_offsets.append(control[1:])
        else:
            raise SampleError("special token text in content", f"a token at characters {s}-{e} straddles a "
                                                               f"literal special-token string and the template")
    return Encoding(out_ids, out_offsets)


def encode_text(tokenizer, text: str, content: Sequence[tuple[int, int]], add_special_tokens: bool) -> Encoding:
    """One tokenizer call over `text` in which special-token strings inside the `content` spans (the messages' own
    text) stay text, as in `encode` (the generic recipe's rendering has no "<image>" pieces to split on)."""
    return _encode_piece(tokenizer, text, 0, content, add_special_tokens, special_token_ids(tokenizer))


def special_token_ids(tokenizer) -> set[int]:
    """The tokenizer's named special tokens and every added token marked special (chat markers such as Gemma's
    <end_of_turn> are often only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def encode(tokenizer, rendered: Rendered, image_token_id: int, add_special_tokens: bool = True) -> Encoding:
    """Token ids as LLaVA's `tokenizer_image_token` makes them: the text on either side of "<image>" is
    tokenized by its own call (the first one adds BOS), and the image token goes between. With vicuna's
    sentencepiece tokenizer the text after the image therefore starts with "▁" (id 29871), which one call over
    the whole string would drop. Inside each piece the tokenizer cuts the string as it does by itself, so a
    round boundary "</s>USER" follows the installed tokenizer (see docs/fidelity.md: the paper's transformers 4.31 cut
    it differently)."""
    special_ids = set(tokenizer.all_special_ids)
    ids, offsets, pos = [], [], 0
    for k, piece in enumerate(rendered.text.split(IMAGE_TOKEN)):
        if k:
            ids.append(image_token_id)
            offsets.append((pos, pos + len(IMAGE_TOKEN)))
            pos += len(IMAGE_TOKEN)
        enc = _encode_piece(tokenizer, piece, pos, rendered.content, add_special_tokens and k == 0, special_ids)
        ids += enc.ids
        offsets += enc.offsets
        pos += len(piece)
    return Encoding(ids, offsets)


def expand_image_tokens(ids: list[int], image_token_id: int, count: int) -> list[int]:
    """Each "<image>" token becomes `count` image tokens (the tower's patch count)."""
    out = []
    for t in ids:
        out.extend([t] * count if t == image_token_id else [t])
    return out


def supervised_labels(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                      input_ids: Sequence[int]) -> list[int]:
    """A token carries its label when its characters overlap a supervised span (added special tokens such as
    BOS have empty offsets and stay masked)."""
    labels = []
    for tok, (s, e) in zip(input_ids, offsets):
        hit = e > s and any(s < end and e > start for start, end in spans)
        labels.append(tok if hit else IGNORE_INDEX)
    return labels


@dataclass(frozen=True)
class LlavaDataConfig:
    data_path: str
    image_folder: str = ""
    template: str = "vicuna_v1"
    model_max_length: int = 2048
    image_aspect_ratio: str = "pad"  # "pad" (LLaVA-1.5) or "none" (the processor's resize and crop only)
    end_of_turn: Optional[str] = None  # chat template: the marker supervised after each answer (default: eos)


def _words(record) -> int:
    """Words in a record's turns as LLaVA counts them ("<image>" included), in either format (1 for a malformed
    record: it is skipped when read)."""
    try:
        turns = normalize_record(record).get("conversations")
    except (SampleError, AttributeError):
        return 1
    if not isinstance(turns, list):
        return 1
    return sum(len(str(c.get("value", "")).split()) for c in turns if isinstance(c, dict))


IMAGE_FIELDS = ("image", "images")


def _image_flags(records) -> tuple[list[bool], int]:
    """Per record whether it has an image, and how many records give theirs as a path (an image folder is needed).
    A datasets.Dataset is read column by column, without decoding its images."""
    if isinstance(records, list):
        flags, paths = [], 0
        for r in records:
            value = next((r.get(k) for k in IMAGE_FIELDS if isinstance(r, dict) and r.get(k)), None)
            flags.append(bool(value))
            paths += isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value))
        return flags, paths
    import pyarrow as pa
    import pyarrow.compute as pc

    flags, paths = [False] * len(records), 0
    for name in (k for k in IMAGE_FIELDS if k in records.column_names):
        column = records.data.column(name)
        kind = column.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            present = pc.fill_null(pc.greater(pc.list_value_length(column), 0), False)
            is_path = pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            present = pc.fill_null(pc.greater(pc.utf8_length(column), 0), False)
            is_path = True
        else:  # datasets.Image storage, bytes
            present, is_path = pc.is_valid(column), False
        present = present.to_pylist()
        flags = [f or p for f, p in zip(flags, present)]
        paths += sum(present) if is_path else 0
    return flags, paths


class RecordDataset(torch.utils.data.Dataset):
    """Records, read lazily (a list, or a memory-mapped datasets.Dataset from `open_records`): a subclass's
    `build(record, index)` makes the sample when it is asked for, from the record in LLaVA's format
    (`normalize_record`)."""

    def __init__(self, records: Sequence, data_path: str, image_folder: str, skips: Optional[SkipLog] = None):
        self.records = records
        self.skips = skips or SkipLog()
        self.has_image, with_paths = _image_flags(records)
        if with_paths and not Path(image_folder).is_dir():
            raise DataFormatError(f"image folder {image_folder!r} not found ({with_paths} records of "
                                  f"{data_path or 'the data'} give their image as a path)")

    def __len__(self) -> int:
        return len(self.records)

    def _texts(self):
        """The records without their image columns (a Dataset's are not decoded), in order."""
        if isinstance(self.records, list):
            yield from self.records
            return
        columns = [c for c in ("conversations", "messages") if c in self.records.column_names]
        if not columns:
            yield from ({} for _ in range(len(self.records)))
            return
        for batch in self.records.select_columns(columns).iter(batch_size=4096):
            for i in range(len(batch[columns[0]])):
                yield {c: batch[c][i] for c in columns}

    def modality_lengths_for(self, image_tokens: int) -> list[int]:
        """LLaVA's length estimate for grouping: words in the conversation (+ `image_tokens`), positive for
        samples with an image and negative for text-only ones."""
        return [_words(r) + image_tokens if image else -max(_words(r), 1)
                for r, image in zip(self._texts(), self.has_image)]

    def __getitem__(self, index: int) -> dict:
        """The sample, or {"skip": reason} for one that cannot be used (logged here, counted by the trainer
        from the batches, so that counts survive DataLoader worker processes)."""
        record = self.records[index]
        sample_id = record.get("id", index) if isinstance(record, dict) else index
        try:
            return self.build(normalize_record(record), index)
        except SampleError as e:
            self.skips.skip(e.reason, index, sample_id, str(e))
            return {"skip": e.reason, "id": sample_id, "index": index}

    def build(self, record, index: int = -1) -> dict:
        raise NotImplementedError


class LlavaDataset(RecordDataset):
    """Lazy: records are parsed at load, tokenised and their images read when a sample is asked for."""

    def __init__(self, config: LlavaDataConfig, tokenizer, image_processor, image_token_id: int,
                 image_seq_length: int, records: Optional[Sequence] = None, skips: Optional[SkipLog] = None):
        self.config = config
        super().__init__(records if records is not None else open_records(config.data_path), config.data_path,
                         config.image_folder, skips)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length

    @property
    def modality_lengths(self) -> list[int]:
        return self.modality_lengths_for(self.image_seq_length)

    # --------------------------------------------------------------------------------------------- pieces
    def build(self, record: dict, index: int = -1) -> dict:
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise SampleError("malformed record", "expected an object with a 'conversations' list")
        image = record.get("image")
        if isinstance(image, list):  # the messages format's "images"; LLaVA-1.5 takes one image
            if len(image) > 1:
                raise SampleError("malformed record", f"{len(image)} images (LLaVA-1.5 takes one)")
            image = image[0] if image else None
        has_image = image is not None and image != ""
        if has_image and not isinstance(image, (str, bytes, dict, Image.Image)):
            raise SampleError("malformed record", f"'image' is a {type(image).__name__}, not a path")
        try:
            turns = parse_turns(record["conversations"], has_image)
            input_ids, labels = self.tokenize(turns, has_image)
        except ConversationError as e:
            raise SampleError("malformed record", str(e)) from None
        pixel_values = self.load_image(image) if has_image else None
        return {"id": record.get("id", index), "input_ids": input_ids, "labels": labels,
                "pixel_values": pixel_values}

    def load_image(self, source) -> torch.Tensor:
        """A path relative to the image folder (LLaVA's), or an embedded image (bytes, datasets.Image)."""
        if isinstance(source, str):
            return load_image(Path(self.config.image_folder) / source, self.image_processor,
                              self.config.image_aspect_ratio)
        return process_image(open_image_source(source), self.image_processor, self.config.image_aspect_ratio)

    def render(self, turns):
        tok = self.tokenizer

        def apply(messages):
            return tok.apply_chat_template(messages, tokenize=False)
        return render(turns, self.config.template, eos=tok.eos_token or "</s>", apply_chat_template=apply,
                      end_of_turn=self.config.end_of_turn or tok.eos_token)

    def tokenize(self, turns, has_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rendered = self.render(turns)
        # a chat template writes its own special tokens (BOS included); the others get the tokenizer's
        enc = encode(self.tokenizer, rendered, self.image_token_id, add_special_tokens=self.config.template != "chat")
        ids = enc.ids
        labels = supervised_labels(enc.offsets, rendered.supervised, ids)
        # One "<image>" token becomes the tower's patch count of image tokens, never supervised.
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != (1 if has_image else 0):
            raise SampleError("malformed record", f"{len(positions)} {IMAGE_TOKEN} tokens after tokenisation")
        if positions:
            p = positions[0]
            ids = ids[:p] + [self.image_token_id] * self.image_seq_length + ids[p + 1:]
            labels = labels[:p] + [IGNORE_INDEX] * self.image_seq_length + labels[p + 1:]
        limit = self.config.model_max_length
        if len(ids) > limit:
            if positions and positions[0] + self.image_seq_length > limit:
                raise SampleError("image truncated", f"{len(ids)} tokens, max {limit}")
            ids, labels = ids[:limit], labels[:limit]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise SampleError("answer truncated", f"no supervised token within {limit} tokens")
        return torch.tensor(ids), torch.tensor(labels)


@dataclass
class LlavaCollator:
    """Pads a micro-batch; images are stacked in sample order (one per sample that has one). Skipped samples
    are left out and their reasons listed under "skipped"; a batch of skipped samples only is {"empty": True}."""

    pad_token_id: int

    def __call__(self, samples: Sequence[dict]) -> dict:
        skipped = [s["skip"] for s in samples if "skip" in s]
        samples = [s for s in samples if "skip" not in s]
        if not samples:
            return {"empty": True, "skipped": skipped}
        n = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), n), dtype=torch.long)
        for i, s in enumerate(samples):
            k = len(s["input_ids"])
            input_ids[i, :k] = s["input_ids"]
            labels[i, :k] = s["labels"]
            attention_mask[i, :k] = 1
        images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "pixel_values": torch.stack(images) if images else None, "ids": [s["id"] for s in samples],
                "skipped": skipped}
