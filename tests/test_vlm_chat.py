"""data/vlm_chat.py on the real checkpoints' chat templates (tests/vlm_families.py renders what they render): which
characters each family learns, what it says at start-up, the blank row of image-less micro-batches, and every
sample that must be a counted skip."""

import datetime
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoConfig

from data.llava import IGNORE_INDEX, SampleError
from data.vlm_chat import (ChatCollator, ChatDataConfig, ChatDataset, align_labels, chat_renderer, render_chat,
                           supervised_labels, system_as_the_template_takes_it)
from vlm_families import TEMPLATE_FAMILIES, build_family
from vlm_template_renderings import MISTRAL3_DATE, RENDERED
import subprocesses

ROOT = Path(__file__).resolve().parents[1]

TEXTS = ["What colour is the square?", "It is red.", "And the circle?", "It is blue, 12 pixels wide."] * 4
RECORDS = [
    {"id": "two-turns", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "It is blue, 12 pixels wide."}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "It is blue."}]},
]
# What each family learns of RECORDS[0], as runs of consecutive learned characters of the rendered text: each reply
# and the end marker its template writes after it; a space before the reply where the generation prompt stops
# short of it (llava-1.5's "ASSISTANT:", mistral's "[/INST]", Idefics3's "Assistant:"); never the separator before
# the next turn, nor a token that runs into it.
EOS_AFTER = {"llava": "</s>", "llava_next": "</s>"}  # no end marker in the template: the EOS is written and learned
LEARNED = {
    "llava": " {}</s>", "llava_next": " {}</s>", "llava_next_mistral": " {}</s>",
    "llava_next_mistral_bs": " {}<\\s>", "llava_onevision": "{}<|im_end|>", "qwen2_vl": "{}<|im_end|>",
    "idefics3": " {}<end_of_utterance>", "smolvlm": " {}<end_of_utterance>", "gemma3": "{}<end_of_turn>",
    "mllama": "{}<|eot_id|>", "mistral3": "{}</s>", "pixtral": "{}</s>",
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("families")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (30, 40), (30, 200, 30)).save(root / "b.png")
    return root, {f: AutoProcessor.from_pretrained(build_family(f, root / f, TEXTS)) for f in TEMPLATE_FAMILIES}


def dataset(root, processor, records=RECORDS, **kw):
    return ChatDataset(ChatDataConfig(data_path="", image_folder=str(root), **kw), processor, records=records)


def learned_runs(tokenizer, sample: dict) -> list[str]:
    """The learned tokens of a sample as the characters they cover, one string per run of consecutive tokens."""
    enc = tokenizer(sample["text"], return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    shift = len(sample["ids"]) - len(offsets)  # a BOS the tokenizer added
    runs, last = [], None
    for i, label in enumerate(sample["labels"]):
        if label == IGNORE_INDEX or i < shift:
            continue
        s, e = offsets[i - shift]
        if last == i - 1:
            runs[-1] += sample["text"][s:e]
        else:
            runs.append(sample["text"][s:e])
        last = i
    return runs


def user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


CONVERSATIONS = {
    "multi-turn": [user(None, "What colour is the square?"), assistant("It is red."), user("And the circle?"),
                   assistant("It is blue.")],
    "multi-image": [user(None, None, "Which one is red?"), assistant("The first."), user("And the other?"),
                    assistant("It is green.")],
    "text-only": [user("What colour is the square?"), assistant("It is red."), user("And the circle?"),
                  assistant("It is blue.")],
}
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]}
SYSTEM_CONVERSATIONS = {"system": [SYSTEM] + CONVERSATIONS["multi-turn"],
                        "system text-only": [SYSTEM] + CONVERSATIONS["text-only"][:2]}
