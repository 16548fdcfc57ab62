"""LLaVA-format conversations for any transformers image-text-to-text model, through the model's own processor.

Records are LLaVA's ({"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}, `data.llava`'s reader
and rules: `<image>` moved to the front of its turn, one image per sample). Each becomes chat messages with an
{"type": "image"} item where `<image>` was, rendered by the processor's chat template; the processor then
expands the image placeholder and returns every extra input its model needs (image_grid_thw, image_sizes,
pixel_attention_mask, token_type_ids, ...), which go to the model untouched.

Labels: the assistant turns, found as character spans of the rendered text (each turn's span runs from the end of
the conversation rendered up to it with the generation prompt to the end of the conversation rendered up to and
including it, so the end-of-turn marker the template writes after an answer is learned too), carried to the tokens
of the unexpanded text by their offsets, and from there to the processor's expanded ids by aligning the two
sequences (the expansion only inserts image tokens). A template whose renderings are not prefixes of each other,
or labels that do not survive the alignment, make the sample a counted skip, never silently unlabeled.

Batches: the collator calls the processor on the whole micro-batch (it pads and stacks its own outputs), so no
family-specific batching code is needed. A micro-batch without any image gets one extra row: a blank image with
a one-word prompt and no labels. Under ZeRO-3 every process must run the same modules in the same order, and a
family's forward runs its vision tower only when it has pixels; the extra row makes every micro-batch do so.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from .conversation import IMAGE_TOKEN, ConversationError, parse_turns
from .llava import IGNORE_INDEX, DataFormatError, RecordDataset, SampleError, SkipLog, load_records

BLANK_IMAGE_SIZE = 32
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatDataConfig:
    data_path: str
    image_folder: str = ""
    max_length: int = 2048  # a sample longer than this after the processor's image expansion is a counted skip


def to_messages(turns) -> list[dict]:
    """parse_turns' turns -> chat messages with content lists; "<image>\\n" -> an image item."""
    messages = []
    for t in turns:
        content = []
        text = t.text
        if text.startswith(IMAGE_TOKEN):
            content.append({"type": "image"})
            text = text[len(IMAGE_TOKEN):].lstrip("\n")
        content.append({"type": "text", "text": text})
        messages.append({"role": t.role, "content": content})
    return messages


