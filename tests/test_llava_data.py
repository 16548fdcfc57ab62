"""LLaVA data: templates, label masks, image tokens, truncation, bad input, grouping."""
import json
from collections import Counter

import pytest

from data.conversation import (
    IMAGE_TOKEN,
    VICUNA_SYSTEM,
    ConversationError,
    Turn,
    parse_turns,
    render,
    render_vicuna_v1,
)
from data.llava import (
    IGNORE_INDEX,
    DataFormatError,
    LlavaCollator,
    LlavaDataConfig,
    LlavaDataset,
    load_records,
)
from data.sampling import RankSampler, modality_grouped_order

N_IMAGE = 36


@pytest.fixture(scope="module")
def parts(llava_assets):
    from transformers import AutoImageProcessor, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llava_assets["llm"])
    proc = AutoImageProcessor.from_pretrained(llava_assets["vision"])
    return tok, proc


def dataset(parts, records, images, **config):
    tok, proc = parts
    cfg = LlavaDataConfig(data_path="", image_folder=str(images), **config)
    return LlavaDataset(cfg, tok, proc, tok.convert_tokens_to_ids(IMAGE_TOKEN), N_IMAGE, records=records)


def supervised_text(tok, sample):
    ids = [t for t, lab in zip(sample["input_ids"].tolist(), sample["labels"].tolist()) if lab != IGNORE_INDEX]
    return tok.decode(ids)