CONVERSATIONS.update(SYSTEM_CONVERSATIONS)


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_our_templates_render_what_the_real_ones_render(families, family):
    """Byte for byte, quirks included (OneVision's space after the role, llava-1.5's space after every message and
    no end marker, mistral's <\\s>, Qwen's default system turn, Idefics3's "User:<image>", Gemma's trimmed texts,
    Mllama's dated system turn in conversations without images): the labels these tests check are those of the
    real checkpoints (tests/vlm_template_renderings.py holds what the real templates render)."""
    root, processors = families
    processor = processors[family]

    def apply(messages, prompt):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                             date_string="26 Jul 2024")
        return text.replace(f"The current date is {datetime.date.today().isoformat()}.",  # Mistral 3's default system
                            f"The current date is {MISTRAL3_DATE}.")
    for (name, prompt), expected in RENDERED[family].items():
        messages = CONVERSATIONS[name]
        messages = messages[:1 + (name in SYSTEM_CONVERSATIONS)] if prompt else messages
        # a system turn in the form the recipe gives the template (a string for Llama 3.2 Vision)
        assert apply(system_as_the_template_takes_it(apply, messages), prompt) == expected, (name, prompt)
    if family == "mllama":  # without date_string, today's date, as the real template writes it
        text = processor.apply_chat_template(CONVERSATIONS["text-only"], tokenize=False)
        assert f"Today Date: {datetime.date.today().strftime('%d %b %Y')}\n\n" in text


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_each_family_learns_its_replies_and_end_markers_only(families, family):
    root, processors = families
    processor = processors[family]
    data = dataset(root, processor)
    first, second = data[0], data[1]
    assert "skip" not in first and "skip" not in second, (first, second)
    tok = processor.tokenizer
    assert learned_runs(tok, first) == [LEARNED[family].format(a) for a in ("It is red.", "It is blue, 12 pixels wide.")]
    assert learned_runs(tok, second) == [LEARNED[family].format("It is blue.")]
    if family in EOS_AFTER:  # written after each reply, as LLaVA's "{answer}</s>"
        assert "It is red.</s> USER: And the circle?" in first["text"]

    batch = ChatCollator(processor)([first, second])
    inputs = batch["inputs"]
    for row in range(2):
        labels, ids = inputs["labels"][row], inputs["input_ids"][row]
        assert (labels != IGNORE_INDEX).sum() == sum(label != IGNORE_INDEX for label in (first, second)[row]["labels"])
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])  # labels are the tokens
        real = ids[inputs["attention_mask"][row].bool()]
        bos = tok.bos_token_id
        assert bos is None or (real == bos).sum() <= 1  # a template's BOS and the tokenizer's: not two
    # the image's tokens are in the ids but never labelled
    config = AutoConfig.from_pretrained(root / family)
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    image = inputs["input_ids"] == image_token
    assert image[0].sum() >= 1 and (inputs["labels"][image] == IGNORE_INDEX).all()


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_what_the_template_makes_the_recipe_do_is_said_once_at_start_up(families, family):
    """llava-1.5-hf writes no end marker (the EOS is learned instead); a llava-v1.6-mistral-hf revision ends answers
    with the text <\\s>, which no tokenizer knows as a token: said, naming it."""
    root, processors = families
    notes = dataset(root, processors[family]).notes
    if family in EOS_AFTER:
        assert len(notes) == 1 and "no end-of-turn marker" in notes[0] and "'</s>'" in notes[0]
    elif family == "llava_next_mistral_bs":
        assert len(notes) == 1 and "<\\\\s>" in notes[0] and "not a special token" in notes[0]
    else:
        assert notes == []


SYSTEM_RECORD = {"id": "system", "images": ["a.png"], "messages": [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
    {"role": "assistant", "content": "It is red."}, {"role": "user", "content": "And the circle?"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}]}


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_a_system_turn_is_written_as_the_real_template_writes_it_and_never_learned(families, family):
    """A `messages` record with a system turn: the text is what the real template renders for it
    (tests/vlm_template_renderings.py; Llama 3.2 Vision's template takes it as a string, the others as content items),
    the replies and their end markers are learned as without it, the system text never."""
    root, processors = families
    processor = processors[family]
    sample = dataset(root, processor, [SYSTEM_RECORD])[0]
    if family == "pixtral":  # its template writes a system message into the last user turn only: never here
        assert sample["skip"] == "system turn not written"
        return
    assert "skip" not in sample, sample
    text = sample["text"].replace(datetime.date.today().strftime("%d %b %Y"), "26 Jul 2024")  # Mllama's date
    eos = EOS_AFTER.get(family, "")  # written after each reply where the template writes no marker
    assert text == RENDERED[family][("system", False)].replace("It is red. ", f"It is red.{eos} ").replace(
        "It is blue. ", f"It is blue.{eos} ")
    assert learned_runs(processor.tokenizer, sample) == [LEARNED[family].format(a) for a in ("It is red.",
                                                                                          "It is blue.")]
    batch = ChatCollator(processor)([sample])
    assert not batch["skipped"] and int((batch["inputs"]["labels"] != IGNORE_INDEX).sum()) == sum(
        label != IGNORE_INDEX for label in sample["labels"])


