"""Write a full transformers LLaVA checkpoint: the run's base model with its DoRA adapter merged in.

    python -m recipes.llava.merge RUN_DIR --out MERGED_DIR            # base + RUN_DIR/adapter, merged
    python -m recipes.llava.merge RUN_DIR --out BASE_DIR --no-adapter  # the base model as the run started

The result loads with LlavaForConditionalGeneration.from_pretrained / AutoProcessor.from_pretrained and needs
nothing from this repository.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from dora import load_adapter, unload_dora
from dora.quantized import dequantize_linears
from recipes.config import ConfigError, load_config, section
from recipes.llava.model import LlavaModelConfig, build_llava, resolve_dtype


def merge_run(run_dir: Path, out: Path, with_adapter: bool = True, dtype: str | None = None) -> Path:
    config = load_config(run_dir / "config.yaml")
    model_section = dict(section(config, "model", [f.name for f in fields(LlavaModelConfig)]))
    model_section["gradient_checkpointing"] = False
    if dtype:
        model_section["dtype"] = dtype
    # seeded as train.py is: a run without a projector file then starts from the same random projector
    torch.manual_seed(config.get("train", {}).get("seed", 42))
    model, tokenizer, image_processor = build_llava(LlavaModelConfig(**model_section))
    if with_adapter:
        load_adapter(model, run_dir / "adapter")
        unload_dora(model)  # a quantized base (model.quantization) is dequantized, then merged
    target = resolve_dtype(model_section.get("dtype", "auto"))
    dequantize_linears(model, target)  # what no rule adapted of a quantized base: dense too
    model.to(target).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    try:  # a processor config too, so that AutoProcessor works on the result
        from transformers import LlavaProcessor
        vision = model.config.vision_config
        LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                       vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                       num_additional_image_tokens=1).save_pretrained(out)
    except Exception as e:  # the checkpoint is complete without it
        print(f"note: no processor config written ({e})", file=sys.stderr)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.llava.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a training run's output_dir (config.yaml, adapter/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-adapter", action="store_true", help="save the base model without the adapter")
    parser.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: the run's model.dtype)")
    args = parser.parse_args(argv)
    merge_run(args.run_dir, args.out, with_adapter=not args.no_adapter, dtype=args.dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from dora import AdapterError
    from recipes.cli import exit_on_user_errors
    from recipes.llava.model import ModelConfigError
    exit_on_user_errors(main, (ConfigError, AdapterError, ModelConfigError))
