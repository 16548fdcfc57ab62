"""The merged model of a recipes/vlm run: base checkpoint + DoRA adapter folded into plain Linear weights.

    python -m recipes.vlm.merge RUN_DIR --out MERGED_DIR [--dtype bf16]

The result loads with AutoModelForImageTextToText / AutoProcessor.from_pretrained and answers through
`python -m eval generate --template processor --model MERGED_DIR ...`.
"""
from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from dora import load_adapter, unload_dora
from dora.quantized import dequantize_linears
from recipes.config import load_config, section
from recipes.vlm.train import ChatModelConfig, build_model, model_dtype


def merge_run(run_dir: Path, out: Path, dtype: str | None = None, with_adapter: bool = True) -> Path:
    config = load_config(Path(run_dir) / "config.yaml")
    model_cfg = ChatModelConfig(**section(config, "model", [f.name for f in fields(ChatModelConfig)]))
    model_cfg = replace(model_cfg, gradient_checkpointing=False, **({"dtype": dtype} if dtype else {}))
    model, processor = build_model(model_cfg)
    if with_adapter:
        load_adapter(model, Path(run_dir) / "adapter")
        unload_dora(model)  # a quantized base (model.quantization) is dequantized, then merged
    target = model_dtype(model_cfg)
    dequantize_linears(model, target)  # what no rule adapted of a quantized base: dense too
    model.to(target).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.vlm.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-adapter", action="store_true", help="save the base model without the adapter (a quantized "
                   "base: dequantized)")
    args = p.parse_args(argv)
    print(merge_run(args.run_dir, args.out, args.dtype, with_adapter=not args.no_adapter))
    return 0


if __name__ == "__main__":
    from dora import AdapterError
    from recipes.cli import exit_on_user_errors
    from recipes.config import ConfigError
    exit_on_user_errors(main, (ConfigError, AdapterError))
