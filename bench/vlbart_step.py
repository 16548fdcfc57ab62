"""VL-BART train step: our DoRA against PEFT LoRA and PEFT DoRA on the same model and batch, in one run.

    python bench/vlbart_step.py            # bart-base's shape (random weights), a VQA-like batch
    python bench/vlbart_step.py --quick    # a small model, for a smoke run

The model is the recipe's VLSeq2Seq on BART of bart-base's shape with VL-T5's 200 extra tokens (random weights:
nothing can be downloaded here; the compute is the same), adapted as the paper's image config adapts it: rank 128
on the 36 q/v projections, biases, LayerNorms and the visual embedding trained. Methods: PEFT LoRA (the baseline
of the ratios), PEFT DoRA, ours with the detached norm (what PEFT computes), and ours as the official VL-BART
scripts ran it (norm not detached, the config's default). One train step = forward, the recipe's VQA loss,
backward, AdamW step; the methods take turns every round, and each ratio is the median over rounds of the pair
timed in the same round. Peak memory: what one step (after a warm-up step) adds to the memory in use before it,
each method in a fresh process (peak RSS on CPU, max_memory_allocated on CUDA): activations, gradients and the
norm computation, not the weights or the optimizer state.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dora_layer import medians, paired_ratio, step_peak_mb, time_interleaved  # noqa: E402

METHODS = ("peft_lora", "peft_dora", "ours_detached", "ours")
TARGET = r"backbone\.model\.(encoder\.layers\.\d+\.self_attn|decoder\.layers\.\d+\.(self_attn|encoder_attn))\.(q|v)_proj"
TRAIN_FULLY = [r".*\.bias", r".*(layer_norm|layernorm_embedding)\.weight", r"visual_embedding\..*"]
SHAPES = {"base": dict(d_model=768, layers=6, heads=12, ffn=3072, rank=128, feat=2048),
          "quick": dict(d_model=256, layers=2, heads=4, ffn=1024, rank=32, feat=256)}


def build(method: str, shape: dict, device, dtype):
    import re

    from transformers import BartConfig, BartForConditionalGeneration

    from dora import apply_dora
    from recipes.vlbart.model import VisualConfig, VLSeq2Seq
    torch.manual_seed(0)
    config = BartConfig(vocab_size=50265 + 200, d_model=shape["d_model"], encoder_layers=shape["layers"],
                        decoder_layers=shape["layers"], encoder_attention_heads=shape["heads"],
                        decoder_attention_heads=shape["heads"], encoder_ffn_dim=shape["ffn"],
                        decoder_ffn_dim=shape["ffn"], dropout=0.0, attention_dropout=0.0)
    model = VLSeq2Seq(BartForConditionalGeneration(config), VisualConfig(feat_dim=shape["feat"]))
    r = shape["rank"]
    if method.startswith("peft"):
        from peft import LoraConfig, inject_adapter_in_model
        inject_adapter_in_model(LoraConfig(target_modules=TARGET, r=r, lora_alpha=r, use_dora=method == "peft_dora"),
                                model)
        fully = [re.compile(p) for p in TRAIN_FULLY]
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or any(f.fullmatch(name) for f in fully))
    else:
        apply_dora(model, [{"match": TARGET, "rank": r, "alpha": r, "detach_norm": method == "ours_detached"}],
                   TRAIN_FULLY, verbose=False)
    with torch.no_grad():  # a non-zero B, as after some training (PEFT's norm cost does not depend on it)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return model.to(device=device, dtype=dtype).train()


def batch(shape: dict, size: int, device, dtype, seed: int = 0) -> dict:
    """A VQA-like batch: "vqa: question" (20 tokens), one image (7x7 grid, pooled to 36 tokens), a 4-token answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50265, (size, 20), generator=g)
    labels = torch.randint(4, 50265, (size, 4), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "vis_feats": torch.randn(size, 1, 49, shape["feat"], generator=g).to(device, dtype),
            "labels": labels.to(device), "score": torch.ones(size, device=device)}


def make_step(model, b: dict):
    from recipes.vlbart.tasks import TaskConfig, task_loss
    task = TaskConfig.from_dict("vqa", {"score_weighted": True})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)

    def step():
        logits = model(b["input_ids"], b["attention_mask"], b["vis_feats"], labels=b["labels"])
        task_loss(logits, b["labels"], b["score"], task).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peak_memory(method: str, shape_name: str, size: int, device: str, dtype: str) -> float:
    """MB of peak memory one train step adds above the state before it, in a fresh process."""
    # Big allocations are mmapped and unmapped on free, so RSS follows the live tensors on CPU.
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, "--child", method, "--shape", shape_name, "--batch", str(size),
                          "--device", device, "--dtype", dtype], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def child(method: str, shape_name: str, size: int, device_name: str, dtype_name: str) -> None:
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    shape = SHAPES[shape_name]
    print(step_peak_mb(make_step(build(method, shape, device, dtype), batch(shape, size, device, dtype)), device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--child", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shape_name = args.shape or ("quick" if args.quick else "base")
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    size = args.batch or (64 if args.device.startswith("cuda") else 8)
    if args.child:
        child(args.child, shape_name, size, args.device, dtype_name)
        return
    device, dtype = torch.device(args.device), getattr(torch, dtype_name)
    shape = SHAPES[shape_name]
    load = os.getloadavg()
    steps = {m: make_step(build(m, shape, device, dtype), batch(shape, size, device, dtype)) for m in METHODS}
    start = time.perf_counter()
    times = time_interleaved(steps, device, warmup=2, reps=2 if args.quick else args.reps)
    med = medians(times)
    memory = {m: peak_memory(m, shape_name, size, args.device, dtype_name) for m in METHODS}
    rows = []
    print(f"VL-BART train step ({shape_name}: d_model {shape['d_model']}, {shape['layers']}+{shape['layers']} layers, "
          f"rank {shape['rank']} on {6 * shape['layers']} q/v projections), batch {size}, {args.device} {dtype_name}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; load average before {[round(x, 2) for x in load]}, after "
          f"{[round(x, 2) for x in os.getloadavg()]}; {time.perf_counter() - start:.0f} s")
    print(f"{'method':<16} {'step ms':>9} {'x PEFT LoRA':>12} {'x PEFT DoRA':>12} {'step MB':>9} {'x LoRA mem':>11}")
    for m in METHODS:
        row = {"method": m, "step_ms": 1000 * med[m], "vs_peft_lora": paired_ratio(times, m, "peft_lora"),
               "vs_peft_dora": paired_ratio(times, m, "peft_dora"), "peak_mb": memory[m],
               "memory_vs_peft_lora": memory[m] / memory["peft_lora"]}
        rows.append(row)
        print(f"{m:<16} {row['step_ms']:9.1f} {row['vs_peft_lora']:12.3f} {row['vs_peft_dora']:12.3f} "
              f"{row['peak_mb']:9.0f} {row['memory_vs_peft_lora']:11.3f}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape_name, "batch": size, "device": args.device,
                                         "dtype": dtype_name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
