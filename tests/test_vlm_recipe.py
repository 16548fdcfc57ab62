"""The generic recipe (recipes/vlm, data/vlm_chat.py) on six families built from configs (tests/vlm_families.py):
the inspector's proposal trains under 2 DeepSpeed processes with ZeRO-3 and gives the 1-process losses, with
text-only samples among the image ones; merged model and base + adapter give the same logits and the same
`eval generate --template processor` answers; the PEFT export loads in PEFT with equal logits.
The other families with a real-shaped template (llava-1.5-hf, both llava-v1.6-mistral-hf revisions, SmolVLM, Mistral 3,
Pixtral) train once each, all in one process (tests/vlm_train_runs.py), and are merged and answer the same way."""
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dora_helpers import assert_analysis_reads_the_run
from eval.cli import main as eval_main
from vlm_families import FAMILIES, TEMPLATE_FAMILIES, build_family
import subprocesses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """The shapes demo's conversations with a text-only copy of every third one (no image, no placeholder)."""
    from data.demo_shapes import write_demo_dataset
    from recipes.llava.demo_models import corpus_from_llava_json

    data = write_demo_dataset(tmp_path_factory.mktemp("chat") / "data", n_train_images=8, n_eval_images=2, seed=1)
    records = []
    for i, r in enumerate(json.loads(Path(data["train"]).read_text())):
        records.append(r)
        if i % 3 == 0:
            records.append({"id": f"textonly-{i}", "conversations": [
                {**c, "value": c["value"].replace("<image>", "").strip()} for c in r["conversations"]]})
    Path(data["train"]).write_text(json.dumps(records))
    return {**data, "corpus": corpus_from_llava_json(data["train"])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config: dict, out: Path, processes: int, note: str = "") -> list:
    config = {**config, "train": {**config["train"], "output_dir": str(out)}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    script = str(ROOT / "recipes/vlm/train.py")
    cmd = [sys.executable, script, str(path)] if processes == 1 else [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(processes), "--master_port",
        str(free_port()), script, str(path)]
    proc = subprocesses.run(cmd, what="generic VLM training", timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped samples: none" in proc.stdout
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == (1 if note else 0) and all(note in line for line in notes)  # once, by rank 0
    return json.loads((out / "train_summary.json").read_text())["losses"]


def logits(model, processor, data, k: int = 0):
    from PIL import Image

    question = json.loads(Path(data["questions"]).read_text().splitlines()[k])
    image = Image.open(Path(data["images"]) / question["image"]).convert("RGB")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": question["text"]}]}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        return model(**processor(text=[text], images=[[image]], return_tensors="pt")).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_from_the_inspector_config_and_answers(family, chat_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dora import load_adapter
    from recipes.inspect import inspect_model
    from recipes.vlm.merge import merge_run

    model_dir = build_family(family, tmp_path / "model", chat_data["corpus"])
    proposal = yaml.safe_load(inspect_model(str(model_dir), rank=4, alpha=8, dropout=0.0)["yaml"])
    config = {"model": {"path": str(model_dir), "dtype": "fp32"}, **proposal,
              "data": {"data_path": str(chat_data["train"]), "image_folder": str(chat_data["images"]),
                       "max_length": 512},
              # SGD: Adam would amplify the rounding differences of other reduction orders in near-zero gradients
              "train": {"max_steps": STEPS, "micro_batch_size": 1, "global_batch_size": 4, "optimizer": "sgd",
                        "lr": 0.5, "warmup_ratio": 0.0, "deepspeed": "launch/zero3.json"}}
    # llava-v1.6-vicuna-hf's template writes no end marker: the EOS is learned instead, said once at start-up
    note = "the chat template writes no end-of-turn marker" if family == "llava_next" else ""
    one = train(config, tmp_path / "one", 1, note)
    two = train(config, tmp_path / "two", 2, note)
    assert len(one) == STEPS and one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-5)

    merged = merge_run(tmp_path / "one", tmp_path / "merged")
    processor = AutoProcessor.from_pretrained(model_dir)
    ours = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    load_adapter(ours, tmp_path / "one" / "adapter")
    reference = logits(ours, processor, chat_data)
    base_logits = logits(AutoModelForImageTextToText.from_pretrained(model_dir).eval(), processor, chat_data)
    assert not torch.allclose(reference, base_logits, atol=1e-3)  # the adapter changed the model
    torch.testing.assert_close(logits(AutoModelForImageTextToText.from_pretrained(merged).eval(), processor,
                                      chat_data), reference, rtol=1e-4, atol=1e-4)
    # greedy tokens, 4 forced (the briefly trained model would otherwise stop at once), merged vs base + adapter
    question = json.loads(Path(chat_data["questions"]).read_text().splitlines()[0])
    from PIL import Image
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": question["text"]}]}], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[Image.open(Path(chat_data["images"]) / question["image"]).convert("RGB")]],
                       return_tensors="pt")
    merged_model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    with torch.no_grad():
        tokens = [m.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, -4:].tolist()
                  for m in (ours, merged_model)]
    assert tokens[0] == tokens[1]
    assert_analysis_reads_the_run(model_dir, tmp_path / "one", ours)  # the family's checkpoint names
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir),
                                     tmp_path / "one" / "adapter_peft").eval()
    torch.testing.assert_close(logits(peft, processor, chat_data), reference, rtol=1e-4, atol=1e-4)

    answers = {}
    for name, extra in (("merged", ["--model", str(merged)]),
                        ("adapter", ["--model", str(model_dir), "--adapter", str(tmp_path / "one" / "adapter")])):
        out = tmp_path / f"{name}.jsonl"
        assert eval_main(["generate", "--template", "processor", *extra, "--questions", str(chat_data["questions"]),
                          "--image-folder", str(chat_data["images"]), "--out", str(out), "--max-new-tokens", "4",
                          "--batch-size", "3"]) == 0
        answers[name] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(answers["merged"]) == 6 and answers["merged"] == answers["adapter"]


