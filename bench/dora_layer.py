"""DoRA layer cost, side by side with PEFT LoRA and PEFT DoRA, in one run.

    python bench/dora_layer.py                 # the full table (fp32 on CPU; bf16 on a GPU)
    python bench/dora_layer.py --quick         # one small configuration, for a smoke run

Per configuration (a stack of 4 adapted Linear layers of the given shape, alternating in->out and out->in
when the shape is not square): the median train-step time (forward + backward + AdamW step) of PEFT DoRA
and of ours, each interleaved with PEFT LoRA in one process so that they share the machine's state; the eval-mode
forward of PEFT LoRA, ours unmerged, ours merged and a plain Linear stack; and the peak memory of one train
step, each method measured in a fresh process. Ratios are to PEFT LoRA (eval: merged is to plain Linear).

Each configuration is measured without dropout and with dropout (0.05, the paper's LLaVA setting) in both of
our modes: "exact" (the official / PEFT form, a second base product) and "lora-branch" (one GEMM). "exact" is
what the layer does by default: on CPU in fp32 / fp64 at this dropout its second base product is sparse (over the
dropped entries, see dora.layer.SPARSE_DROPOUT); where it is, an "exact (dense)" row, timed in the same rounds,
shows the form with two dense base GEMMs. In the dropout rows PEFT LoRA and PEFT DoRA use the same dropout (PEFT
DoRA has the exact form only); eval-mode forwards have no dropout, so those rows leave the eval columns empty.

VeRA rows (issue 25; `--vera-rank`, 0 for none): the same stack with VeRA's update (shared frozen projections, b and
d trained per layer) as PEFT VeRA (the baseline of these rows), this library's plain VeRA (`variant: vera`,
`magnitude: false`) and DVoRA (the same with DoRA's magnitude and row norm), train steps interleaved in one process
and peak memory each in a fresh process; ratios are to PEFT VeRA. PEFT has no DVoRA: its cost over PEFT VeRA is
the price of the decomposition.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dora.layer as dora_layer  # noqa: E402
from dora import apply_dora, merge_dora  # noqa: E402
from dora.layer import DROPOUT_MODES  # noqa: E402

LAYERS = 4
TRAIN_METHODS = ("peft_lora", "peft_dora", "ours")
EVAL_METHODS = ("plain", "peft_lora", "ours", "ours_merged")
EXACT_DENSE = "exact (dense)"  # the exact form with SPARSE_DROPOUT = "never"


def stack(d_in: int, d_out: int, device, dtype) -> nn.Sequential:
    torch.manual_seed(0)
    dims = [(d_in, d_out) if i % 2 == 0 else (d_out, d_in) for i in range(LAYERS)]
    if d_in != d_out and LAYERS % 2:
        raise ValueError("a non-square stack needs an even number of layers")
    if d_in == d_out:
        dims = [(d_in, d_out)] * LAYERS
    return nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in dims]).to(device=device, dtype=dtype)


def build(method: str, d_in: int, d_out: int, rank: int, device, dtype, dropout: float = 0.0,
          mode: str = "exact") -> nn.Module:
    model = stack(d_in, d_out, device, dtype)
    if method == "plain":
        return model
    if method.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[str(i) for i in range(LAYERS)],
                            use_dora=method == "peft_dora", lora_dropout=dropout)
        return get_peft_model(model, config)
    apply_dora(model, [{"match": r"\d+", "rank": rank, "alpha": 2 * rank, "dropout": dropout,
                        "dropout_mode": mode}], verbose=False)
    with torch.no_grad():  # non-zero B, as after some training (PEFT's norm cost does not depend on it)
        for m in model:
            m.lora_B.normal_(0, 1e-3)
    if method == "ours_merged":
        merge_dora(model)
    return model


VERA_METHODS = ("peft_vera", "ours_vera", "ours_dvora")


def build_vera(method: str, d_in: int, d_out: int, rank: int, device, dtype) -> nn.Module:
    model = stack(d_in, d_out, device, dtype)
    if method == "peft_vera":
        from peft import VeraConfig, get_peft_model
        model = get_peft_model(model, VeraConfig(r=rank, target_modules=[str(i) for i in range(LAYERS)],
                                                 projection_prng_key=0, d_initial=0.1))
        trained = [p for n, p in model.named_parameters() if "vera_lambda_b" in n]
    else:
        apply_dora(model, [{"match": r"\d+", "rank": rank, "variant": "vera", "magnitude": method == "ours_dvora",
                            "d_initial": 0.1, "projection_seed": 0}], verbose=False)
        trained = [m.vera_lambda_b for m in model]
    with torch.no_grad():  # non-zero b, as after some training
        for b in trained:
            b.normal_(0, 1e-3)
    return model.to(device)


def make_step(model: nn.Module, x: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forced_dense(fn):
    """fn with the exact dropout form's base products dense (dora.layer.SPARSE_DROPOUT = "never")."""
    def run():
        default, dora_layer.SPARSE_DROPOUT = dora_layer.SPARSE_DROPOUT, "never"
        try:
            fn()
        finally:
            dora_layer.SPARSE_DROPOUT = default
    return run