def test_a_system_turn_the_template_cannot_take_is_a_counted_skip_with_its_reason(families, paligemma, caplog):
    root, processors = families
    conversation = RECORDS[0]["conversations"]
    system = {"from": "system", "value": "Be brief."}
    records = [{"id": "late", "image": "a.png", "conversations": [*conversation[:2], system, *conversation[2:]]},
               {"id": "two", "image": "a.png", "conversations": [system, system, *conversation]},
               {"id": "image", "image": "a.png", "conversations": [{**system, "value": "<image>\nBe brief."},
                                                                   {**conversation[0], "value": "What colour?"},
                                                                   conversation[1]]},
               {"id": "not-text", "conversations": [{**system, "value": 3}, *RECORDS[1]["conversations"]]},
               {**MULTI_IMAGE, "id": "multi-image", "conversations": [system, *MULTI_IMAGE["conversations"]]}]
    processor = processors["qwen2_vl"]
    data = dataset(root, processor, records)
    assert [data[i].get("skip") for i in range(len(records))] == [
        "system turn not first", "system turn not first", "image in the system turn", "malformed record", None]
    assert data[4]["text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    # pixtral-12b's template writes the system message into the last user turn only, so never in a conversation that
    # ends with an answer: said, not trained without it
    sample = dataset(root, processors["pixtral"], [{"id": "pixtral", "conversations": [
        system, *RECORDS[1]["conversations"]]}, RECORDS[1]])
    assert sample[0]["skip"] == "system turn not written" and "skip" not in sample[1]
    # Llama 3.2 Vision's earlier revision refuses a system message with images: a skip that carries its message
    processor = processors["mllama"]
    original = processor.chat_template
    processor.chat_template = ("{% if messages[0].role == 'system' %}{% for m in messages if m.content is not string %}"
                               "{% for c in m.content if c.type == 'image' %}{{ raise_exception('Prompting with "
                               "images is incompatible with system messages.') }}{% endfor %}{% endfor %}{% endif %}"
                               + original)
    try:
        refused = dataset(root, processor, [{"id": "refused", "image": "a.png", "conversations": [
            system, *conversation[:2]]}])
        with caplog.at_level("WARNING"):
            assert refused[0]["skip"] == "template error"
        assert "Prompting with images is incompatible with system messages." in caplog.text
    finally:
        processor.chat_template = original
    root, processor = paligemma  # a prompt and its answer: no system text
    one = {"id": "one", "image": "a.png", "conversations": [system, {"from": "human", "value": "Colour?"},
                                                            {"from": "gpt", "value": "Red."}]}
    assert dataset(root, processor, [one])[0]["skip"] == "system turn"


def test_a_token_that_runs_into_the_next_turn_is_not_learned():
    # characters 0-4 learned: "ab" and "cd" inside, "de" runs past the end, "xa" starts before and runs into it
    assert supervised_labels([1, 2, 3], [(0, 2), (2, 4), (4, 6)], [(0, 5)]) == [1, 2, -100]
    assert supervised_labels([7, 8], [(0, 3), (3, 5)], [(2, 5)]) == [7, 8]
    assert supervised_labels([9], [(0, 0)], [(0, 5)]) == [-100]  # an added BOS covers no character


def test_a_template_that_changes_an_earlier_answer_is_a_counted_skip(families):
    root, processors = families
    processor = processors["qwen2_vl"]
    original = processor.chat_template
    # a reasoning template: earlier answers lose everything up to "</think>", so their text is not what was given
    processor.chat_template = ("{% for m in messages %}{% set last = loop.last %}"
                               "{{ '<|im_start|>' ~ m.role ~ '\\n' }}{% for c in m.content if c.type == 'text' %}"
                               "{{ c.text.split('</think>')[-1] if m.role == 'assistant' and not last "
                               "else c.text }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}")
    record = {"id": "think", "conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "<think>hm</think>A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    try:
        assert dataset(root, processor, [record])[0]["skip"] == "template changes message text"
    finally:
        processor.chat_template = original


def test_render_chat_needs_no_prefix_stable_generation_prompt():
    """A template that numbers turns from the end renders every prefix differently: the labels do not depend on it."""
    def apply(messages, add_generation_prompt):
        text = "".join(f"{len(messages) - i}{m['role']}:{m['content'][0]['text']}|" for i, m in enumerate(messages))
        return text + ("A:" if add_generation_prompt else "")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]}]
    rendered = render_chat(apply, messages, "</s>")
    assert rendered.text == "2user:Hi|1assistant:Yo|"
    assert [rendered.text[a:b] for a, b in rendered.supervised] == ["Yo|"]


