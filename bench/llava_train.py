"""LLaVA training step, end to end: our loop + our DoRA against what users would run instead, in one run.

    python bench/llava_train.py --tiny      # the demo's tiny model, a smoke run (~2 min on 2 CPU cores)
    python bench/llava_train.py             # mid-size: 4-layer, 1024-wide Llama + a small CLIP tower (~15 min)

Methods, each a 2-process DeepSpeed ZeRO-2 job (launch/zero2.json) on the same model, data and batches:
    hf_peft_dora    transformers' Trainer + PEFT DoRA (get_peft_model): the baseline of the ratios
    hf_peft_lora    transformers' Trainer + PEFT LoRA, for reference
    ours_peft_dora  our loop (recipes/trainer.py, recipes/llava/train.py's loss) + PEFT DoRA
    ours            our loop + our DoRA (dora.apply_dora): the recipe as `bash launch/llava_dora.sh` runs it
    ours_lora_branch  (with --methods) ours with dropout_mode lora-branch: dropout on the adapter's input only,
                    one base GEMM instead of the exact form's two; a different (not the official) computation
The model is built by recipes/llava/demo_models.py from configs (Llama + CLIP tower + stage-1 projector, a tokenizer
trained on the data), saved and loaded through the recipe's from_pretrained path; the data is the demo's generated
shapes questions. Adapters follow the paper's LLaVA rule (q/k/v/o/gate/up/down of every LLM layer, dropout 0.05,
alpha = 2 x rank, our DoRA in its "exact" mode with the detached norm, as recipes/llava/configs/llava_v1_5_7b_dora.yaml),
the projector is trained fully; AdamW, one learning rate, cosine schedule with warmup, no clipping, fp32 on CPU and
bf16 on CUDA. Every method reads the same micro-batches (our batch plan: the Trainer gets a DataLoader over it, as
LLaVA's fork gives it its own sampler) and collates them with the recipe's LlavaCollator.

Timing: every process notes the time when the vision tower starts each micro-batch (data loading, the whole forward
and backward, the optimizer step and any logging or host sync between two such points are inside); samples/s is
the global batch over the median of the steps after the warm-up steps (the same steps of every method; the slower
process's median; the mean step is in the JSON too). On a machine shared with other jobs the wall time of a step
follows their load, so the table also gives samples per CPU-second: the CPU time the process spent (all its
threads) over the same steps, which the others' load changes far less. Peak memory per process: peak RSS
(ru_maxrss) on CPU, max_memory_allocated on CUDA, the largest over the processes. The methods take turns round after
round (A B C D A B C D ...), and each ratio is the median over rounds of the ratio measured in the same round.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipes import deepspeed_ops  # noqa: E402

METHODS = ("hf_peft_dora", "hf_peft_lora", "ours_peft_dora", "ours")
EXTRA_METHODS = ("ours_lora_branch",)  # ours with dropout_mode lora-branch (one base GEMM; not the official form)
BASELINE = "hf_peft_dora"
TARGET = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PROJECTOR = r"model\.multi_modal_projector\..*"
# hidden/layers: the LLM; the CLIP tower is demo_models' (64 wide); image 48 px / patch 8 = 36 image tokens
SHAPES = {
    "tiny": {"hidden": 96, "layers": 2, "vision_layers": 1, "rank": 8, "micro": 4, "warmup": 3, "steps": 20, "rounds": 2},
    "mid": {"hidden": 1024, "layers": 4, "vision_layers": 2, "rank": 128, "micro": 4, "warmup": 2, "steps": 8,
            "rounds": 3},
}
DROPOUT = 0.05
LR = 2e-4


# ------------------------------------------------------------------------------------------------ preparation
def prepare(root: Path, shape: dict) -> None:
    """The demo data and a model of the shape, saved like real checkpoints (once per root)."""
    from data.demo_shapes import write_demo_dataset
    from recipes.llava.demo_models import corpus_from_llava_json, make_demo_checkpoints
    data, checkpoints = root / "data", root / "checkpoints"
    if not (data / "train.json").is_file():
        write_demo_dataset(data, seed=0)
    if not (checkpoints / "mm_projector.bin").is_file():
        make_demo_checkpoints(checkpoints, corpus_from_llava_json(data / "train.json"), hidden=shape["hidden"],
                              layers=shape["layers"], vision_layers=shape["vision_layers"], lm_steps=0, seed=0)


def recipe_config(root: Path, shape: dict, total_steps: int, out: Path, dropout_mode: str = "exact") -> dict:
    """The recipe's config (as recipes/llava/train.py reads it) for this model and run."""
    return {
        "model": {"llm": str(root / "checkpoints/llm"), "vision_tower": str(root / "checkpoints/vision"),
                  "projector": str(root / "checkpoints/mm_projector.bin"), "vision_feature_layer": -2,
                  "dtype": "auto", "gradient_checkpointing": False},
        "dora": {"rules": [{"match": TARGET, "rank": shape["rank"], "alpha": 2 * shape["rank"], "dropout": DROPOUT,
                            "dropout_mode": dropout_mode, "detach_norm": True}],
                 "train_fully": [PROJECTOR]},
        "data": {"data_path": str(root / "data/train.json"), "image_folder": str(root / "data/images"),
                 "template": "vicuna_v1", "model_max_length": 256, "image_aspect_ratio": "pad"},
        "train": {"output_dir": str(out), "epochs": 100, "max_steps": total_steps, "micro_batch_size": shape["micro"],
                  "global_batch_size": shape["micro"] * int(os.environ.get("WORLD_SIZE", "1")), "lr": LR,
                  "weight_decay": 0.0, "warmup_ratio": 0.03, "scheduler": "cosine", "max_grad_norm": 0.0,
                  "precision": "auto", "deepspeed": "launch/zero2.json", "group_by_modality_length": True,
                  "num_workers": 0, "save_steps": 0, "resume": "none", "seed": 0},
    }


