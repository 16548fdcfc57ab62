"""QDoRA training step, ours against PEFT's QDoRA (and PEFT's QLoRA), on the same quantized base and batches.

    python bench/qdora.py            # LLaMA-like attention and MLP shapes, NF4 + double quantization
    python bench/qdora.py --quick    # one small shape, for a smoke run

Per shape: a stack of 4 bitsandbytes Linear4bit layers (NF4, double quantization, compute dtype fp32 on CPU and bf16
on a GPU, as QLoRA runs them), adapted on every layer with rank r (alpha 2r, no dropout) by PEFT LoRA, PEFT DoRA
and ours (dora/quantized.py). The step is forward + backward + AdamW on the adapter, the input requiring grad
as a hidden state does. Times: the methods take turns in every round (rotating order), the ratio is the median
over rounds of ours / PEFT QDoRA timed in the same round. Memory: the peak one step adds above the state before it
(peak RSS on CPU, peak allocated on a GPU), each method in a fresh process. PEFT's QDoRA dequantizes every
layer's whole weight and builds B @ A beside it in each step; ours reads W0 only through the 4-bit kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dora_layer import medians, paired_ratio, step_peak_mb, sync, time_interleaved  # noqa: E402

warnings.filterwarnings("ignore", message=".*kernels.*")
METHODS = ("peft_qlora", "peft_qdora", "ours")
LAYERS = 4
SHAPES = {  # (d_model, d_ff, rank, tokens): LLaMA's attention (d x d) and MLP (d x d_ff, d_ff x d) layers
    "full": [(1024, 1024, 64, 512), (1024, 2816, 64, 512), (2048, 5632, 128, 256)],
    "quick": [(512, 512, 16, 128)],
}


def quantized_stack(d: int, d_ff: int, device, compute_dtype) -> nn.Sequential:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dims = [(d, d)] * LAYERS if d == d_ff else [(d, d_ff), (d_ff, d)] * (LAYERS // 2)
    layers = []
    for i, (a, b) in enumerate(dims):
        layer = bnb.nn.Linear4bit(a, b, bias=False, compute_dtype=compute_dtype, quant_type="nf4",
                                  compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(torch.randn(b, a) / a ** 0.5, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        layers.append(layer)
    return nn.Sequential(*layers).to(device).train()


def build(method: str, d: int, d_ff: int, rank: int, device, compute_dtype) -> nn.Module:
    model = quantized_stack(d, d_ff, device, compute_dtype)
    names = [str(i) for i in range(LAYERS)]
    if method == "ours":
        from dora import apply_dora
        apply_dora(model, [{"match": r"\d+", "rank": rank, "alpha": 2 * rank}], verbose=False)
        return model
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names,
                                            use_dora=method == "peft_qdora"))


def make_step(model: nn.Module, x: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        y = model(x.requires_grad_(True))
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def memory_child(method, d, d_ff, rank, tokens, device_name, dtype_name) -> float:
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    model = build(method, d, d_ff, rank, device, dtype)
    return step_peak_mb(make_step(model, torch.randn(tokens, d, device=device, dtype=dtype)), device)


def peak_memory(method, d, d_ff, rank, tokens, device, dtype) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = json.dumps([method, d, d_ff, rank, tokens, str(device), str(dtype).replace("torch.", "")])
    out = subprocess.run([sys.executable, __file__, "--memory-child", args], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_shape(d, d_ff, rank, tokens, device, dtype, warmup, reps) -> dict:
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    steps = {m: make_step(build(m, d, d_ff, rank, device, dtype), x) for m in METHODS}
    times = time_interleaved(steps, device, warmup, reps)
    mem = {m: peak_memory(m, d, d_ff, rank, tokens, device, dtype) for m in METHODS}
    return {"shape": [d, d_ff], "rank": rank, "tokens": tokens, "seconds": medians(times),
            "time_vs_peft_qdora": paired_ratio(times, "ours", "peft_qdora"),
            "peft_qlora_time_vs_peft_qdora": paired_ratio(times, "peft_qlora", "peft_qdora"),
            "peak_mb": mem, "memory_vs_peft_qdora": mem["ours"] / mem["peft_qdora"],
            "rounds": len(times["ours"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(memory_child(*json.loads(args.memory_child)))
        return 0
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    reps = args.reps or (3 if args.quick else 7)
    rows = []
    print(f"QDoRA step on {torch.cuda.get_device_name() if cuda else platform.processor() or 'CPU'} "
          f"({dtype}, {torch.get_num_threads()} threads), load {os.getloadavg()[0]:.2f}")
    print(f"{'d x d_ff':>12} {'rank':>5} {'tokens':>6} | {'step ms: QLoRA':>14} {'QDoRA':>8} {'ours':>8} "
          f"{'ours/QDoRA':>10} | {'peak MB: QLoRA':>14} {'QDoRA':>8} {'ours':>8} {'ours/QDoRA':>10}")
    for d, d_ff, rank, tokens in SHAPES["quick" if args.quick else "full"]:
        row = run_shape(d, d_ff, rank, tokens, device, dtype, warmup=1 if args.quick else 2, reps=reps)
        rows.append(row)
        s, m = row["seconds"], row["peak_mb"]
        print(f"{f'{d} x {d_ff}':>12} {rank:>5} {tokens:>6} | {s['peft_qlora'] * 1e3:>14.1f} "
              f"{s['peft_qdora'] * 1e3:>8.1f} {s['ours'] * 1e3:>8.1f} {row['time_vs_peft_qdora']:>10.2f} | "
              f"{m['peft_qlora']:>14.1f} {m['peft_qdora']:>8.1f} {m['ours']:>8.1f} {row['memory_vs_peft_qdora']:>10.2f}",
              flush=True)
    sync(device)
    result = {"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
              "load_after": list(os.getloadavg()), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"time_vs_peft_qdora": [round(r["time_vs_peft_qdora"], 3) for r in rows],
                      "memory_vs_peft_qdora": [round(r["memory_vs_peft_qdora"], 3) for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