def make_eval(model: nn.Module, x: torch.Tensor):
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)
    return forward


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device, warmup: int, reps: int, budget_s: float = 0.0) -> dict:
    """Seconds per call of each method, one entry per round; the methods take turns in every round (in rotating
    order), so that drifts of the machine's speed touch all of them alike. With a budget, more rounds are run (up
    to 50) until it is spent."""
    slowest = 0.0
    for fn in fns.values():
        for _ in range(warmup):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
        slowest = max(slowest, time.perf_counter() - t)
    if budget_s:
        reps = max(reps, min(50, int(budget_s / (slowest * len(fns)))))
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        # rotate who goes first: a method that follows a memory-hungry one runs on a colder cache
        for k in names[i % len(names):] + names[: i % len(names)]:
            fn = fns[k]
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def medians(times: dict) -> dict:
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratio(times: dict, method: str, baseline: str) -> float:
    """Median over rounds of method / baseline timed in the same round: a load spike on a shared machine touches
    one round's pair, not the ratio of two medians taken at different moments."""
    return statistics.median(a / b for a, b in zip(times[method], times[baseline]))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_memory_child(method, d_in, d_out, rank, tokens, device_name, dtype_name, dropout, mode) -> float:
    """Run in a fresh process: MB of peak memory one train step adds above the state before it."""
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    if mode == EXACT_DENSE:
        dora_layer.SPARSE_DROPOUT, mode = "never", "exact"
    if method in VERA_METHODS:
        model = build_vera(method, d_in, d_out, rank, device, dtype)
    else:
        model = build(method, d_in, d_out, rank, device, dtype, dropout, mode)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype)
    return step_peak_mb(make_step(model, x), device)


