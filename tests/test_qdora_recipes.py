"""QDoRA in the LLaVA recipe: `model.quantization` a config key away. The demo LLaVA's language model loads in NF4,
trains under DeepSpeed ZeRO-2 in 1 and 2 processes with the same losses, merges (dequantized, then merged) and
answers through `eval generate` as the quantized model with its adapter does; ZeRO-3 is refused with the stage to
use."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

import subprocesses
from test_llava_training import free_port, write_config

ROOT = Path(__file__).resolve().parents[1]
QUANTIZATION = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "fp32"}


def qdora_config(assets, out: Path, **train) -> Path:
    path = write_config(assets, out, **train)
    config = yaml.safe_load(path.read_text())
    config["model"]["quantization"] = QUANTIZATION
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, processes: int):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    script = str(ROOT / "recipes/llava/train.py")
    cmd = [sys.executable, script, str(config)] if processes == 1 else [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(processes), "--master_port",
        str(free_port()), script, str(config)]
    return subprocesses.run(cmd, what=f"LLaVA QDoRA training, {processes} process(es)", timeout=600, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def qdora_run(llava_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("qdora") / "one"
    done = train(qdora_config(llava_assets, out, deepspeed="launch/zero2.json"), 1)
    assert done.returncode == 0, subprocesses.output(done)
    return out


def test_the_language_model_trains_in_4_bits_in_one_and_two_processes(llava_assets, qdora_run, tmp_path):
    from dora import apply_dora
    from dora.quantized import QuantizedDoRALinear
    from recipes.llava.model import LlavaModelConfig, build_llava

    one = json.loads((qdora_run / "train_summary.json").read_text())["losses"]
    assert one[-1] < one[0]
    two = train(qdora_config(llava_assets, tmp_path / "two", deepspeed="launch/zero2.json"), 2)
    assert two.returncode == 0, subprocesses.output(two)
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["losses"] == pytest.approx(one, rel=1e-5)
    config = yaml.safe_load((qdora_run / "config.yaml").read_text())
    model = build_llava(LlavaModelConfig(**config["model"]))[0]
    apply_dora(model, config["dora"]["rules"], config["dora"]["train_fully"], verbose=False)
    layers = [m for n, m in model.named_modules() if n.startswith("model.language_model.layers.")
              and isinstance(m, QuantizedDoRALinear)]
    assert len(layers) == 14 and all(type(m.base_layer).__name__ == "Linear4bit" for m in layers)
    tower = [m for n, m in model.named_modules() if n.startswith("model.vision_tower") and n.endswith("_proj")]
    assert tower and all(type(m) is torch.nn.Linear for m in tower)  # the vision tower stays in its dtype


def test_zero3_is_refused_with_the_stage_to_use(llava_assets, tmp_path):
    done = train(qdora_config(llava_assets, tmp_path / "z3", deepspeed="launch/zero3.json"), 1)
    assert done.returncode == 2 and "Traceback" not in done.stderr, subprocesses.output(done)
    assert "error: model.quantization: DeepSpeed ZeRO-3 cannot partition 4-bit / 8-bit weights; train with ZeRO-2" \
        in done.stderr


def test_merged_and_quantized_base_with_adapter_answer_alike(llava_assets, qdora_run, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from dora import load_adapter
    from eval.cli import main as eval_main
    from recipes.llava.merge import merge_run
    from recipes.llava.model import LlavaModelConfig, build_llava

    merged = merge_run(qdora_run, tmp_path / "merged")
    # the 4-bit model with its adapter, as trained, against the merged one (training mode: on an AVX512-BF16 CPU,
    # bitsandbytes computes inference forwards in bf16)
    config = yaml.safe_load((qdora_run / "config.yaml").read_text())
    quantized = build_llava(LlavaModelConfig(**config["model"]))[0]
    load_adapter(quantized, qdora_run / "adapter")
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(LlavaForConditionalGeneration.from_pretrained(merged).train()(input_ids=ids).logits,
                                   quantized.train()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    base = merge_run(qdora_run, tmp_path / "base", with_adapter=False)  # the dequantized 4-bit base
    saved = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in saved and "quantization_config" not in saved["text_config"]
    answers = {}
    for name, extra in (("merged", ["--model", str(merged)]),
                        ("adapter", ["--model", str(base), "--adapter", str(qdora_run / "adapter")])):
        out = tmp_path / f"{name}.jsonl"
        assert eval_main(["generate", *extra, "--questions", str(llava_assets["questions"]), "--image-folder",
                          str(llava_assets["images"]), "--out", str(out), "--max-new-tokens", "4",
                          "--batch-size", "4"]) == 0
        answers[name] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(answers["merged"]) == 12 and answers["merged"] == answers["adapter"]


def test_the_qdora_paper_config_is_the_dora_paper_config_on_a_4_bit_language_model():
    from recipes.config import load_config
    from recipes.llava.model import LlavaModelConfig
    from recipes.quantization import bitsandbytes_config

    dora = load_config(ROOT / "recipes/llava/configs/llava_v1_5_7b_dora.yaml")
    qdora = load_config(ROOT / "recipes/llava/configs/llava_v1_5_7b_qdora.yaml",
                        sections=("model", "dora", "data", "train"))
    assert qdora["model"].pop("quantization") == {"bits": 4, "type": "nf4", "double_quant": True,
                                                  "compute_dtype": "bf16"}
    assert qdora["train"].pop("deepspeed") == "launch/zero2.json" and dora["train"].pop("deepspeed") != \
        "launch/zero2.json"
    assert qdora["train"].pop("output_dir") != dora["train"].pop("output_dir")
    assert qdora == dora  # everything else is the paper's run
    quant = bitsandbytes_config(load_config(ROOT / "recipes/llava/configs/llava_v1_5_7b_qdora.yaml")["model"]
                                ["quantization"], torch.bfloat16)
    assert quant.load_in_4bit and quant.bnb_4bit_use_double_quant and quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert "vision_tower" in quant.llm_int8_skip_modules and "multi_modal_projector" in quant.llm_int8_skip_modules
    LlavaModelConfig(**qdora["model"])


def test_a_4_bit_qwen2_vl_trains_merges_and_answers_as_its_quantized_base_with_the_adapter(tmp_path):
    """The generic recipe (`model.quantization` a key away) on a tiny Qwen2-VL: its language model in NF4 (the
    vision tower and merger stay dense), trained under ZeRO-2, merged, and answering through `eval generate` as the
    dequantized base with the adapter does."""
    from data.demo_shapes import write_demo_dataset
    from eval.cli import main as eval_main
    from recipes.inspect import inspect_model
    from recipes.llava.demo_models import corpus_from_llava_json
    from recipes.vlm.merge import merge_run
    from recipes.vlm.train import ChatModelConfig, build_model
    from vlm_families import build_family

    data = write_demo_dataset(tmp_path / "data", n_train_images=8, n_eval_images=2, seed=1)
    model_dir = build_family("qwen2_vl", tmp_path / "model", corpus_from_llava_json(data["train"]))
    proposal = yaml.safe_load(inspect_model(str(model_dir), rank=4, alpha=8, dropout=0.0)["yaml"])
    config = {"model": {"path": str(model_dir), "dtype": "fp32", "quantization": QUANTIZATION}, **proposal,
              "data": {"data_path": str(data["train"]), "image_folder": str(data["images"]), "max_length": 512},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "micro_batch_size": 1,
                        "global_batch_size": 2, "optimizer": "sgd", "lr": 0.5, "warmup_ratio": 0.0,
                        "deepspeed": "launch/zero2.json"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    done = subprocesses.run([sys.executable, str(ROOT / "recipes/vlm/train.py"), str(tmp_path / "run.yaml")],
                            what="Qwen2-VL QDoRA training", timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, subprocesses.output(done)
    losses = json.loads((tmp_path / "run" / "train_summary.json").read_text())["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]

    model = build_model(ChatModelConfig(**config["model"]))[0]
    names = {type(m).__name__ for n, m in model.named_modules() if "language_model.layers" in n}
    assert "Linear4bit" in names and not any("Linear4bit" == type(m).__name__ for n, m in model.named_modules()
                                             if n.startswith("model.visual"))
    merged = merge_run(tmp_path / "run", tmp_path / "merged")
    base = merge_run(tmp_path / "run", tmp_path / "base", with_adapter=False)
    answers = {}
    for name, extra in (("merged", ["--model", str(merged)]),
                        ("adapter", ["--model", str(base), "--adapter", str(tmp_path / "run" / "adapter")])):
        out = tmp_path / f"{name}.jsonl"
        assert eval_main(["generate", "--template", "processor", *extra, "--questions", str(data["questions"]),
                          "--image-folder", str(data["images"]), "--out", str(out), "--max-new-tokens", "4",
                          "--batch-size", "3"]) == 0
        answers[name] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(answers["merged"]) == 6 and answers["merged"] == answers["adapter"]


def test_the_qwen2_vl_qdora_example_is_the_dora_example_on_a_4_bit_language_model():
    from recipes.config import load_config
    from recipes.vlm.train import ChatModelConfig

    dora = load_config(ROOT / "recipes/vlm/configs/qwen2_vl_2b_dora.yaml")
    qdora = load_config(ROOT / "recipes/vlm/configs/qwen2_vl_2b_qdora.yaml", sections=("model", "dora", "data", "train"))
    assert qdora["model"].pop("quantization") == {"bits": 4, "type": "nf4", "double_quant": True,
                                                  "compute_dtype": "bf16"}
    assert qdora["train"].pop("deepspeed") == "launch/zero2.json"
    dora["train"].pop("deepspeed"), dora["train"].pop("output_dir"), qdora["train"].pop("output_dir")
    assert qdora == dora
    ChatModelConfig(**qdora["model"])