def test_bad_samples_are_counted_skips(families, tmp_path):
    root, processors = families
    processor = processors["llava_next"]
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = [{"id": "no-image-file", "image": "missing.png", "conversations": RECORDS[0]["conversations"]},
           {"id": "broken", "image": "broken.png", "conversations": RECORDS[0]["conversations"]},
           {"id": "no-answer", "conversations": [{"from": "human", "value": "Hi"}]},
           {"id": "bad-role", "conversations": [{"from": "robot", "value": "Hi"}]},
           "not an object"]
    conversation = RECORDS[0]["conversations"]
    bad += [  # two placeholders in one turn for one image: LLaVA's reader merges them into one
            {"id": "two-placeholders", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhat colour?"}, conversation[1]]},
            # an empty answer would teach the end marker alone
            {"id": "empty-answer", "conversations": [conversation[2], {"from": "gpt", "value": " "}]},
            {"id": "no-image-for-placeholder", "conversations": conversation}]
    data = dataset(root, processor, bad)
    assert [data[i]["skip"] for i in range(len(bad))] == [
        "missing image", "unreadable image", "malformed record", "malformed record", "malformed record",
        "placeholders and images differ", "empty answer", "placeholders and images differ"]
    # too long after the image is expanded: dropped by the collator, counted, the rest of the batch kept
    short = dataset(root, processor, max_length=40)
    batch = ChatCollator(processor, max_length=40)([short[0], short[1]])
    assert batch["skipped"] == ["too long"] and batch["ids"] == ["text-only"]
    everything_bad = ChatCollator(processor)([data[0], data[2]])
    assert everything_bad["empty"] and everything_bad["skipped"] == ["missing image", "malformed record"]


MULTI_IMAGE = {"id": "two-images", "image": ["a.png", "b.png"], "conversations": [
    {"from": "human", "value": "<image>\n<image>\nWhich one is red?"}, {"from": "gpt", "value": "The first."},
    {"from": "human", "value": "And the other?"}, {"from": "gpt", "value": "It is green."}]}
SHAPES = {"text-only first": ["text-only", "two-turns"], "image first": ["two-turns", "text-only"],
          "text-only alone": ["text-only"], "multi-image": ["two-images", "text-only", "two-turns"]}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_every_family_takes_every_micro_batch_shape(families, family, shape):
    """Rows without images before, after and without rows with images, and rows with several images: the
    processor batches them (Mllama's raised IndexError when the first row had no image, and gave one row of aspect
    ratios for two rows when a later one had none) and the model's forward takes the batch."""
    from transformers import AutoModelForImageTextToText

    root, processors = families
    processor = processors[family]
    data = dataset(root, processor, RECORDS + [MULTI_IMAGE])
    by_id = {data[i]["id"]: data[i] for i in range(len(data))}
    samples = [by_id[i] for i in SHAPES[shape]]
    assert not [s for s in samples if "skip" in s]
    batch = ChatCollator(processor)(samples)
    inputs = batch["inputs"]
    assert sorted(batch["ids"]) == sorted(SHAPES[shape]) and not batch["skipped"]
    blank = shape == "text-only alone"
    assert inputs["input_ids"].shape[0] == len(samples) + blank
    assert (inputs["labels"][0] == IGNORE_INDEX).all() if blank else True  # the blank row comes first
    learned = sum(sum(label != IGNORE_INDEX for label in s["labels"]) for s in samples)
    assert int((inputs["labels"] != IGNORE_INDEX).sum()) == learned
    model = AutoModelForImageTextToText.from_pretrained(root / family).eval()
    with torch.no_grad():
        loss = model(**inputs).loss
    assert torch.isfinite(loss)


def test_several_images_keep_their_places_and_must_match_the_placeholders(families):
    root, processors = families
    processor = processors["qwen2_vl"]
    data = dataset(root, processor, [MULTI_IMAGE, {**MULTI_IMAGE, "id": "one-missing", "image": ["a.png"]},
                                     {**MULTI_IMAGE, "id": "three", "image": ["a.png", "b.png", "a.png"]}])
    sample = data[0]
    assert len(sample["images"]) == 2
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>" \
           "<|vision_end|>Which one is red?<|im_end|>" in sample["text"]
    assert data[1]["skip"] == data[2]["skip"] == "placeholders and images differ"


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "mllama"])
def test_a_micro_batch_without_images_gets_a_blank_image_row_without_labels(families, family):
    root, processors = families
    processor = processors[family]
    data = dataset(root, processor)
    batch = ChatCollator(processor)([data[1]])
    inputs = batch["inputs"]
    assert inputs["input_ids"].shape[0] == 2 and "pixel_values" in inputs  # the blank row + the sample
    assert (inputs["labels"][0] == IGNORE_INDEX).all() and (inputs["labels"][1] != IGNORE_INDEX).any()
    assert batch["tokens"] == int(inputs["attention_mask"][1].sum())  # the blank row is not counted
    with_image = ChatCollator(processor)([data[1], data[0]])
    assert with_image["inputs"]["input_ids"].shape[0] == 2  # an image in the batch: no extra row
    assert with_image["ids"] == ["two-turns", "text-only"]  # rows with images first


