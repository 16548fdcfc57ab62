"""data/vlm_chat.py: which tokens carry labels after each family's processor has expanded the image, the blank
row of image-less micro-batches, and every sample that must be a counted skip."""

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from data.llava import IGNORE_INDEX, SampleError
from data.vlm_chat import ChatCollator, ChatDataConfig, ChatDataset, align_labels
from vlm_families import FAMILIES, build_family

TEXTS = ["What colour is the square?", "It is red.", "And the circle?", "It is blue, 12 pixels wide."] * 4
RECORDS = [
    {"id": "two-turns", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "It is blue, 12 pixels wide."}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "It is blue."}]},
]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("families")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "a.png")
    return root, {f: AutoProcessor.from_pretrained(build_family(f, root / f, TEXTS)) for f in FAMILIES}


def dataset(root, processor, records=RECORDS, **kw):
    return ChatDataset(ChatDataConfig(data_path="", image_folder=str(root), **kw), processor, records=records)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_answers_and_their_end_markers_carry_labels(families, family):
    root, processors = families
    processor = processors[family]
    data = dataset(root, processor)
    batch = ChatCollator(processor)([data[0], data[1]])
    inputs = batch["inputs"]
    tok = processor.tokenizer
    for row, answers in ((0, ["It is red.", "It is blue, 12 pixels wide."]), (1, ["It is blue."])):
        labels = inputs["labels"][row]
        ids = inputs["input_ids"][row]
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])  # labels are the tokens
        learned = tok.decode(labels[labels != IGNORE_INDEX])
        real = ids[inputs["attention_mask"][row].bool()]
        assert (real == tok.bos_token_id).sum() == (1 if family == "gemma3" else 0)  # a template's BOS, not two
        assert learned == "".join(f"{a}<|end|>\n" for a in answers)  # answers + end of turn, nothing else
    # the image's expanded tokens are in the ids (several per image) but never labelled
    config = AutoConfig.from_pretrained(root / family)
    image = inputs["input_ids"][0] == (getattr(config, "image_token_id", None) or config.image_token_index)
    assert image.sum() >= 4 and (inputs["labels"][0][image] == IGNORE_INDEX).all()
    assert batch["ids"] == ["two-turns", "text-only"] and not batch["empty"]


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_a_micro_batch_without_images_gets_a_blank_image_row_without_labels(families, family):
    root, processors = families
    processor = processors[family]
    data = dataset(root, processor)
    batch = ChatCollator(processor)([data[1]])
    inputs = batch["inputs"]
    assert inputs["input_ids"].shape[0] == 2 and "pixel_values" in inputs  # the sample + the blank row
    assert (inputs["labels"][1] == IGNORE_INDEX).all() and (inputs["labels"][0] != IGNORE_INDEX).any()
    assert batch["tokens"] == int(inputs["attention_mask"][0].sum())  # the blank row is not counted
    with_image = ChatCollator(processor)([data[0], data[1]])
    assert with_image["inputs"]["input_ids"].shape[0] == 2  # an image in the batch: no extra row


def test_bad_samples_are_counted_skips(families, tmp_path):
    root, processors = families
    processor = processors["llava_next"]
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = [{"id": "no-image-file", "image": "missing.png", "conversations": RECORDS[0]["conversations"]},
           {"id": "broken", "image": "broken.png", "conversations": RECORDS[0]["conversations"]},
           {"id": "no-answer", "conversations": [{"from": "human", "value": "Hi"}]},
           {"id": "bad-role", "conversations": [{"from": "robot", "value": "Hi"}]},
           "not an object"]
    data = dataset(root, processor, bad)
    assert [data[i]["skip"] for i in range(len(bad))] == ["missing image", "unreadable image", "malformed record",
                                                          "malformed record", "malformed record"]
    # too long after the image is expanded: dropped by the collator, counted, the rest of the batch kept
    short = dataset(root, processor, max_length=40)
    batch = ChatCollator(processor, max_length=40)([short[0], short[1]])
    assert batch["skipped"] == ["too long"] and batch["ids"] == ["text-only"]
    everything_bad = ChatCollator(processor)([data[0], data[2]])
    assert everything_bad["empty"] and everything_bad["skipped"] == ["missing image", "malformed record"]


def test_a_template_that_renders_turns_differently_is_refused(families):
    root, processors = families
    processor = processors["idefics3"]
    original = processor.chat_template
    # a template that numbers the turns from the end: a prefix is rendered differently inside the whole
    processor.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string }}{{ m['role'] }}"
                               "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                               "{% endfor %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    try:
        assert dataset(root, processor, RECORDS[1:])[0]["skip"] == "template not prefix-stable"
    finally:
        processor.chat_template = original


def test_align_labels_needs_every_label_found():
    assert align_labels([1, 9, 5, 6], [-100, -100, 5, 6], [1, 7, 7, 7, 5, 6]) == [-100] * 4 + [5, 6]
    with pytest.raises(SampleError, match="1 of 2 supervised tokens"):
        align_labels([1, 9, 5, 6], [-100, -100, 5, 6], [1, 7, 7, 5, 8])