# ------------------------------------------------------------------------------------------------ templates
def test_vicuna_v1_rendering_multi_turn():
    turns = parse_turns([{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
                         {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}], has_image=True)
    assert turns[0].text == "<image>\nWhat is it?"  # <image> moved to the front of its turn, as LLaVA does
    r = render_vicuna_v1(turns)
    assert r.text == (f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
                      "USER: Colour? ASSISTANT: Black.</s>")
    # from the space after "ASSISTANT:", which sentencepiece may cut as a token of its own (LLaVA labels it)
    assert [r.text[a:b] for a, b in r.supervised] == [" A cat.</s>", " Black.</s>"]
    assert [r.text[a:b] for a, b in r.content] == ["<image>\nWhat is it?", "A cat.", "Colour?", "Black."]


def test_plain_template_supervises_the_caption():
    r = render(parse_turns([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a dog"}], True), "plain")
    assert r.text == "<image>a dog\n" and [r.text[a:b] for a, b in r.supervised] == ["a dog\n"]


@pytest.mark.parametrize("conversations,has_image,message", [
    ([], False, "no conversation turns"),
    ([{"from": "robot", "value": "hi"}], False, "unknown role"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False, "alternate"),
    ([{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "b"}], False, "has no image"),
    ([{"from": "human", "value": "a"}], False, "no assistant turn"),
])
def test_conversation_errors(conversations, has_image, message):
    with pytest.raises(ConversationError, match=message):
        parse_turns(conversations, has_image)


def test_chat_template_spans(parts):
    tok, _ = parts
    turns = [Turn("user", "hi"), Turn("assistant", "hello")]
    r = render(turns, "chat", apply_chat_template=lambda m: tok.apply_chat_template(m, tokenize=False),
               end_of_turn="</s>")
    assert r.text == "USER: hi ASSISTANT: hello</s>" and [r.text[a:b] for a, b in r.supervised] == ["hello</s>"]


# ------------------------------------------------------------------------------------------------ labels
def test_labels_supervise_answers_and_end_tokens_only(parts, llava_assets):
    tok, _ = parts
    record = {"id": "x", "image": "train_00000.png", "conversations": [
        {"from": "human", "value": "What shape is shown?\n<image>"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "2"}]}
    sample = dataset(parts, [record], llava_assets["images"])[0]
    assert supervised_text(tok, sample) == "circle</s> 2</s>"
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    first = ids.index(image_id)
    assert ids[first:first + N_IMAGE] == [image_id] * N_IMAGE and ids.count(image_id) == N_IMAGE
    assert all(lab == IGNORE_INDEX for lab in labels[:first + N_IMAGE])  # BOS, system, question, image
    assert ids[0] == tok.bos_token_id and labels[-1] == tok.eos_token_id
    assert sample["pixel_values"].shape == (3, 48, 48)
    # the ids are LLaVA's: one tokenizer call on each side of the image (nothing re-tokenised per round)
    text = render_vicuna_v1(parse_turns(record["conversations"], True)).text
    before, after = text.split(IMAGE_TOKEN)
    assert ids[:first] == tok(before)["input_ids"]
    assert ids[first + N_IMAGE:] == tok(after, add_special_tokens=False)["input_ids"]


def test_text_only_sample_has_no_image(parts, llava_assets):
    tok, _ = parts
    record = {"id": "t", "conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]}
    sample = dataset(parts, [record], llava_assets["images"])[0]
    assert sample["pixel_values"] is None
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in sample["input_ids"].tolist()
    assert supervised_text(tok, sample) == "red</s>"


def test_truncation_never_cuts_image_tokens_and_counts_lost_answers(parts, llava_assets):
    record = {"id": "long", "image": "train_00000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color are the shapes?"}, {"from": "gpt", "value": "red"}]}
    full = dataset(parts, [record], llava_assets["images"])[0]
    n = len(full["input_ids"])
    ok = dataset(parts, [record], llava_assets["images"], model_max_length=n)[0]
    assert "skip" not in ok and len(ok["input_ids"]) == n
    answer_cut = dataset(parts, [record], llava_assets["images"], model_max_length=n - 3)[0]
    assert answer_cut["skip"] == "answer truncated"
    image_start = full["input_ids"].tolist().index(parts[0].convert_tokens_to_ids(IMAGE_TOKEN))
    image_cut = dataset(parts, [record], llava_assets["images"], model_max_length=image_start + 10)[0]
    assert image_cut["skip"] == "image truncated"


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_samples_are_counted_by_reason_and_nothing_else_is_lost(parts, llava_assets, tmp_path, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    import shutil
    shutil.copy(llava_assets["images"] / "train_00000.png", tmp_path / "good.png")
    ask = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "good", "image": "good.png", "conversations": ask},
        {"id": "missing", "image": "nowhere.png", "conversations": ask},
        {"id": "corrupt", "image": "corrupt.png", "conversations": ask},
        {"id": "no-conversations", "image": "good.png"},
        {"id": "bad-role", "conversations": [{"from": "alien", "value": "x"}]},
        "not even an object",
        ["nor", "this"],
        {"id": "image-not-a-path", "image": 7, "conversations": ask},
        {"id": "null-value", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
    ]
    ds = dataset(parts, records, tmp_path)
    assert len(ds.modality_lengths) == len(records)  # what the sampler reads at start-up, before any sample
    with caplog.at_level("WARNING"):
        batch = LlavaCollator(parts[0].pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["ids"] == ["good"] and batch["pixel_values"].shape[0] == 1
    assert Counter(batch["skipped"]) == {"missing image": 1, "unreadable image": 1, "malformed record": 6}
    assert "'image' is a int, not a path" in caplog.text  # only the first 5 of a reason are logged
    with pytest.raises(ConversationError, match="'value' is NoneType, not a string"):
        parse_turns(records[-1]["conversations"], False)
    assert "skipped sample missing (index 1): missing image" in caplog.text
    assert "skipped sample corrupt (index 2)" in caplog.text
    empty = LlavaCollator(0)([ds[1], ds[2]])
    assert empty["empty"] and len(empty["skipped"]) == 2


def test_a_missing_image_folder_fails_at_start_up(parts, tmp_path):
    records = [{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                             {"from": "gpt", "value": "A"}]}]
    with pytest.raises(DataFormatError, match=r"image folder '.*nowhere' not found \(1 records"):
        dataset(parts, records, tmp_path / "nowhere")
    text_only = [{"id": 2, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    assert len(dataset(parts, text_only, tmp_path / "nowhere")) == 1  # no image, no folder needed


def test_malformed_files_fail_at_load_naming_the_line(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"id": 1, "conversations": []}\n{"id": 2, "conversations": [\n')
    with pytest.raises(DataFormatError, match=r"data.jsonl:2: not valid JSON"):
        load_records(jsonl)
    js = tmp_path / "data.json"
    js.write_text('[{"id": 1},\n {"id": 2,,}]')
    with pytest.raises(DataFormatError, match=r"data.json:2: not valid JSON"):
        load_records(js)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps([{"id": 1}]))
    assert load_records(ok) == [{"id": 1}]


def test_collator_pads_and_masks(parts, llava_assets):
    records = json.loads(llava_assets["train"].read_text())[:3]
    ds = dataset(parts, records, llava_assets["images"])
    batch = LlavaCollator(parts[0].pad_token_id)([ds[0], ds[1], ds[2]])
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------------ grouping
def test_modality_grouping_keeps_modalities_apart():
    lengths = [10 + i for i in range(20)] + [-(5 + i) for i in range(12)]
    megabatches = modality_grouped_order(lengths, batch_size=4, world_size=2, seed=3)
    flat = [i for mb in megabatches for chunk in mb for i in chunk]
    assert sorted(flat) == list(range(32))  # every sample exactly once
    for mb in megabatches[:-1]:  # full megabatches hold one modality; the mixed remainder goes last
        members = [i for chunk in mb for i in chunk]
        assert len({lengths[i] > 0 for i in members}) == 1 and len(members) == 8
        assert all(len(chunk) == 4 for chunk in mb)


def test_rank_sampler_shares_cover_the_data_and_are_padded_to_whole_steps():
    lengths = [1] * 13
    shares = [list(RankSampler(lengths, batch_size=4, rank=r, world_size=2, seed=0)) for r in range(2)]
    assert all(len(s) == 8 for s in shares)
    assert set(shares[0]) | set(shares[1]) == set(range(13))
    first, again = RankSampler(lengths, 4, 0, 2, seed=0), RankSampler(lengths, 4, 0, 2, seed=0)
    first.set_epoch(1)
    again.set_epoch(1)
    assert list(first) == list(again) and list(first) != shares[0]  # reproducible, new order per epoch


def test_a_chat_template_that_changes_a_message_is_a_counted_skip(parts, llava_assets):
    tok, proc = parts

    class Trimming:  # a tokenizer whose chat template trims messages
        def __getattr__(self, name):
            return getattr(tok, name)

        def apply_chat_template(self, messages, tokenize=False):
            return "".join(f"{m['role']}: {m['content'].strip()}</s>" for m in messages)

    record = {"id": "trim", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red \n"}]}
    cfg = LlavaDataConfig(data_path="", template="chat")
    ds = LlavaDataset(cfg, Trimming(), proc, tok.convert_tokens_to_ids(IMAGE_TOKEN), N_IMAGE, records=[record])
    assert ds[0]["skip"] == "malformed record"