def peft_config(rank: int, dora: bool):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT, target_modules=TARGET, use_dora=dora)


def train_projector(model, only_adapters: bool = False) -> None:
    """The projector trained fully, as the recipe's train_fully; `only_adapters`: everything else but the
    adapters frozen (after PEFT's inject_adapter_in_model, which leaves the rest as it was)."""
    import re
    for name, p in model.named_parameters():
        if re.search(r"multi_modal_projector\.", name):
            p.requires_grad_(True)
        elif only_adapters:
            p.requires_grad_("lora_" in name)


def planned_loader(dataset, collator, micro: int, rank: int, world: int):
    """The micro-batches our loop reads on this rank in epoch 0 (our batch plan, seed 0, grouped by modality as
    the recipe's config says), collated as a Trainer user's collator gives them."""
    from torch.utils.data import DataLoader

    from data.sampling import ShuffledBatches
    plan = ShuffledBatches(dataset.modality_lengths, micro, 1, rank, world, seed=0, group_by_modality=True)
    return DataLoader(dataset, batch_sampler=plan.micro_batches(0), collate_fn=lambda s: hf_batch(collator(s)),
                      num_workers=0)


def hf_batch(batch: dict) -> dict:
    """The recipe collator's micro-batch as the model's forward takes it (what a Trainer user's collator gives)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}


# ------------------------------------------------------------------------------------------------ one method
class StepClock:
    """Notes the wall time and this process's CPU time when the vision tower starts a micro-batch (a forward
    pre-hook): one point per step."""

    def __init__(self, tower):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        tower.register_forward_pre_hook(self.tick)

    def tick(self, *_):
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())


def peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(method: str, root: Path, shape_name: str, out_json: Path) -> None:
    import torch
    import torch.distributed as dist

    from recipes.config import section
    from recipes.llava import train as recipe
    from recipes.llava.model import LlavaModelConfig, build_llava
    from recipes.trainer import TrainConfig, Trainer

    shape = SHAPES[shape_name]
    total = shape["warmup"] + shape["steps"] + 1  # the clock's points bound steps, so one more point
    work = Path(out_json).with_suffix("")
    config = recipe_config(root, shape, total, work, "lora-branch" if method == "ours_lora_branch" else "exact")
    torch.manual_seed(0)
    if method in ("ours", "ours_lora_branch"):
        model, tokenizer, _, dataset, _ = recipe.build(config)
    else:
        from data.llava import LlavaDataConfig, LlavaDataset
        model, tokenizer, image_processor = build_llava(LlavaModelConfig(**config["model"]))
        dataset = LlavaDataset(LlavaDataConfig(**config["data"]), tokenizer, image_processor,
                               model.config.image_token_id, model.config.image_seq_length)
    clock = StepClock(model.model.vision_tower)
    hidden = model.config.text_config.hidden_size
    from data.llava import LlavaCollator
    collator = LlavaCollator(tokenizer.pad_token_id)

    if method.startswith("ours"):
        if method == "ours_peft_dora":
            from peft import inject_adapter_in_model
            inject_adapter_in_model(peft_config(shape["rank"], True), model)
            train_projector(model, only_adapters=True)
        from dataclasses import fields
        train_cfg = TrainConfig.from_dict(section(config, "train", [f.name for f in fields(TrainConfig)]))
        trainer = Trainer(train_cfg, model, dataset, collator, recipe.llava_loss,
                          lengths=dataset.modality_lengths, hidden_size=hidden)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = trainer.train()
        losses, rank, world, engine = result.losses, trainer.rank, trainer.world, type(trainer.engine).__name__
        trainer.close()
    else:
        losses, rank, world, engine, trainable = hf_train(method, model, dataset, collator, shape, total, work)
    record = {"method": method, "rank": rank, "world": world, "engine": engine, "trainable": trainable, "times": clock.times, "cpu_times": clock.cpu_times,
              "losses": losses,
              "peak_mb": peak_memory_mb(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "global_batch": shape["micro"] * world, "warmup": shape["warmup"], "steps": shape["steps"]}
    Path(f"{out_json}.rank{rank}").write_text(json.dumps(record))
    if dist.is_initialized():
        from recipes.trainer import leave_process_group
        dist.barrier()
        leave_process_group()


def hf_train(method, model, dataset, collator, shape, total, work):
    """transformers' Trainer + PEFT (get_peft_model), DeepSpeed from the same launch/zero2.json ("auto" values
    filled by transformers), reading our batch plan's micro-batches."""
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = get_peft_model(model, peft_config(shape["rank"], method == "hf_peft_dora"))
    train_projector(model)
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work), max_steps=total, per_device_train_batch_size=shape["micro"],
        gradient_accumulation_steps=1, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.03 * total), max_grad_norm=0.0, bf16=cuda, use_cpu=not cuda,
        deepspeed=json.loads((ROOT / "launch/zero2.json").read_text()), logging_steps=10 ** 6,
        save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False, seed=0,
        disable_tqdm=True)

    class PlannedTrainer(Trainer):
        def get_train_dataloader(self):
            return planned_loader(dataset, collator, shape["micro"], dist.get_rank(), dist.get_world_size())

    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = PlannedTrainer(model=model, args=args, train_dataset=dataset, data_collator=None,
                             callbacks=[Losses()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train()
    return losses, dist.get_rank(), dist.get_world_size(), type(trainer.model_wrapped).__name__, trainable


# ------------------------------------------------------------------------------------------------ driver
def run_method(method: str, root: Path, shape_name: str, out_dir: Path, round_: int) -> dict:
    out = out_dir / f"{method}_r{round_}.json"
    for old in out_dir.glob(f"{out.name}.rank*"):
        old.unlink()
    # TORCH_EXTENSIONS_DIR: the HF Trainer starts DeepSpeed itself, so it is told our environment's folder here
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               TORCH_EXTENSIONS_DIR=str(deepspeed_ops.prepare()))
    import torch
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    processes = 2 if not torch.cuda.is_available() else min(2, torch.cuda.device_count())
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(processes), "--master_port", str(port),
           __file__, "--worker", method, "--root", str(root), "--shape", shape_name, "--out", str(out),
           "--dropout", str(DROPOUT)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{out.name}.rank*"))]
    w, n = ranks[0]["warmup"], ranks[0]["steps"]

    def median_step(points):  # of the timed steps (a load spike from outside hits a few steps, not the median)
        return statistics.median(b - a for a, b in zip(points[w:w + n], points[w + 1:w + n + 1]))
    step = max(median_step(r["times"]) for r in ranks)  # the slower process
    cpu_step = max(median_step(r["cpu_times"]) for r in ranks)
    mean = max(r["times"][w + n] - r["times"][w] for r in ranks) / n
    return {"samples_per_s": ranks[0]["global_batch"] / step, "step_s": step, "mean_step_s": mean,
            "samples_per_cpu_s": ranks[0]["global_batch"] / cpu_step, "cpu_step_s": cpu_step,
            "peak_mb": max(r["peak_mb"] for r in ranks), "job_s": time.perf_counter() - start,
            "losses": ranks[0]["losses"], "device": ranks[0]["device"], "engine": ranks[0]["engine"],
            "trainable": ranks[0]["trainable"], "world": ranks[0]["world"]}


def main() -> None:
    global DROPOUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {METHODS + EXTRA_METHODS}")
    parser.add_argument("--root", type=Path, default=None, help="model and data folder (default: runs/bench_llava_<shape>)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dropout", type=float, default=DROPOUT, help="adapter dropout (the paper's LLaVA: 0.05)")
    parser.add_argument("--local_rank", type=int, default=None)  # from the deepspeed launcher
    args = parser.parse_args()
    DROPOUT = args.dropout
    shape_name = args.shape or ("tiny" if args.tiny else "mid")
    shape = SHAPES[shape_name]
    root = (args.root or ROOT / "runs" / f"bench_llava_{shape_name}").resolve()
    if args.worker:
        worker(args.worker, root, shape_name, args.out)
        return
    import torch
    methods = args.methods.split(",")
    prepare(root, shape)
    out_dir = root / "jobs"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    rounds = args.rounds or shape["rounds"]
    results = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods:
            results[m].append(run_method(m, root, shape_name, out_dir, r))
            print(f"round {r} {m:<15} {results[m][-1]['samples_per_s']:7.2f} samples/s "
                  f"{results[m][-1]['samples_per_cpu_s']:7.2f} samples/CPU-s "
                  f"{results[m][-1]['peak_mb']:7.0f} MB (job {results[m][-1]['job_s']:.0f} s)", flush=True)
    load_after = os.getloadavg()
    base = BASELINE if BASELINE in methods else methods[0]
    device = results[methods[0]][0]["device"]
    setting = {"shape": shape_name, **shape, "rounds": rounds, "methods": methods, "dropout": DROPOUT,
               "processes": results[methods[0]][0]["world"], "zero": 2,
               "device": device, "dtype": "bf16" if device == "cuda" else "fp32",
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1") if device == "cpu" else None,
               "cpus": os.cpu_count(), "torch": torch.__version__,
               "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
               "seconds": round(time.perf_counter() - start)}
    rows = []
    for m in methods:
        speed = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(results[m], results[base])]
        mem = [a["peak_mb"] / b["peak_mb"] for a, b in zip(results[m], results[base])]
        cpu = [a["samples_per_cpu_s"] / b["samples_per_cpu_s"] for a, b in zip(results[m], results[base])]
        rows.append({"method": m, "samples_per_s": statistics.median(a["samples_per_s"] for a in results[m]),
                     "speed_vs_base": statistics.median(speed), "speed_vs_base_rounds": speed,
                     "samples_per_cpu_s": statistics.median(a["samples_per_cpu_s"] for a in results[m]),
                     "cpu_speed_vs_base": statistics.median(cpu), "cpu_speed_vs_base_rounds": cpu,
                     "peak_mb": statistics.median(a["peak_mb"] for a in results[m]),
                     "memory_vs_base": statistics.median(mem), "engine": results[m][0]["engine"],
                     "trainable_parameters": results[m][0]["trainable"]})
    print(f"LLaVA train step ({shape_name}: Llama {shape['hidden']} wide x {shape['layers']} layers, CLIP 64 x "
          f"{shape['vision_layers']}, DoRA rank {shape['rank']} on q/k/v/o/gate/up/down, dropout {DROPOUT}), "
          f"{setting['processes']} processes x micro-batch {shape['micro']}, ZeRO-2, {device} {setting['dtype']}, "
          f"OMP_NUM_THREADS={setting['omp_num_threads']}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{shape['steps']} timed steps after {shape['warmup']}, {rounds} rounds; load average before "
          f"{setting['load_before']}, after {setting['load_after']}; {setting['seconds']} s")
    print(f"{'method':<16} {'samples/s':>10} {'x ' + base:>16} {'samples/CPU-s':>14} {'x ' + base:>16} "
          f"{'peak MB/proc':>13} {'mem x ' + base:>18} {'trainable':>11}")
    for row in rows:
        print(f"{row['method']:<16} {row['samples_per_s']:10.2f} {row['speed_vs_base']:16.3f} "
              f"{row['samples_per_cpu_s']:14.2f} {row['cpu_speed_vs_base']:16.3f} {row['peak_mb']:13.0f} "
              f"{row['memory_vs_base']:18.3f} {row['trainable_parameters']:11,}")
    out = args.json or Path(__file__).with_name(f"results_llava_train_{shape_name}_{device}.json")
    out.write_text(json.dumps({"setting": setting, "rows": rows,
                               "rounds": {m: [{k: v for k, v in x.items() if k != "losses"} for x in results[m]]
                                          for m in methods}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