def step_peak_mb(step, device) -> float:
    """MB of peak memory one call of `step` adds above the state before it, after one warm-up call (optimizer
    state, caches). On CPU this is the peak RSS, so run it in a fresh process with MALLOC_MMAP_THRESHOLD_ set
    (see peak_memory)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    before = _rss_kb("VmRSS")
    step()
    return (_rss_kb("VmHWM") - before) / 1024


def peak_memory(method, d_in, d_out, rank, tokens, device, dtype, dropout=0.0, mode="exact") -> float:
    # Big allocations are mmapped and unmapped on free, so RSS follows the live tensors on CPU.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = json.dumps([method, d_in, d_out, rank, tokens, str(device), str(dtype).replace("torch.", ""),
                       dropout, mode])
    out = subprocess.run([sys.executable, __file__, "--memory-child", args], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_config(d_in, d_out, rank, tokens, device, dtype, warmup, reps, budget_s, measure_memory=True) -> dict:
    x = torch.randn(tokens, d_in, device=device, dtype=dtype)
    train = {m: make_step(build(m, d_in, d_out, rank, device, dtype), x) for m in TRAIN_METHODS}
    # Each DoRA is timed against LoRA in its own interleaved pair: PEFT DoRA's large temporaries would
    # otherwise leave a cold cache and a fragmented heap to whichever method runs after it.
    ours = time_interleaved({m: train[m] for m in ("peft_lora", "ours")}, device, warmup, reps, budget_s)
    peft = time_interleaved({m: train[m] for m in ("peft_lora", "peft_dora")}, device, warmup, reps, budget_s)
    del train
    evals = time_interleaved({m: make_eval(build(m, d_in, d_out, rank, device, dtype), x) for m in EVAL_METHODS},
                             device, warmup, reps, budget_s)
    mem = {m: peak_memory(m, d_in, d_out, rank, tokens, device, dtype) for m in TRAIN_METHODS} if measure_memory \
        else {}
    return {"shape": f"{d_in}x{d_out}", "rank": rank, "tokens": tokens, "dropout": 0.0, "dropout_mode": None,
            "train_s": dict(medians(ours), peft_dora=medians(peft)["peft_dora"]),
            "train_ratio": {"peft_dora": paired_ratio(peft, "peft_dora", "peft_lora"),
                            "ours": paired_ratio(ours, "ours", "peft_lora")},
            "eval_s": medians(evals),
            "eval_ratio": {"ours": paired_ratio(evals, "ours", "peft_lora"),
                           "ours_merged": paired_ratio(evals, "ours_merged", "plain")},
            "peak_mb": mem}


def run_dropout_config(d_in, d_out, rank, tokens, dropout, device, dtype, warmup, reps, budget_s,
                       measure_memory=True) -> list[dict]:
    """Train steps with dropout: PEFT LoRA and PEFT DoRA with it, ours in each mode; one row per mode, and one for
    the exact mode forced dense where the default is sparse (timed in the same rounds as the default)."""
    x = torch.randn(tokens, d_in, device=device, dtype=dtype)
    steps = {m: make_step(build(m, d_in, d_out, rank, device, dtype, dropout), x) for m in ("peft_lora", "peft_dora")}
    steps.update({mode: make_step(build("ours", d_in, d_out, rank, device, dtype, dropout, mode), x)
                  for mode in DROPOUT_MODES})
    sparse = dora_layer._sparse_dropout(x, torch.empty(d_out, d_in, device="meta"), 1.0 - dropout)
    if sparse:
        steps[EXACT_DENSE] = forced_dense(make_step(build("ours", d_in, d_out, rank, device, dtype, dropout), x))
    peft = time_interleaved({m: steps[m] for m in ("peft_lora", "peft_dora")}, device, warmup, reps, budget_s)
    rows = []
    for mode in DROPOUT_MODES:
        timed = {"peft_lora": steps["peft_lora"], mode: steps[mode]}
        if mode == "exact" and sparse:
            timed[EXACT_DENSE] = steps[EXACT_DENSE]
        ours = time_interleaved(timed, device, warmup, reps, budget_s)
        for m in list(timed)[1:]:
            rows.append({"shape": f"{d_in}x{d_out}", "rank": rank, "tokens": tokens, "dropout": dropout,
                         "dropout_mode": m, "train_s": {"peft_lora": medians(ours)["peft_lora"],
                                                        "ours": medians(ours)[m],
                                                        "peft_dora": medians(peft)["peft_dora"]},
                         "train_ratio": {"peft_dora": paired_ratio(peft, "peft_dora", "peft_lora"),
                                         "ours": paired_ratio(ours, m, "peft_lora")},
                         "eval_s": {}, "eval_ratio": {}, "peak_mb": {}})
    del steps
    if measure_memory:
        common = {m: peak_memory(m, d_in, d_out, rank, tokens, device, dtype, dropout)
                  for m in ("peft_lora", "peft_dora")}
        for row in rows:
            row["peak_mb"] = dict(common, ours=peak_memory("ours", d_in, d_out, rank, tokens, device, dtype, dropout,
                                                           row["dropout_mode"]))
    return rows


def run_vera_config(d_in, d_out, rank, tokens, device, dtype, warmup, reps, budget_s, measure_memory=True) -> dict:
    """Train steps of PEFT VeRA, our plain VeRA and our DVoRA, interleaved in one process (no dropout)."""
    x = torch.randn(tokens, d_in, device=device, dtype=dtype)
    steps = {m: make_step(build_vera(m, d_in, d_out, rank, device, dtype), x) for m in VERA_METHODS}
    times = time_interleaved(steps, device, warmup, reps, budget_s)
    del steps
    mem = {m: peak_memory(m, d_in, d_out, rank, tokens, device, dtype) for m in VERA_METHODS} if measure_memory \
        else {}
    return {"shape": f"{d_in}x{d_out}", "rank": rank, "tokens": tokens, "train_s": medians(times),
            "train_ratio": {m: paired_ratio(times, m, "peft_vera") for m in VERA_METHODS[1:]}, "peak_mb": mem}


def print_vera_table(rows) -> None:
    print("\nVeRA update (shared projections; b, d trained): train step and peak memory as ratios to PEFT VeRA")
    head = (f"{'shape':>10} {'rank':>5} {'tokens':>6} | {'VeRA s':>7} {'ours VeRA':>9} {'ours DVoRA':>10} | "
            f"{'mem VeRA':>8} {'ours VeRA':>9} {'ours DVoRA':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        t, m = r["train_ratio"], r["peak_mb"]
        mem = (f"{m['peft_vera']:>8.0f} {m['ours_vera'] / m['peft_vera']:>9.2f} "
               f"{m['ours_dvora'] / m['peft_vera']:>10.2f}" if m else f"{'-':>8} {'-':>9} {'-':>10}")
        print(f"{r['shape']:>10} {r['rank']:>5} {r['tokens']:>6} | {r['train_s']['peft_vera']:>7.3f} "
              f"{t['ours_vera']:>9.2f} {t['ours_dvora']:>10.2f} | {mem}")


def print_table(rows, device, dtype) -> None:
    print(f"\nDoRA layer benchmark: {LAYERS} stacked layers, {device.type} {str(dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("train = forward + backward + AdamW step; LoRA s = median seconds of PEFT LoRA; ratios = median over rounds "
          "of\nthe method's time / PEFT LoRA's in the same round of an interleaved run (eval merged: / plain Linear);"
          "\nmemory = peak extra MB of one train step, each method in a fresh process")
    head = (f"{'shape':>10} {'rank':>5} {'tokens':>6} {'dropout':>19} | {'LoRA s':>7} {'PEFT DoRA':>9} {'ours':>6} | "
            f"{'eval ours':>9} {'merged/plain':>12} | {'mem LoRA':>8} {'PEFT DoRA':>9} {'ours':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        t, e, m = r["train_ratio"], r["eval_ratio"], r["peak_mb"]
        dropout = f"{r['dropout']:g} {r['dropout_mode']}" if r["dropout"] else "0"
        mem = (f"{m['peft_lora']:>8.0f} {m['peft_dora'] / m['peft_lora']:>9.2f} {m['ours'] / m['peft_lora']:>6.2f}"
               if m else f"{'-':>8} {'-':>9} {'-':>6}")
        ev = f"{e['ours']:>9.2f} {e['ours_merged']:>12.2f}" if e else f"{'-':>9} {'-':>12}"
        print(f"{r['shape']:>10} {r['rank']:>5} {r['tokens']:>6} {dropout:>19} | {r['train_s']['peft_lora']:>7.3f} "
              f"{t['peft_dora']:>9.2f} {t['ours']:>6.2f} | {ev} | {mem}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--reps", type=int, default=5, help="at least this many timed rounds")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds of timed rounds per configuration and phase (more rounds for fast ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.05, help="the dropout rows' probability (0: no such rows)")
    parser.add_argument("--vera-rank", type=int, default=256,
                        help="rank of the VeRA / DVoRA rows (PEFT VeRA's default; 0: no such rows)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--config", action="append", metavar="IN,OUT,RANK,TOKENS",
                        help="measure only this configuration (repeatable), e.g. 2048,2048,16,512")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(peak_memory_child(*json.loads(args.memory_child)))
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.config:
        configs = [tuple(int(v) for v in c.split(",")) for c in args.config]
    elif args.quick:
        configs = [(512, 512, 16, 512)]
        args.budget = min(args.budget, 5.0)
    else:
        configs = [(d_in, d_out, rank, tokens) for (d_in, d_out) in [(2048, 2048), (2048, 5504)]
                   for tokens in (512, 4096) for rank in (16, 128)]
    rows = []
    for d_in, d_out, rank, tokens in configs:
        print(f"measuring {d_in}x{d_out} rank {rank} tokens {tokens} ...", file=sys.stderr, flush=True)
        rows.append(run_config(d_in, d_out, rank, tokens, device, dtype, args.warmup, args.reps, args.budget,
                               measure_memory=not args.no_memory))
        if args.dropout:
            rows += run_dropout_config(d_in, d_out, rank, tokens, args.dropout, device, dtype, args.warmup,
                                       args.reps, args.budget, measure_memory=not args.no_memory)
    # VeRA rows: each shape once, at the shorter sequence (the update's cost is per token like LoRA's)
    vera = []
    for d_in, d_out, tokens in dict.fromkeys((c[0], c[1], c[3]) for c in configs if c[3] == min(x[3] for x in configs)):
        if args.vera_rank:
            print(f"measuring VeRA {d_in}x{d_out} rank {args.vera_rank} tokens {tokens} ...", file=sys.stderr,
                  flush=True)
            vera.append(run_vera_config(d_in, d_out, args.vera_rank, tokens, device, dtype, args.warmup, args.reps,
                                        args.budget, measure_memory=not args.no_memory))
    print_table(rows, device, dtype)
    if vera:
        print_vera_table(vera)
    if args.json:
        args.json.write_text(json.dumps(rows + [dict(r, kind="vera") for r in vera], indent=2))


if __name__ == "__main__":
    main()
