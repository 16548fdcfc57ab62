"""DoRA visual instruction tuning of any transformers image-text-to-text model, under DeepSpeed.

    deepspeed recipes/vlm/train.py CONFIG.yaml [key=value ...]
    bash launch/vlm_dora.sh CONFIG.yaml [key=value ...]

The model is a checkpoint folder that AutoModelForImageTextToText and AutoProcessor load (LLaVA-NeXT, Qwen2-VL,
Idefics3 / SmolVLM, Gemma 3, ...); the data is LLaVA's conversation format (data/vlm_chat.py); the dora: section
is what `python -m recipes.inspect MODEL` proposes. The model's own forward does everything model-specific
(image features, where they go, position ids such as Qwen2-VL's rope index, token types): the recipe passes it
the processor's outputs and the labels. LLaVA-1.5 itself keeps its exact paper path (recipes/llava).

Written into train.output_dir: adapter/ (ours), adapter_peft/ (PEFT's), processor/, config.yaml,
train_summary.json. `python -m recipes.vlm.merge RUN --out DIR` writes the merged model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(ROOT))

from data.llava import DataFormatError  # noqa: E402
from data.vlm_chat import ChatCollator, ChatDataConfig, ChatDataset  # noqa: E402
from dora import apply_dora  # noqa: E402
from recipes.config import ConfigError, load_config, save_config, section  # noqa: E402
from recipes.preflight import (check_data, check_folder, check_model, check_output,  # noqa: E402
                               remote_code_refused)
from recipes.quantization import bitsandbytes_config, check_zero_stage, load_device  # noqa: E402
from recipes.trainer import TooManySkipsError, TrainConfig, Trainer, write_summary  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ChatModelConfig:
    path: str  # a checkpoint folder (or hub id in the local cache) with the model and its processor
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False  # run the code a checkpoint brings (Phi-3.5-vision, InternVL2): trust it first
    quantization: Optional[dict] = None  # {bits: 4, type: nf4, ...}: the language model in 4 / 8 bits, QDoRA


def model_dtype(config: ChatModelConfig) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if config.dtype in DTYPES:
        return DTYPES[config.dtype]
    raise ConfigError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got {config.dtype!r}")


def build_model(config: ChatModelConfig):
    """(model, processor) through the Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = model_dtype(config)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    remote = {"trust_remote_code": config.trust_remote_code}
    quantization = bitsandbytes_config(config.quantization, dtype)
    if quantization:
        extra.update(quantization_config=quantization, **load_device())
    try:
        model = AutoModelForImageTextToText.from_pretrained(config.path, dtype=dtype, **remote, **extra)
        processor = AutoProcessor.from_pretrained(config.path, **remote)
    except ValueError as e:
        if remote_code_refused(e):
            raise ConfigError(f"model.path: {config.path} needs the code in its own repository to be loaded "
                              f"(transformers does not know its model type): set model.trust_remote_code: true "
                              f"if you trust that code") from None
        raise
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, processor


def chat_loss(engine, batch: dict):
    """The model's own next-token loss over the labelled tokens of a micro-batch (see data/vlm_chat.py for why
    every micro-batch holds an image)."""
    model = engine.module
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    inputs = {k: (v.to(engine.device, dtype) if v.is_floating_point() else v.to(engine.device))
              for k, v in batch["inputs"].items()}
    if batch["empty"]:  # every sample skipped: run the same modules, learn nothing
        inputs.pop("labels")
        return engine(**inputs).logits.sum() * 0.0, 0
    return engine(**inputs).loss, batch["tokens"]


def build(config: dict):
    model_cfg = ChatModelConfig(**section(config, "model", [f.name for f in fields(ChatModelConfig)]))
    dora_cfg = section(config, "dora", ["rules", "train_fully"])
    data_cfg = ChatDataConfig(**section(config, "data", [f.name for f in fields(ChatDataConfig)]))
    check_model("model.path", model_cfg.path)  # everything the run reads, before any model is built
    check_data("data.data_path", data_cfg.data_path)
    check_folder("data.image_folder", data_cfg.image_folder)
    model, processor = build_model(model_cfg)
    report = apply_dora(model, dora_cfg.get("rules", []), dora_cfg.get("train_fully", []), verbose=False)
    dataset = ChatDataset(data_cfg, processor)
    return model, processor, dataset, report, ChatCollator(processor, data_cfg.max_length)


def hidden_size(model) -> int:
    text = getattr(model.config, "text_config", None) or model.config
    return int(getattr(text, "hidden_size", 1024))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # passed by the deepspeed launcher
    if not argv:
        print(__doc__)
        return 2
    config = load_config(argv[0], argv[1:], sections=("model", "dora", "data", "train"))
    train_cfg = TrainConfig.from_dict(section(config, "train", [f.name for f in fields(TrainConfig)]))
    check_output("train.output_dir", train_cfg.output_dir)
    check_zero_stage((config.get("model") or {}).get("quantization"), train_cfg.deepspeed)
    torch.manual_seed(train_cfg.seed)  # the adapter's initialisation is the same in every process and run
    model, processor, dataset, report, collator = build(config)
    trainer = Trainer(train_cfg, model, dataset, collator, chat_loss, lengths=dataset.modality_lengths,
                      hidden_size=hidden_size(model))
    out = Path(train_cfg.output_dir)
    if trainer.is_main:
        for note in dataset.notes:  # what the chat template makes the labels do (data/vlm_chat.py)
            print(f"note: {note}", flush=True)
        print(report.table(), flush=True)
        print(f"{type(model).__name__}: {len(dataset)} samples, {trainer.plan()}", flush=True)
    result = trainer.run()
    if result.paused:
        return 0
    trainer.save_dora_adapter(out, {"recipe": "vlm", "config": str(out / "config.yaml"), "steps": result.global_step})
    if trainer.is_main:
        processor.save_pretrained(out / "processor")
        save_config(config, out / "config.yaml")
        write_summary(out, result, f"adapter in {out / 'adapter'}", trainable_parameters=report.trainable,
                      total_parameters=report.total)
    trainer.close()
    return 0


if __name__ == "__main__":
    from recipes.cli import exit_on_user_errors
    exit_on_user_errors(main, (ConfigError, DataFormatError, TooManySkipsError))
