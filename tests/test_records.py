"""Data through `datasets` (data/llava.py open_records, normalize_record, open_image_source): LLaVA's JSON and the
`messages` + `images` format from JSON lines, parquet with embedded images and save_to_disk folders give the
same samples to both recipes, memory-mapped, with the same counted skips; and the generic recipe trains from a
parquet set."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from data.llava import LlavaDataConfig, LlavaDataset, open_records
from data.vlm_chat import ChatDataConfig, ChatDataset
from vlm_families import build_family
import subprocesses

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["What colour is the square?", "It is red.", "And the circle?", "It is blue, 12 pixels wide."] * 4
RED, GREEN = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (30, 200, 30))
# LLaVA's records, and the same conversations in the messages format
LLAVA = [
    {"id": "one", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "It is blue, 12 pixels wide."}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "It is blue."}]},
    {"id": "two", "image": ["red.png", "green.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich one is red?"}, {"from": "gpt", "value": "The first."}]},
]


def messages_records(image):
    """LLAVA in the messages format, each image given by `image(name)`."""
    def text(t):
        return {"type": "text", "text": t}
    pic = {"type": "image"}
    return [
        {"id": "one", "images": [image("red.png")], "messages": [
            {"role": "user", "content": [pic, text("What colour is the square?")]},
            {"role": "assistant", "content": [text("It is red.")]},
            {"role": "user", "content": [text("And the circle?")]},
            {"role": "assistant", "content": [text("It is blue, 12 pixels wide.")]}]},
        {"id": "text", "images": [], "messages": [
            {"role": "user", "content": [text("And the circle?")]}, {"role": "assistant", "content": [text("It is blue.")]}]},
        {"id": "two", "images": [image("red.png"), image("green.png")], "messages": [
            {"role": "user", "content": [pic, pic, text("Which one is red?")]},
            {"role": "assistant", "content": [text("The first.")]}]},
    ]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same three records as a LLaVA JSON list with image files, JSON lines (messages, paths), parquet
    (messages, datasets.Image: embedded) and a save_to_disk folder (messages, images as bytes)."""
    import io

    import datasets

    root = tmp_path_factory.mktemp("sets")
    images = root / "images"
    images.mkdir()
    RED.save(images / "red.png")
    GREEN.save(images / "green.png")
    (root / "llava.json").write_text(json.dumps(LLAVA))
    (root / "messages.jsonl").write_text("\n".join(json.dumps(r) for r in messages_records(lambda name: name)))

    def png(name):
        buffer = io.BytesIO()
        Image.open(images / name).save(buffer, format="PNG")
        return buffer.getvalue()
    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.Sequence(datasets.Image()),
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]})
    embedded = messages_records(lambda name: {"bytes": png(name), "path": None})
    datasets.Dataset.from_list(embedded, features=features).to_parquet(str(root / "messages.parquet"))
    as_bytes = datasets.Features({**features, "images": datasets.Sequence(datasets.Value("binary"))})
    datasets.Dataset.from_list(messages_records(png), features=as_bytes).save_to_disk(str(root / "saved"))
    model = build_family("qwen2_vl", root / "qwen2_vl", TEXTS)
    return root, model


SOURCES = {"llava.json": True, "messages.jsonl": True, "messages.parquet": False, "saved": False}


@pytest.mark.parametrize("source", SOURCES)
def test_every_format_gives_the_generic_recipe_the_same_samples_memory_mapped(sets, source):
    import datasets
    from transformers import AutoProcessor

    root, model = sets
    processor = AutoProcessor.from_pretrained(model)
    folder = str(root / "images") if SOURCES[source] else ""  # embedded images need no image folder
    reference = ChatDataset(ChatDataConfig(data_path="", image_folder=str(root / "images")), processor,
                            records=LLAVA)
    data = ChatDataset(ChatDataConfig(data_path=str(root / source), image_folder=folder), processor)
    assert isinstance(data.records, datasets.Dataset) and data.records.cache_files  # Arrow files, memory-mapped
    assert len(data) == 3 and data.modality_lengths == reference.modality_lengths
    for i in range(3):
        sample, expected = data[i], reference[i]
        assert "skip" not in sample, sample
        assert (sample["id"], sample["text"], sample["ids"], sample["labels"]) == (
            expected["id"], expected["text"], expected["ids"], expected["labels"])
        assert [im.tobytes() for im in sample["images"]] == [im.tobytes() for im in expected["images"]]


def test_the_llava_recipe_reads_the_same_formats(sets):
    from transformers import CLIPImageProcessor

    from vicuna_tokenizer import make_vicuna_like_tokenizer
    from transformers import AutoTokenizer

    root, _ = sets
    tokenizer = AutoTokenizer.from_pretrained(make_vicuna_like_tokenizer(root / "vicuna"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    def dataset(source, folder):
        return LlavaDataset(LlavaDataConfig(data_path=str(root / source), image_folder=folder), tokenizer,
                            image_processor, image_token_id=7, image_seq_length=4)
    reference = dataset("llava.json", str(root / "images"))
    for source, folder in (("messages.parquet", ""), ("saved", ""), ("messages.jsonl", str(root / "images"))):
        data = dataset(source, folder)
        for i in range(2):  # LLaVA-1.5 takes one image: the two-image record is a counted skip there
            a, b = data[i], reference[i]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
            if a["pixel_values"] is not None:
                assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert data[2]["skip"] == "malformed record"


def test_bad_records_are_the_same_counted_skips_in_the_messages_format(sets, tmp_path):
    from transformers import AutoProcessor

    root, model = sets
    processor = AutoProcessor.from_pretrained(model)
    bad = [{"id": "no-role", "messages": [{"content": "hi"}]},
           {"id": "odd-item", "messages": [{"role": "user", "content": [{"type": "audio"}]},
                                           {"role": "assistant", "content": "yes"}]},
           {"id": "image-missing", "images": ["nope.png"], "messages": [
               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
               {"role": "assistant", "content": "Yes."}]},
           {"id": "too-many-images", "images": ["red.png", "red.png"], "messages": [
               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
               {"role": "assistant", "content": "Yes."}]},
           {"id": "broken-bytes", "images": [b"not a png"], "messages": [
               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
               {"role": "assistant", "content": "Yes."}]}]
    data = ChatDataset(ChatDataConfig(data_path="", image_folder=str(root / "images")), processor, records=bad)
    assert [data[i]["skip"] for i in range(len(bad))] == [
        "malformed record", "malformed record", "missing image", "placeholders and images differ",
        "unreadable image"]
    with pytest.raises(Exception, match="not valid JSON"):  # a broken file is still named by line
        (tmp_path / "broken.json").write_text('[{"id": 1},\n{oops}]')
        open_records(tmp_path / "broken.json")


def test_the_generic_recipe_trains_from_a_parquet_set_with_embedded_images(sets, tmp_path):
    root, model = sets
    config = {"model": {"path": str(model), "dtype": "fp32"},
              "dora": {"rules": [{"match": r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj", "rank": 2}]},
              "data": {"data_path": str(root / "messages.parquet")},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "micro_batch_size": 1,
                        "global_batch_size": 1, "optimizer": "sgd", "lr": 0.1, "warmup_ratio": 0.0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    done = subprocesses.run([sys.executable, str(ROOT / "recipes/vlm/train.py"), str(tmp_path / "c.yaml")],
                            what="generic VLM training on parquet", timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0 and "skipped samples: none" in done.stdout, subprocesses.output(done)
    assert len(json.loads((tmp_path / "run" / "train_summary.json").read_text())["losses"]) == 2
