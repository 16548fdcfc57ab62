"""LLaVA-format conversations for any transformers image-text-to-text model, through the model's own processor.

Records are LLaVA's ({"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}) or in the `messages` +
`images` format, from any file or folder `data.llava.open_records` reads (JSON, JSON lines, parquet, save_to_disk;
images as paths, bytes or datasets.Image), with `data.llava`'s rules: one image's `<image>` moved to the front of its turn; "image" may also be a list of paths, whose
placeholders stay where they are; placeholders and images must match, `record_messages`). Each becomes chat
messages with an {"type": "image"} item where `<image>` was, rendered by the processor's chat template; the
processor then expands the image placeholder and returns every extra input its model needs (image_grid_thw,
image_sizes, pixel_attention_mask, token_type_ids, ...), which go to the model untouched.

A system turn ({"from": "system"} first, the messages format's {"role": "system"}) goes to the template as the first
message (`leading_system_turn`), its content as the template writes it (`system_as_the_template_takes_it`: content
items, or a string for Llama 3.2 Vision's `| trim`), and is never learned; anywhere but first, with an image, or where
the template does not write it in a conversation ending with an answer (pixtral-12b's writes it before the last user
turn only), it is a counted skip that says so; a template that refuses it (Llama 3.2 Vision's earlier revision, with
images) is a "template error" skip with the template's own message.

Labels (`render_chat`): each assistant reply and the end-of-turn marker the template writes after it, and nothing
else. The rule needs no property of the template beyond "a message's text appears in the rendering, once, in order":
- The conversation is rendered twice: as it is, and with every message's text replaced by a unique sentinel. The
  sentinel rendering cuts the text into template pieces and message texts, so each reply's characters are known in
  the real rendering (a template may `trim` a text: the real rendering is checked against the pieces, and a
  template that changes a message's text otherwise, e.g. drops an earlier turn's reasoning, is a counted skip).
- The end marker of a reply is what the template writes right after it both in the whole conversation and in the
  conversation cut after that reply (their common prefix: "<|im_end|>" before the next turn, or at the very end),
  without trailing whitespace: the separator before the next turn is not learned. Where that is only whitespace
  (llava-1.5-hf ends a reply with " "), the tokenizer's EOS is written after the reply and learned in its place, as
  LLaVA itself learns "</s>"; where it has no special token of the tokenizer (a hub revision of
  llava-v1.6-mistral-hf writes the four characters `<\s>`), it is learned as text: `template_notes` says both once.
- The generation prompt need not be a prefix of the conversation (LLaVA-OneVision prompts with
  "<|im_start|>assistant\n" but writes "<|im_start|>assistant \n" inside one). Where it is, the characters between
  its end and the reply are learned too, since the model writes them after the prompt (llava-1.5's prompt ends at
  "ASSISTANT:" and the reply follows " ").
Token ownership: a token carries its label when it covers a learned character and no character after its turn's
learned span, so a sentencepiece "▁US" that starts on llava-1.5's separator and runs into the next "USER:" is not
learned; one that starts in the template before a reply and runs into it ("▁It" of "ASSISTANT: It") is.
The labels are carried from the tokens of the unexpanded text to the processor's expanded ids by aligning the two
sequences (the expansion only inserts image tokens); labels that do not survive the alignment make a counted skip.
Special-token text typed inside a message stays text, as in the LLaVA recipe: our tokenization keeps it text
(`data.llava.encode_text`), and where the processor, tokenizing the text again, made a special token of it, our text
tokens are put back in the row (`merge_expanded`); an image placeholder typed in a message is a counted skip.

A processor that makes the labels itself from a prompt and a `suffix` (PaliGemma's: it writes the image tokens, the
BOS, the "\n" after the prompt and the EOS after the answer, and labels the answer and the EOS) is used that way
(`builds_own_labels`): no chat template; a record is one question and one answer with at least one image, anything
else a counted skip.

Batches: the collator calls the processor on the whole micro-batch (it pads and stacks its own outputs), so no
family-specific batching code is needed beyond `processor_batch` (rows with images first; Mllama's per-row aspect
ratios completed). A micro-batch without any image gets one extra row, first: a blank image with a one-word prompt
and no labels. Under ZeRO-3 every process must run the same modules in the same order, and a family's forward runs
its vision tower only when it has pixels; the extra row makes every micro-batch do so.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from .conversation import IMAGE_TOKEN, ConversationError, parse_turns
from .llava import (IGNORE_INDEX, DataFormatError, RecordDataset, SampleError, SkipLog, encode_text,
                    open_image_source, open_records, special_token_ids)

BLANK_IMAGE_SIZE = 32
# Private-use characters: no template writes them and `trim` keeps them
SENTINEL = "\ue000{}\ue001"
SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
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


@dataclass(frozen=True)
class RenderedChat:
    text: str
    supervised: tuple[tuple[int, int], ...]  # character spans [start, end) to learn, one per reply
    content: tuple[tuple[int, int], ...]  # character spans of every message's own text
    end_markers: tuple[str, ...]  # what is learned after each reply: the template's marker, or the EOS written
    eos_appended: bool = False  # the template writes no marker after a reply: the EOS was written after each


def _sentinel_messages(messages: list[dict]) -> tuple[list[dict], list[tuple[int, str]]]:
    """The messages with each text item (or a content that is a string) replaced by its sentinel, and (message
    index, text) per text."""
    out, texts = [], []
    for k, m in enumerate(messages):
        if isinstance(m["content"], str):
            out.append({**m, "content": SENTINEL.format(len(texts))})
            texts.append((k, m["content"]))
            continue
        content = []
        for part in m["content"]:
            if part.get("type") == "text":
                content.append({"type": "text", "text": SENTINEL.format(len(texts))})
                texts.append((k, part["text"]))
            else:
                content.append(part)
        out.append({**m, "content": content})
    return out, texts


def _locate_texts(real: str, pieces: list[str], texts: list[str]) -> list[tuple[int, int]]:
    """Character spans of `texts` in `real` = pieces[0] + texts[0] + pieces[1] + ... (a text may be rendered trimmed)."""
    spans, pos = [], 0
    for i, text in enumerate(texts):
        if not real.startswith(pieces[i], pos):
            raise SampleError("template changes message text", "the template writes something else around a message "
                                                               "than it writes around a placeholder")
        pos += len(pieces[i])
        for candidate in dict.fromkeys((text, text.strip())):
            if real.startswith(candidate, pos) and real.startswith(pieces[i + 1], pos + len(candidate)):
                spans.append((pos, pos + len(candidate)))
                pos += len(candidate)
                break
        else:
            raise SampleError("template changes message text", f"message text {i} is not in the rendering as written")
    if real[pos:] != pieces[-1]:
        raise SampleError("template changes message text", "the rendering ends differently")
    return spans


def render_chat(apply: Callable[[list[dict], bool], str], messages: list[dict],
                eos_token: Optional[str]) -> RenderedChat:
    """The conversation rendered by `apply(messages, add_generation_prompt)` and the characters to learn (see the
    module docstring). Raises SampleError for a conversation the rule cannot label."""
    for m in messages:
        if m["role"] == "assistant" and not any(p.get("type") == "text" and p["text"].strip() for p in m["content"]):
            raise SampleError("empty answer", "an assistant turn has no text (it would teach the end marker alone)")
    messages = system_as_the_template_takes_it(apply, messages)
    marked, texts = _sentinel_messages(messages)
    try:
        real, template = apply(messages, False), apply(marked, False)
    except Exception as e:  # jinja2's TemplateError, raise_exception(...), a template indexing a missing item
        raise SampleError("template error", f"{type(e).__name__}: {e}") from None
    parts = SENTINEL_RE.split(template)
    pieces, order = parts[0::2], [int(i) for i in parts[1::2]]
    if order != list(range(len(texts))):
        system = [i for i, (owner, _) in enumerate(texts) if messages[owner]["role"] == "system"]
        if system and order == [i for i in range(len(texts)) if i not in system]:
            raise SampleError("system turn not written", "the chat template does not write the system turn in a "
                                                         "conversation that ends with an answer")
        raise SampleError("template changes message text", "the template leaves out, repeats or reorders messages")
    spans = _locate_texts(real, pieces, [t for _, t in texts])

    replies = []  # (learn from, reply end, end marker or None where the EOS is written)
    for k, m in enumerate(messages):
        items = [i for i, (owner, _) in enumerate(texts) if owner == k]
        if m["role"] != "assistant" or not items:
            continue
        first, last = items[0], items[-1]
        try:
            prompt, cut = apply(marked[:k], True), apply(marked[:k + 1], False)
        except Exception as e:
            raise SampleError("template error", f"{type(e).__name__}: {e}") from None
        # the characters between the generation prompt and the reply, which the model writes after the prompt
        before = template[:template.index(SENTINEL.format(first))]
        gap = len(before) - len(prompt) if before.startswith(prompt) else 0
        gap = gap if gap <= len(pieces[first]) else 0
        # the end marker: written after the reply both here and where the conversation ends with this reply
        sentinel = SENTINEL.format(last)
        after_full = template[template.index(sentinel) + len(sentinel):]
        after_cut = cut[cut.rindex(sentinel) + len(sentinel):] if sentinel in cut else ""
        closing = os.path.commonprefix([after_full, after_cut]).rstrip()
        if not closing.strip() and not eos_token:
            raise SampleError("no end marker", "the template writes nothing after a reply and the tokenizer has no "
                                               "EOS token to learn instead")
        replies.append((spans[first][0] - gap, spans[last][1], closing if closing.strip() else None))

    # write the EOS after each reply that has no marker; positions after it move
    inserted = sorted(end for _, end, closing in replies if closing is None)

    def moved(x: int, at_or_after: bool = False) -> int:
        return x + len(eos_token or "") * sum(1 for p in inserted if p < x or (at_or_after and p == x))
    for p in reversed(inserted):
        real = real[:p] + eos_token + real[p:]
    learned = tuple((moved(start, True), moved(end) + len(closing if closing is not None else eos_token))
                    for start, end, closing in replies)
    content = tuple((moved(a, True), moved(b)) for a, b in spans)
    markers = tuple(closing if closing is not None else eos_token for _, _, closing in replies)
    return RenderedChat(real, learned, content, markers, bool(inserted))


def supervised_labels(ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                      spans: Sequence[tuple[int, int]]) -> list[int]:
    """A token is learned when it covers a character of a learned span and none after that span's end (see the
    module docstring); tokens the tokenizer adds (empty offsets) never are."""
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        hit = e > s and any(s < b and e > a and e <= b for a, b in spans)
        labels.append(tok if hit else IGNORE_INDEX)
    return labels


def system_as_the_template_takes_it(apply: Callable[[list[dict], bool], str], messages: list[dict]) -> list[dict]:
    """The messages with a system turn's content in the form the template writes as text: a list of content items,
    as every other message (most templates read `content[0]['text']` or loop over the items), or a string where the
    template writes the list itself (Llama 3.2 Vision's `messages[0]['content'] | trim` makes the Python repr of a
    list its system text)."""
    system = [k for k, m in enumerate(messages) if m["role"] == "system" and not isinstance(m["content"], str)]
    if not system:
        return messages
    marked, _ = _sentinel_messages(messages)
    try:
        template = apply(marked, False)
    except Exception:
        return messages  # the template's error is the sample's (render_chat)
    messages = list(messages)
    for k in system:
        items = marked[k]["content"]
        if str(items) in template or any(str(item) in template for item in items):
            messages[k] = {**messages[k], "content": "".join(p["text"] for p in messages[k]["content"]
                                                             if p.get("type") == "text")}
    return messages


def template_notes(processor) -> list[str]:
    """What a user should know about the processor's chat template before training on it, found by labelling a
    small two-turn conversation: an EOS learned in place of a missing end marker, or a marker that is plain text."""
    tokenizer = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "text", "text": "Is it red?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
                {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]
    try:
        rendered = render_chat(chat_renderer(processor), messages, tokenizer.eos_token)
    except SampleError:
        return []  # the template cannot label even this conversation: every sample will say why as a skip
    if rendered.eos_appended:
        return [f"the chat template writes no end-of-turn marker after an answer: the tokenizer's EOS "
                f"{tokenizer.eos_token!r} is written after every answer and learned, so that the model learns to stop"]
    special = special_token_ids(tokenizer)
    for marker in dict.fromkeys(rendered.end_markers):
        if not special & set(tokenizer(marker, add_special_tokens=False)["input_ids"]):
            return [f"the chat template ends every answer with {marker.strip()!r}, which is not a special token of "
                    f"the tokenizer: the model learns it as text and generation will not stop at it (a later "
                    f"revision of the checkpoint's template may end answers with the EOS token)"]
    return []


def chat_renderer(processor) -> Callable[[list[dict], bool], str]:
    def apply(messages: list[dict], add_generation_prompt: bool) -> str:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return apply


def add_special_tokens(tokenizer, text: str) -> bool:
    """Whether tokenizing a rendered conversation should add the tokenizer's special tokens: not when the chat
    template already wrote the BOS (Gemma 3, Llama 3, Mllama do), or the sequence would start with two."""
    return not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))


def merge_expanded(unexpanded: Sequence[int], labels: Sequence[int], expanded: Sequence[int],
                   typed: frozenset = frozenset()) -> tuple[list[int], list[int], list[int]]:
    """The row the model gets from our ids of the unexpanded text and the processor's ids of the same text expanded
    (the expansion only inserts image tokens), as (ids, labels, the processor position each id takes its other
    per-token inputs from). Where the processor made one special token of special-token text typed in a message
    (`typed`: those tokens' ids), our text tokens stand instead, as in the LLaVA recipe; elsewhere the processor's
    ids, our labels copied over the blocks the two share. Every label must land on the same token id."""
    unexpanded, expanded = list(unexpanded), list(expanded)
    ids, out, source = [], [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=unexpanded, b=expanded, autojunk=False).get_opcodes():
        if tag == "equal":
            ids += expanded[j1:j2]
            out += labels[i1:i2]
            source += range(j1, j2)
        elif tag != "insert" and typed & set(expanded[j1:j2]):
            ids += unexpanded[i1:i2]
            out += labels[i1:i2]
            source += [min(j1, len(expanded) - 1)] * (i2 - i1)  # a text token's inputs: its neighbour's
        else:
            ids += expanded[j1:j2]
            out += [IGNORE_INDEX] * (j2 - j1)
            source += range(j1, j2)
    placed = sum(1 for label in out if label != IGNORE_INDEX)
    wanted = sum(1 for label in labels if label != IGNORE_INDEX)
    if placed != wanted:
        raise SampleError("labels not aligned", f"{placed} of {wanted} supervised tokens found after the "
                                                f"processor's expansion")
    return ids, out, source


def align_labels(unexpanded: Sequence[int], labels: Sequence[int], expanded: Sequence[int]) -> list[int]:
    """Labels for the processor's expanded ids (`merge_expanded` where no special-token text was typed)."""
    return merge_expanded(unexpanded, labels, expanded)[1]


def typed_special_tokens(tokenizer, text: str, content: Sequence[tuple[int, int]]) -> frozenset:
    """Ids of the special tokens whose text appears inside the messages' own text."""
    inside = "\0".join(text[a:b] for a, b in content)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {i: t.content for i, t in added.items()}
    strings.update({i: tokenizer.convert_ids_to_tokens(i) for i in tokenizer.all_special_ids})
    return frozenset(i for i in special_token_ids(tokenizer) if strings.get(i) and strings[i] in inside)


def image_token_strings(processor) -> set[str]:
    """The texts the processor expands into an image's or a video's tokens."""
    names = ("image_token", "video_token", "boi_token")
    return {t for t in (getattr(processor, n, None) for n in names) if isinstance(t, str) and t}


# Stands for "<image>" in a multi-image record while data.conversation reads it (it moves a single "<image>")
IMAGE_MARK = "\ue002"


def record_images(record: dict) -> list:
    """The record's images: LLaVA's "image" as one path, or a list (multi-image records, the messages format's
    "images"), each a path relative to the image folder, bytes, or a datasets.Image value."""
    image = record.get("image")
    if image is None or image == "" or image == []:
        return []
    images = image if isinstance(image, list) else [image]
    if not all(isinstance(x, (str, bytes, dict, Image.Image)) and x != "" for x in images):
        raise SampleError("malformed record", f"'image' is a {type(image).__name__}, not a path, an image or a "
                                              f"list of them")
    return images


def leading_system_turn(conversations: list) -> tuple[list[dict], list]:
    """([the system message], the other turns) of a conversation whose first turn is {"from": "system"} (the
    messages format's {"role": "system"}); ([], the turns) without one. Its text is never learned (`render_chat`
    learns the replies only); one system turn, first, with no image, as the templates take it."""
    is_system = [isinstance(c, dict) and c.get("from") == "system" for c in conversations]
    if not any(is_system):
        return [], conversations
    if is_system.index(True) != 0 or sum(is_system) > 1:
        raise SampleError("system turn not first", "a system turn is taken as the conversation's first turn only, "
                                                   "once")
    value = conversations[0].get("value")
    if not isinstance(value, str):
        raise SampleError("malformed record", f"the system turn's 'value' is {type(value).__name__}, not a string")
    if IMAGE_TOKEN in value:
        raise SampleError("image in the system turn", f"{IMAGE_TOKEN} in the system turn (images go in user turns)")
    return [{"role": "system", "content": [{"type": "text", "text": value}]}], conversations[1:]


def record_messages(record: dict, n_images: int) -> list[dict]:
    """Chat messages of a LLaVA record with `n_images` images. One image: LLaVA's rule (its "<image>" goes to the
    front of its turn, or into the first user turn if there is none). Several: each "<image>" stays where it is. The
    placeholders must match the images: two "<image>" for one image would otherwise be merged into one (LLaVA's
    reader does that silently), and the processor would refuse an image without a placeholder."""
    conversations = record["conversations"]
    system, conversations = leading_system_turn(conversations)
    placeholders = sum(c["value"].count(IMAGE_TOKEN) for c in conversations
                       if isinstance(c, dict) and isinstance(c.get("value"), str))
    if placeholders != n_images and not (n_images == 1 and placeholders == 0):
        raise SampleError("placeholders and images differ", f"{placeholders} {IMAGE_TOKEN} in the conversation for "
                                                            f"{n_images} image{'s' if n_images != 1 else ''}")
    try:
        if n_images <= 1:
            return system + to_messages(parse_turns(conversations, n_images == 1))
        marked = [{**c, "value": c["value"].replace(IMAGE_TOKEN, IMAGE_MARK)} if isinstance(c, dict) and isinstance(
            c.get("value"), str) else c for c in conversations]
        turns = parse_turns(marked, False)
    except ConversationError as e:
        raise SampleError("malformed record", str(e)) from None
    messages = system
    for t in turns:
        content = []
        for k, piece in enumerate(t.text.split(IMAGE_MARK)):
            if k:
                content.append({"type": "image"})
            piece = piece.strip("\n")  # the newline that separates a placeholder from the text, as for one image
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": t.role, "content": content})
    return messages


def builds_own_labels(processor) -> bool:
    """Whether the processor makes the labels itself from a `suffix` (PaliGemma)."""
    return "suffix" in inspect.signature(type(processor).__call__).parameters


def prompt_and_answer(messages: list[dict]) -> tuple[str, str]:
    """The one question and one answer of a conversation, for a processor that takes a prompt and a suffix."""
    if messages and messages[0]["role"] == "system":
        raise SampleError("system turn", "the processor takes a prompt and its answer, no system text")
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise SampleError("not one question and one answer", f"{len(messages)} turns (the processor takes a "
                                                             f"prompt and its answer)")
    prompt, answer = ("".join(p["text"] for p in m["content"] if p.get("type") == "text") for m in messages)
    if not answer.strip():
        raise SampleError("empty answer", "the answer has no text")
    return prompt, answer


class ChatDataset(RecordDataset):
    """Lazy: a record is parsed, rendered and its images opened when asked for; pixels are made by the collator."""

    def __init__(self, config: ChatDataConfig, processor, records: Optional[list[dict]] = None,
                 skips: Optional[SkipLog] = None):
        self.config = config
        self.processor = processor
        super().__init__(records if records is not None else open_records(config.data_path), config.data_path,
                         config.image_folder, skips)
        self.suffix = builds_own_labels(processor)
        if not self.suffix and getattr(processor, "chat_template", None) is None:
            raise DataFormatError("the processor has no chat template: save one with the processor "
                                  "(processor.chat_template = ...; processor.save_pretrained(dir))")
        self.render = chat_renderer(processor)
        self.notes = [] if self.suffix else template_notes(processor)  # printed once at start-up by the recipe

    @property
    def modality_lengths(self) -> list[int]:
        """Words per conversation, negative for text-only samples (the trainer's modality grouping)."""
        return self.modality_lengths_for(0)

    def build(self, record: dict, index: int = -1) -> dict:
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise SampleError("malformed record", "expected an object with a 'conversations' list")
        paths = record_images(record)
        messages = record_messages(record, len(paths))
        if self.suffix:
            if not paths:
                raise SampleError("no image", "the processor takes an image with every prompt")
            prompt, answer = prompt_and_answer(messages)
            return {"id": record.get("id", index), "index": index, "prompt": prompt, "answer": answer,
                    "images": [self.open_image(p) for p in paths]}
        tokenizer = self.processor.tokenizer
        rendered = render_chat(self.render, messages, tokenizer.eos_token)
        enc = encode_text(tokenizer, rendered.text, rendered.content, add_special_tokens(tokenizer, rendered.text))
        labels = supervised_labels(enc.ids, enc.offsets, rendered.supervised)
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError("no answer", "no assistant text to learn from")
        typed = typed_special_tokens(tokenizer, rendered.text, rendered.content)
        expands = image_token_strings(self.processor) & {tokenizer.convert_ids_to_tokens(i) for i in typed}
        if expands:  # the processor would take it for an image's place and count one image too many
            raise SampleError("special token text in content", f"{sorted(expands)[0]} typed in a message")
        return {"id": record.get("id", index), "index": index, "text": rendered.text,
                "images": [self.open_image(p) for p in paths], "ids": enc.ids, "labels": labels, "typed": typed}

    def open_image(self, source) -> Image.Image:
        return open_image_source(source, self.config.image_folder)


def image_rows_first(images: Sequence[Sequence]) -> list[int]:
    """A row order for one processor call: rows with images first, otherwise as given. MllamaImageProcessor reads
    the first row's first image, so a batch whose first row has none raises IndexError (transformers 5.x)."""
    return sorted(range(len(images)), key=lambda row: not images[row])


def processor_batch(processor, texts: Sequence[str], images: Sequence[Sequence], **kwargs):
    """`processor(text=texts, images=images)` for rows ordered by `image_rows_first`, images nested one list per row
    (what every family's processor takes when some rows have none), None when no row has one. MllamaImageProcessor
    returns aspect_ratio_ids and aspect_ratio_mask for the rows with images only (transformers 5.x), so the rows
    after them get what it gives an image slot without an image: id 0 and a mask on the first tile."""
    has = [bool(row) for row in images]
    assert has == sorted(has, reverse=True), "rows with images must come first"
    batch = processor(text=list(texts), images=[list(row) for row in images] if any(has) else None, padding=True,
                      return_tensors="pt", **kwargs)
    rows = len(texts)
    for key, fill_first_tile in (("aspect_ratio_ids", False), ("aspect_ratio_mask", True)):
        value = batch.get(key)
        if value is not None and value.shape[0] < rows:
            pad = torch.zeros((rows - value.shape[0], *value.shape[1:]), dtype=value.dtype)
            if fill_first_tile:
                pad[..., 0] = 1
            batch[key] = torch.cat([value, pad])
    return batch


class ChatCollator:
    """Micro-batches through the processor (see the module docstring). Rows too long after expansion, or whose
    labels do not align, are dropped and counted under "skipped"; a batch without images gets the blank row.
    Rows with images come first (`image_rows_first`), the blank row before the samples."""

    def __init__(self, processor, max_length: int = 2048):
        self.processor = processor
        self.max_length = max_length
        blank = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "image"}]}]
        self.blank_text = None if builds_own_labels(processor) else processor.apply_chat_template(
            blank, tokenize=False, add_generation_prompt=False)
        self.blank_image = Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), (127, 127, 127))

    def encode(self, samples: Sequence[dict], blank: bool):
        texts = ([self.blank_text] if blank else []) + [s["text"] for s in samples]
        images = ([[self.blank_image]] if blank else []) + [s["images"] for s in samples]
        return processor_batch(self.processor, texts, images,
                               add_special_tokens=add_special_tokens(self.processor.tokenizer, texts[0]))

    def __call__(self, samples: Sequence[dict]) -> dict:
        skipped = [s["skip"] for s in samples if "skip" in s]
        samples = [s for s in samples if "skip" not in s]
        if builds_own_labels(self.processor):
            return self.with_suffixes(samples, skipped)
        samples = [samples[i] for i in image_rows_first([s["images"] for s in samples])]
        while True:
            blank = not any(s["images"] for s in samples)
            first = int(blank)  # the samples' first row
            batch = self.encode(samples, blank)
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            rows, bad = {}, {}
            for k, s in enumerate(samples):
                expanded = ids[first + k][mask[first + k]].tolist()
                try:
                    rows[first + k] = merge_expanded(s["ids"], s["labels"], expanded, s.get("typed", frozenset()))
                except SampleError as e:
                    bad[k] = e.reason
                    continue
                if len(rows[first + k][0]) > self.max_length:
                    bad[k] = "too long"
            if not bad:
                break
            for k, reason in bad.items():
                log.warning("skipped sample %s (index %s): %s", samples[k]["id"], samples[k]["index"], reason)
            skipped += list(bad.values())
            samples = [s for k, s in enumerate(samples) if k not in bad]
        batch = self.with_rows(dict(batch), rows)
        tokens = int(batch["attention_mask"][first:].sum())  # the samples' own tokens, not the blank row's
        return {"inputs": batch, "ids": [s["id"] for s in samples], "skipped": skipped, "empty": not samples,
                "tokens": tokens}

    def with_suffixes(self, samples: list, skipped: list) -> dict:
        """A micro-batch for a processor that labels the answers itself (every sample has an image; with every
        sample skipped, a blank row without labels stands in)."""
        image = getattr(self.processor, "image_token", "<image>")
        while True:
            rows = samples or [{"prompt": "image", "answer": "image", "images": [self.blank_image]}]
            batch = self.processor(text=[image * len(s["images"]) + s["prompt"] for s in rows],
                                   images=[s["images"] for s in rows], suffix=[s["answer"] for s in rows],
                                   padding=True, return_tensors="pt")
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            bad = [k for k, n in enumerate(lengths) if samples and n > self.max_length]
            if not bad:
                break
            for k in bad:
                log.warning("skipped sample %s (index %s): too long", samples[k]["id"], samples[k]["index"])
            skipped += ["too long"] * len(bad)
            samples = [s for k, s in enumerate(samples) if k not in bad]
        batch = dict(batch)
        if not samples:
            batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        return {"inputs": batch, "ids": [s["id"] for s in samples], "skipped": skipped, "empty": not samples,
                "tokens": int(batch["attention_mask"].sum()) if samples else 0}

    def with_rows(self, batch: dict, rows: dict) -> dict:
        """The processor's batch with labels, and with the rows `merge_expanded` changed (typed special-token text
        kept as text) in place of the processor's: every per-token input (an integer tensor whose first two
        dimensions are the ids') follows the row, and the rows are padded again as the tokenizer pads."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        real = {row: mask[row].nonzero().flatten() for row in range(ids.shape[0])}
        if all(ids[row][real[row]].tolist() == merged[0] for row, merged in rows.items()):
            labels = torch.full_like(ids, IGNORE_INDEX)
            for row, (_, row_labels, _) in rows.items():
                labels[row, real[row]] = torch.tensor(row_labels, dtype=labels.dtype)
            return {**batch, "labels": labels}
        per_token = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()
                     and v.dim() >= 2 and v.shape[:2] == ids.shape]
        length = max(len(rows[row][0]) if row in rows else len(real[row]) for row in real)
        left = getattr(self.processor.tokenizer, "padding_side", "right") == "left"
        pad_id = self.processor.tokenizer.pad_token_id or 0
        out = {k: torch.zeros((ids.shape[0], length, *batch[k].shape[2:]), dtype=batch[k].dtype) for k in per_token}
        out["input_ids"].fill_(pad_id)
        out["labels"] = torch.full((ids.shape[0], length), IGNORE_INDEX, dtype=ids.dtype)
        for row, positions in real.items():
            row_ids, row_labels, source = rows.get(row, (ids[row][positions].tolist(), None, range(len(positions))))
            n = len(row_ids)
            at = slice(length - n, length) if left else slice(0, n)
            taken = positions[torch.tensor(list(source), dtype=torch.long)]
            for k in per_token:
                out[k][row, at] = batch[k][row, taken]
            out["input_ids"][row, at] = torch.tensor(row_ids, dtype=ids.dtype)
            if row_labels is not None:
                out["labels"][row, at] = torch.tensor(row_labels, dtype=ids.dtype)
        return {**batch, **out}