@pytest.mark.parametrize("family", ["mllama", "llava_onevision"])
def test_eval_generate_answers_text_only_and_image_questions_in_one_batch_in_order(families, family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from eval.generate import processor_answer_batches

    root, processors = families
    processor = processors[family]
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(root / family).eval()
    questions = [{"question_id": "t", "text": "And the circle?"}, {"question_id": "i", "image": "a.png",
                                                                   "text": "What colour is the square?"},
                 {"question_id": "t2", "text": "What colour is the square?"}]
    answers = [a for batch in processor_answer_batches(model, processor, questions, root, batch_size=3,
                                                       max_new_tokens=2, progress=False) for a in batch]
    assert [a["question_id"] for a in answers] == ["t", "i", "t2"]
    alone = [a for q in questions for batch in processor_answer_batches(model, processor, [q], root, batch_size=1,
                                                                        max_new_tokens=2, progress=False)
             for a in batch]
    assert [a["text"] for a in answers] == [a["text"] for a in alone]  # each answer is its own question's


TYPED = {"qwen2_vl": "<|im_end|>", "llava": "</s>", "llava_next_mistral": "</s>", "gemma3": "<end_of_turn>",
         "mllama": "<|eot_id|>", "idefics3": "<end_of_utterance>", "llava_onevision": "<|im_start|>",
         "mistral3": "[/INST]"}


@pytest.mark.parametrize("family", sorted(TYPED))
def test_special_token_text_typed_in_a_message_stays_text(families, family):
    """As in the LLaVA recipe: a "<|im_end|>" typed in a question or an answer is text, not the model's marker (the
    processor tokenizes the text again and makes a special token of it: our text tokens stand in its place)."""
    from transformers import AutoModelForImageTextToText

    root, processors = families
    processor, typed = processors[family], TYPED[family]
    tok = processor.tokenizer
    record = {"id": "typed", "image": "a.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhat does {typed} mean?"},
        {"from": "gpt", "value": f"It ends a turn: {typed} is a marker."}]}
    data = dataset(root, processor, [record, RECORDS[1]])
    sample = data[0]
    special = tok.convert_tokens_to_ids(typed)
    written = sample["text"].count(typed) - 2  # by the template (or the EOS written after an answer)
    assert sample["ids"].count(special) == written
    assert any(f"It ends a turn: {typed} is a marker." in run for run in learned_runs(tok, sample))
    batch = ChatCollator(processor)([data[1], sample])  # the typed row after a text-only one: a changed row padded
    inputs = batch["inputs"]
    assert batch["ids"] == ["typed", "text-only"] and not batch["skipped"]
    row = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    assert int((row == special).sum()) == written
    labels = inputs["labels"][0]
    assert labels[labels != IGNORE_INDEX].tolist() == [t for t in sample["labels"] if t != IGNORE_INDEX]
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask"):
        assert key not in inputs or inputs[key].shape[:2] == inputs["input_ids"].shape  # re-padded with the row
    with torch.no_grad():
        assert torch.isfinite(AutoModelForImageTextToText.from_pretrained(root / family).eval()(**inputs).loss)


