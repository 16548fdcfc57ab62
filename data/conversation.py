"""LLaVA conversations -> one prompt string, with the character spans the loss supervises.

Templates:
- vicuna_v1 (LLaVA-1.5 instruction tuning, `--version v1`):
      "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
  supervised: every assistant answer and the "</s>" that ends it.
- plain (stage-1 pretraining): "<image>{caption}\\n", supervised: the caption and "\\n".
- chat: the tokenizer's own chat template; supervised: each assistant message and the end-of-turn marker right
  after it (the tokenizer's eos token unless told otherwise).

Labels are then derived from token offsets (see `data.llava`), so they always agree with how the tokenizer cut
the string: no per-round re-tokenisation and no "tokenization mismatch" that silently masks a sample.
Each rendering also records where the conversation's own text lies (`content`), so that a literal "</s>" typed
in a message can be told from the template's own end-of-turn token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(ValueError):
    """A record whose conversation cannot be rendered (no turns, unknown role, turns out of order)."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Rendered:
    text: str
    supervised: tuple[tuple[int, int], ...]  # character spans [start, end) whose tokens carry labels
    content: tuple[tuple[int, int], ...] = ()  # character spans of the messages' own text


def parse_turns(conversations: Sequence[dict], has_image: bool) -> list[Turn]:
    """LLaVA's {"from": "human"|"gpt", "value": ...} list -> turns; `<image>` moved to the front of its turn.

    As LLaVA does, the placeholder is removed wherever it is and re-inserted as "<image>\\n" at the start of the
    turn that held it; a sample with an image whose text has no placeholder gets one in the first user turn.
    """
    if not conversations:
        raise ConversationError("no conversation turns")
    turns = []
    placed = False
    for i, c in enumerate(conversations):
        if not isinstance(c, dict) or "from" not in c or "value" not in c:
            raise ConversationError(f"turn {i} is not an object with 'from' and 'value'")
        role = ROLES.get(c["from"])
        if role is None:
            raise ConversationError(f"turn {i} has unknown role {c['from']!r}")
        value = c["value"]
        if not isinstance(value, str):  # null or a number would otherwise train on the text "None"
            raise ConversationError(f"turn {i}: 'value' is {type(value).__name__}, not a string")
        if IMAGE_TOKEN in value:
            if not has_image:
                raise ConversationError(f"turn {i} has {IMAGE_TOKEN} but the record has no image")
            if placed:
                raise ConversationError(f"turn {i}: more than one {IMAGE_TOKEN} (one image per sample)")
            # as LLaVA: a turn that is only "<image>" becomes "<image>", not "<image>\n"
            value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
            placed = True
        turns.append(Turn(role, value))
    if has_image and not placed:
        first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
        if first_user is None:
            raise ConversationError("the record has an image but no user turn")
        turns[first_user] = Turn("user", IMAGE_TOKEN + "\n" + turns[first_user].text)
    if turns[0].role != "user":
        turns = turns[1:]  # LLaVA skips a leading assistant turn
    for i, t in enumerate(turns):
        if t.role != ("user" if i % 2 == 0 else "assistant"):
            raise ConversationError(f"turns must alternate user/assistant; turn {i} is {t.role}")
    if not any(t.role == "assistant" for t in turns):
        raise ConversationError("no assistant turn to learn from")
    return turns


def render_vicuna_v1(turns: Sequence[Turn], system: str = VICUNA_SYSTEM, eos: str = "</s>") -> Rendered:
    """Supervised: each answer from the space after "ASSISTANT:" through its "</s>". LLaVA labels every token
    after "ASSISTANT:", and sentencepiece gives an answer that starts with a digit, a byte-fallback character or
    a newline a bare "▁" token for that space: leaving it out would never teach the model to open such answers."""
    parts, spans, content = [system + " "], [], []
    pos = len(parts[0])
    for t in turns:
        head = "USER: " if t.role == "user" else "ASSISTANT: "
        piece = f"{head}{t.text} " if t.role == "user" else f"{head}{t.text}{eos}"
        content.append((pos + len(head), pos + len(head) + len(t.text)))
        if t.role == "assistant":
            spans.append((pos + len(head) - 1, pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    return Rendered("".join(parts), tuple(spans), tuple(content))


def render_plain(turns: Sequence[Turn]) -> Rendered:
    """Pretraining: the image and the caption (the first assistant turn), nothing else."""
    caption = next(t.text for t in turns if t.role == "assistant")
    text = IMAGE_TOKEN + caption + "\n"
    return Rendered(text, ((len(IMAGE_TOKEN), len(text)),), ((len(IMAGE_TOKEN), len(IMAGE_TOKEN) + len(caption)),))


def render_with_chat_template(turns: Sequence[Turn], apply_chat_template: Callable[[list[dict]], str],
                              end_of_turn: Optional[str]) -> Rendered:
    """Render with a tokenizer's chat template; each message is located in the output in order."""
    text = apply_chat_template([{"role": t.role, "content": t.text} for t in turns])
    spans, content, pos = [], [], 0
    for t in turns:
        start = text.find(t.text, pos)
        if start < 0:
            raise ConversationError("the chat template changed a message's text; cannot locate it")
        end = start + len(t.text)
        content.append((start, end))
        if t.role == "assistant":
            if end_of_turn and text.startswith(end_of_turn, end):
                end += len(end_of_turn)
            spans.append((start, end))
        pos = end
    return Rendered(text, tuple(spans), tuple(content))


TEMPLATES = ("vicuna_v1", "plain", "chat")


def render(turns: Sequence[Turn], template: str, *, eos: str = "</s>", apply_chat_template=None,
           end_of_turn: Optional[str] = None) -> Rendered:
    if template == "vicuna_v1":
        return render_vicuna_v1(turns, eos=eos)
    if template == "plain":
        return render_plain(turns)
    if template == "chat":
        if apply_chat_template is None:
            raise ValueError("the chat template needs the tokenizer's apply_chat_template")
        return render_with_chat_template(turns, apply_chat_template, end_of_turn)
    raise ValueError(f"unknown template {template!r}; templates: {TEMPLATES}")


def render_prompt(question: str, template: str, *, has_image: bool, apply_chat_template=None) -> Rendered:
    """The prompt a model answers at evaluation: one user turn and an open assistant turn (nothing supervised).
    The vicuna prompt ends at "ASSISTANT:", as LLaVA's: the answer's first token carries its own space."""
    text = question.replace(IMAGE_TOKEN, "").strip()
    if has_image:
        text = IMAGE_TOKEN + "\n" + text  # as LLaVA's model_vqa_loader
    if template == "vicuna_v1":
        head = f"{VICUNA_SYSTEM} USER: "
        return Rendered(f"{head}{text} ASSISTANT:", (), ((len(head), len(head) + len(text)),))
    if template == "plain":
        return Rendered(IMAGE_TOKEN if has_image else "", ())
    if template == "chat":
        rendered = apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        start = rendered.find(text)
        if start < 0:
            raise ConversationError("the chat template changed the question's text; cannot locate it")
        return Rendered(rendered, (), ((start, start + len(text)),))
    raise ValueError(f"unknown template {template!r}")

