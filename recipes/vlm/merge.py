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
from recipes.config import load_config, section
from recipes.vlm.train import ChatModelConfig, build_model


def merge_run(run_dir: Path, out: Path, dtype: str | None = None) -> Path:
    config = load_config(Path(run_dir) / "config.yaml")
    model_cfg = ChatModelConfig(**section(config, "model", [f.name for f in fields(ChatModelConfig)]))
    model, processor = build_model(replace(model_cfg, gradient_checkpointing=False, **({"dtype": dtype} if dtype
                                                                                        else {})))
    load_adapter(model, Path(run_dir) / "adapter")
    unload_dora(model)
    model.eval()
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
    args = p.parse_args(argv)
    print(merge_run(args.run_dir, args.out, args.dtype))
    return 0


if __name__ == "__main__":
    from dora import AdapterError
    from recipes.cli import exit_on_user_errors
    from recipes.config import ConfigError
    exit_on_user_errors(main, (ConfigError, AdapterError))