def test_an_image_token_typed_in_a_message_is_a_counted_skip(families):
    root, processors = families
    record = {"id": "typed-image", "conversations": [
        {"from": "human", "value": "What is <|image_pad|>?"}, {"from": "gpt", "value": "A placeholder."}]}
    # the processor would take it for an image's place and find no image for it
    assert dataset(root, processors["qwen2_vl"], [record])[0]["skip"] == "special token text in content"


def test_align_labels_needs_every_label_found():
    assert align_labels([1, 9, 5, 6], [-100, -100, 5, 6], [1, 7, 7, 7, 5, 6]) == [-100] * 4 + [5, 6]
    with pytest.raises(SampleError, match="1 of 2 supervised tokens"):
        align_labels([1, 9, 5, 6], [-100, -100, 5, 6], [1, 7, 7, 5, 8])


def test_the_renderer_is_the_processors_template(families):
    root, processors = families
    processor = processors["qwen2_vl"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert chat_renderer(processor)(messages, True) == processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("paligemma")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (30, 40), (30, 200, 30)).save(root / "b.png")
    return root, AutoProcessor.from_pretrained(build_family("paligemma", root / "model", TEXTS))


def test_a_processor_that_labels_answers_itself_is_used_that_way(paligemma):
    """PaliGemma has no chat template: its processor takes the prompt and the answer (`suffix`), writes the image
    tokens, BOS, the newline and EOS, and labels the answer and the EOS. A record is one question and one answer
    with an image; anything else is a counted skip."""
    from transformers import AutoModelForImageTextToText

    root, processor = paligemma
    one = {"id": "one", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "It is red."}]}
    two = {"id": "two", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich one is red?"}, {"from": "gpt", "value": "The first."}]}
    bad = [{**RECORDS[0], "id": "multi-turn"}, {**RECORDS[1], "id": "no-image"},
           {**one, "id": "empty", "conversations": [one["conversations"][0], {"from": "gpt", "value": ""}]}]
    data = dataset(root, processor, [one, two, *bad])
    assert data.notes == [] and [data[i]["skip"] for i in (2, 3, 4)] == [
        "not one question and one answer", "no image", "empty answer"]
    batch = ChatCollator(processor)([data[0], data[1], data[2]])
    inputs, tok = batch["inputs"], processor.tokenizer
    assert batch["ids"] == ["one", "two"] and batch["skipped"] == ["not one question and one answer"]
    for row, (prompt, answer) in enumerate((("What colour is the square?", "It is red."),
                                            ("Which one is red?", "The first."))):
        labels = inputs["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == tok(answer, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id]
        text = tok.decode(inputs["input_ids"][row][inputs["attention_mask"][row].bool()])
        assert text.endswith(f"<bos>{prompt}\n{answer}<eos>") and text.count("<image>") == 16 * (row + 1)
    with torch.no_grad():
        assert torch.isfinite(AutoModelForImageTextToText.from_pretrained(root / "model").eval()(**inputs).loss)
    everything_skipped = ChatCollator(processor)([data[2]])
    assert everything_skipped["empty"] and (everything_skipped["inputs"]["labels"] == IGNORE_INDEX).all()


def test_paligemma_trains_and_answers_without_a_chat_template(paligemma, tmp_path):
    from eval.cli import main as eval_main

    root, _ = paligemma
    records = [{"id": str(i), "image": "a.png" if i % 2 else "b.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red." if i % 2 else "Green."}]}
        for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    config = {"model": {"path": str(root / "model"), "dtype": "fp32"},
              "dora": {"rules": [{"match": r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj", "rank": 2}],
                       "train_fully": [r"model\.multi_modal_projector\..*"]},
              "data": {"data_path": str(tmp_path / "data.json"), "image_folder": str(root)},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "micro_batch_size": 2,
                        "global_batch_size": 2, "optimizer": "sgd", "lr": 0.1, "warmup_ratio": 0.0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    done = subprocesses.run([sys.executable, str(ROOT / "recipes/vlm/train.py"), str(tmp_path / "c.yaml")],
                            what="PaliGemma training", timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0 and "skipped samples: none" in done.stdout, subprocesses.output(done)
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"question_id": i, "image": "a.png", "text": "Colour?"})
                                                for i in range(3)))
    assert eval_main(["generate", "--template", "processor", "--model", str(root / "model"), "--adapter",
                      str(tmp_path / "run" / "adapter"), "--questions", str(tmp_path / "q.jsonl"), "--image-folder",
                      str(root), "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "2"]) == 0
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3