def render_with_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the processor's chat template, and the character spans to learn."""
    def apply(msgs, prompt=False):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = apply(messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = apply(messages[:k], prompt=True), apply(messages[:k + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise SampleError("template not prefix-stable",
                              f"the chat template renders turn {k} differently inside the whole conversation")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def add_special_tokens(tokenizer, text: str) -> bool:
    """Whether tokenizing a rendered conversation should add the tokenizer's special tokens: not when the chat
    template already wrote the BOS (Gemma 3, Llama 3, Mllama do), or the sequence would start with two."""
    return not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))


def align_labels(unexpanded: Sequence[int], labels: Sequence[int], expanded: Sequence[int]) -> list[int]:
    """Labels for the processor's expanded ids: copied over the blocks the two sequences share (the expansion
    only inserts tokens), IGNORE_INDEX elsewhere. Every label must land on the same token id."""
    out = [IGNORE_INDEX] * len(expanded)
    matcher = difflib.SequenceMatcher(a=list(unexpanded), b=list(expanded), autojunk=False)
    placed = 0
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            label = labels[block.a + i]
            if label != IGNORE_INDEX:
                out[block.b + i] = label
                placed += 1
    wanted = sum(1 for label in labels if label != IGNORE_INDEX)
    if placed != wanted:
        raise SampleError("labels not aligned", f"{placed} of {wanted} supervised tokens found after the "
                                                f"processor's expansion")
    return out


class ChatDataset(RecordDataset):
    """Lazy: a record is parsed, rendered and its image opened when asked for; pixels are made by the collator."""

    def __init__(self, config: ChatDataConfig, processor, records: Optional[list[dict]] = None,
                 skips: Optional[SkipLog] = None):
        self.config = config
        self.processor = processor
        super().__init__(records if records is not None else load_records(config.data_path), config.data_path,
                         config.image_folder, skips)
        if getattr(processor, "chat_template", None) is None:
            raise DataFormatError("the processor has no chat template: save one with the processor "
                                  "(processor.chat_template = ...; processor.save_pretrained(dir))")

    @property
    def modality_lengths(self) -> list[int]:
        """Words per conversation, negative for text-only samples (the trainer's modality grouping)."""
        return self.modality_lengths_for(0)

    def build(self, record: dict, index: int = -1) -> dict:
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise SampleError("malformed record", "expected an object with a 'conversations' list")
        image = record.get("image")
        if image and not isinstance(image, str):
            raise SampleError("malformed record", f"'image' is a {type(image).__name__}, not a path")
        try:
            messages = to_messages(parse_turns(record["conversations"], bool(image)))
        except ConversationError as e:
            raise SampleError("malformed record", str(e)) from None
        text, spans = render_with_spans(self.processor, messages)
        tokenizer = self.processor.tokenizer
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens(tokenizer, text))
        labels = [tok if e > s and any(s < end and e > start for start, end in spans) else IGNORE_INDEX
                  for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError("no answer", "no assistant text to learn from")
        pil = self.open_image(image) if image else None
        return {"id": record.get("id", index), "index": index, "text": text, "image": pil,
                "ids": enc["input_ids"], "labels": labels}

    def open_image(self, relative: str) -> Image.Image:
        path = Path(self.config.image_folder) / relative
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise SampleError("missing image", str(path)) from None
        except Exception as e:  # truncated or not an image
            raise SampleError("unreadable image", f"{path}: {e}") from None


class ChatCollator:
    """Micro-batches through the processor (see the module docstring). Rows too long after expansion, or whose
    labels do not align, are dropped and counted under "skipped"; a batch without images gets the blank row."""

    def __init__(self, processor, max_length: int = 2048):
        self.processor = processor
        self.max_length = max_length
        blank = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "image"}]}]
        self.blank_text = processor.apply_chat_template(blank, tokenize=False, add_generation_prompt=False)
        self.blank_image = Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), (127, 127, 127))

    def encode(self, samples: Sequence[dict], blank: bool):
        texts = [s["text"] for s in samples] + ([self.blank_text] if blank else [])
        # nested, one list per row: what every family's processor takes when some rows have no image
        images = [[s["image"]] if s["image"] is not None else [] for s in samples] + ([[self.blank_image]] if blank
                                                                                      else [])
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                              add_special_tokens=add_special_tokens(self.processor.tokenizer, texts[0]))

    def __call__(self, samples: Sequence[dict]) -> dict:
        skipped = [s["skip"] for s in samples if "skip" in s]
        samples = [s for s in samples if "skip" not in s]
        while True:
            blank = not any(s["image"] is not None for s in samples)
            batch = self.encode(samples, blank)
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            labels = torch.full_like(ids, IGNORE_INDEX)
            bad = {}
            for row, s in enumerate(samples):
                expanded = ids[row][mask[row]].tolist()
                if len(expanded) > self.max_length:
                    bad[row] = "too long"
                    continue
                try:
                    labels[row, mask[row]] = torch.tensor(align_labels(s["ids"], s["labels"], expanded))
                except SampleError as e:
                    bad[row] = e.reason
            if not bad:
                break
            for row, reason in bad.items():
                log.warning("skipped sample %s (index %s): %s", samples[row]["id"], samples[row]["index"], reason)
            skipped += list(bad.values())
            samples = [s for row, s in enumerate(samples) if row not in bad]
        batch = dict(batch)
        batch["labels"] = labels
        tokens = int(mask[:len(samples)].sum())  # the samples' own tokens, not the blank row's; counted on the CPU
        return {"inputs": batch, "ids": [s["id"] for s in samples], "skipped": skipped, "empty": not samples,
                "tokens": tokens}