# The families trained once each (the 2-process equality is the six above's): the rest of TEMPLATE_FAMILIES
TRAINED_ONCE = tuple(f for f in TEMPLATE_FAMILIES if f not in FAMILIES)
# What each says at start-up (data/vlm_chat.py template_notes): once, by the run
NOTES = {"llava": "the chat template writes no end-of-turn marker",
         "llava_next_mistral_bs": "which is not a special token of the tokenizer"}


@pytest.fixture(scope="module")
def trained_once(chat_data, tmp_path_factory):
    """TRAINED_ONCE's checkpoints, each trained from the inspector's proposal by recipes/vlm/train.py's main, all in
    one process: {family: (model dir, run dir, the run's output)}."""
    from recipes.inspect import inspect_model

    root = tmp_path_factory.mktemp("trained_once")
    runs, paths = {}, []
    for family in TRAINED_ONCE:
        model_dir = build_family(family, root / family, chat_data["corpus"])
        proposal = yaml.safe_load(inspect_model(str(model_dir), rank=4, alpha=8, dropout=0.0)["yaml"])
        config = {"model": {"path": str(model_dir), "dtype": "fp32"}, **proposal,
                  "data": {"data_path": str(chat_data["train"]), "image_folder": str(chat_data["images"]),
                           "max_length": 512},
                  "train": {"max_steps": STEPS, "micro_batch_size": 1, "global_batch_size": 4, "optimizer": "sgd",
                            "lr": 0.5, "warmup_ratio": 0.0, "deepspeed": "launch/zero3.json",
                            "output_dir": str(root / f"{family}-run")}}
        paths.append(root / f"{family}.yaml")
        paths[-1].write_text(yaml.safe_dump(config))
        runs[family] = (model_dir, root / f"{family}-run")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocesses.run([sys.executable, str(ROOT / "tests/vlm_train_runs.py"), *map(str, paths)],
                            what="generic VLM training of several families", timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, subprocesses.output(proc)
    outputs = proc.stdout.split("=== run ")[1:]
    assert len(outputs) == len(TRAINED_ONCE)
    return {family: (*runs[family], out) for family, out in zip(TRAINED_ONCE, outputs)}


@pytest.mark.parametrize("family", TRAINED_ONCE)
def test_every_other_family_trains_merges_and_answers_as_base_plus_adapter(family, trained_once, chat_data, tmp_path):
    """Issue 21 item 7 for llava-1.5-hf, both llava-v1.6-mistral-hf revisions, SmolVLM, Mistral 3 and Pixtral: the
    inspector's section trains (ZeRO-3, 1 process, text-only samples among the image ones, nothing skipped, the loss
    goes down, the template's start-up note said once), and the merged model gives base + adapter's logits and the
    same `eval generate --template processor` answers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dora import load_adapter
    from recipes.vlm.merge import merge_run

    model_dir, run, output = trained_once[family]
    assert output.rstrip().endswith("=== exit 0") and "skipped samples: none" in output
    notes = [line for line in output.splitlines() if line.startswith("note: ")]
    assert len(notes) == (family in NOTES) and all(NOTES[family] in line for line in notes)
    losses = json.loads((run / "train_summary.json").read_text())["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0]

    merged = merge_run(run, tmp_path / "merged")
    processor = AutoProcessor.from_pretrained(model_dir)
    ours = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    load_adapter(ours, run / "adapter")
    reference = logits(ours, processor, chat_data)
    base_logits = logits(AutoModelForImageTextToText.from_pretrained(model_dir).eval(), processor, chat_data)
    assert not torch.allclose(reference, base_logits, atol=1e-3)  # the adapter changed the model
    torch.testing.assert_close(logits(AutoModelForImageTextToText.from_pretrained(merged).eval(), processor,
                                      chat_data), reference, rtol=1e-4, atol=1e-4)
    answers = {}
    for name, extra in (("merged", ["--model", str(merged)]),
                        ("adapter", ["--model", str(model_dir), "--adapter", str(run / "adapter")])):
        out = tmp_path / f"{name}.jsonl"
        assert eval_main(["generate", "--template", "processor", *extra, "--questions", str(chat_data["questions"]),
                          "--image-folder", str(chat_data["images"]), "--out", str(out), "--max-new-tokens", "4",
                          "--batch-size", "3"]) == 0
        answers[name] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(answers["merged"]) == 6 and answers["merged"] == answers["adapter"]
