"""Full fine-tuning vs LoRA vs DoRA on one task, side by side, and the paper's weight-decomposition analysis of
their training (issue 13). CPU-sized: a tiny BART (2 + 2 layers, width 64), generated questions, single-process
runs of the shared trainer (recipes/trainer.py, DeepSpeed ZeRO-2 on CPU), 1 thread each.

    python bench/decomposition.py --out runs/decomposition --results bench/results_decomposition_cpu.json --figures docs
    python bench/decomposition.py time --base runs/decomposition/base      # step times only

The task needs composition. A scene is a row of 4 objects (colour, shape; shapes differ), written as words; the
base model is pre-trained on primitive questions about it ("colour square": the square's colour; "shape 3": the
third object's shape) until it answers them all. Fine-tuning asks for an attribute of a neighbour ("colour right
square": find the square, step right, read the colour), 2000 training questions, and is scored on 1000 questions
about other scenes (none of them seen in training: measured), 500 more picking the learning rate. Chance is about 1/6.

Every method gets the same data, 1000 steps of batch 32, linear schedule and learning-rate search (three rates
each, extended past the grid's edge while the edge wins; best on validation, then seeds 0, 1, 2 at that rate).
Full fine-tuning trains every parameter of the model; LoRA (PEFT, as the VL-BART recipe builds it) and DoRA (this
library) train the query and value projections of every attention (rank 4, alpha 8) and nothing else, so that the
analysis sees what each method did to those weights. VeRA and DVoRA (issue 25: DoRA's split with VeRA's update,
this library's `variant: vera`) adapt the same modules with shared random projections of rank 64 (the full width
of these 64 x 64 weights: VeRA trains only b (out) and d (r) per module, and the paper gave VeRA / DVoRA a much
higher rank than LoRA), d_initial 0.1, projection seed 0. Snapshots (train.snapshot_steps) at 10, 25, 50, 75 and 100 %
of training feed `python -m dora.analysis`, whose figure and slopes this script writes. The same DoRA then trains
with the paper's dropout 0.05 in both forms of the layer, "exact" and "lora-branch" (LoRA with 0.05 alongside).

Each run is its own process (`train` sub-command) and its training loop is timed inside it; on a shared machine
those times are noisy, so step times are measured again by `time`: every variant in one process, taking turns
round by round, with per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
N_OBJECTS = 4
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "|"]
VOCAB = SPECIALS + COLOURS + SHAPES + ["colour", "shape", "left", "right"] + [str(i) for i in range(1, N_OBJECTS + 1)]
TOKEN = {t: i for i, t in enumerate(VOCAB)}
TARGET = r".*\.(q|v)_proj"  # every attention's query and value projection: 12 modules in the 2 + 2 layer BART
RANK = 4
VERA_RANK = 64  # = d_model: every direction of these weights; 64 + 64 trained per module (VeRA), + 64 (DVoRA)
SNAPSHOT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)  # of the run's steps: where snapshots are taken for the analysis
# The decoder reads one position (the start token: answers are one token), so its self-attention has one key and its
# query projection gets no gradient to speak of (measured: within 1e-5 of W0 in every method after 400 steps); those two
# modules are left out of the analysis, where they would only pin points to the origin.
ANALYSED = r".*(encoder\.layers\.\d+\.self_attn\.(q|v)_proj|decoder\.layers\.\d+\.(self_attn\.v_proj|encoder_attn\.(q|v)_proj))"
SIZES = {"train": 2000, "val": 500, "test": 1000}


def scene(rng: random.Random) -> list:
    """A row of objects, (colour, shape), left to right; shapes differ, so "the square" names one object."""
    return list(zip([rng.choice(COLOURS) for _ in range(N_OBJECTS)], rng.sample(SHAPES, N_OBJECTS)))


def words(objects) -> list:
    return [w for obj in objects for w in obj] + ["|"]


def primitive_question(rng: random.Random):
    """What the base model learns: read one attribute of one object, named by its shape or its position."""
    objects = scene(rng)
    k = rng.randrange(N_OBJECTS)
    if rng.random() < 0.5:
        return words(objects) + ["colour", objects[k][1]], (objects[k][0],)
    attribute = rng.randrange(2)
    return words(objects) + [["colour", "shape"][attribute], str(k + 1)], (objects[k][attribute],)


def composed_question(rng: random.Random):
    """The task: an attribute of the neighbour of the object with a given shape ("colour right square"): find the
    shape, step left or right, read the attribute."""
    objects = scene(rng)
    side = rng.choice(["left", "right"])
    k = rng.randrange(1, N_OBJECTS) if side == "left" else rng.randrange(N_OBJECTS - 1)
    other = k - 1 if side == "left" else k + 1
    attribute = rng.randrange(2)
    return words(objects) + [["colour", "shape"][attribute], side, objects[k][1]], (objects[other][attribute],)


def splits(seed: int = 0) -> dict:
    """Fixed fine-tuning questions; test and validation scenes come from other seeds (with 360 x 6^4 scenes, one
    seen in training is rare: the split is measured and reported by `overlap`)."""
    data = {}
    for i, (name, n) in enumerate(SIZES.items()):
        rng = random.Random(1000 * (seed + 1) + i)
        data[name] = [composed_question(rng) for _ in range(n)]
    return data


def overlap(data) -> float:
    seen = {tuple(q) for q, _ in data["train"]}
    return sum(tuple(q) in seen for q, _ in data["test"]) / len(data["test"])


def encode(batch):
    import torch
    width = max(len(q) for q, _ in batch) + 2
    ids = torch.full((len(batch), width), TOKEN["<pad>"], dtype=torch.long)
    for i, (q, _) in enumerate(batch):
        toks = [TOKEN["<s>"]] + [TOKEN[t] for t in q] + [TOKEN["</s>"]]
        ids[i, : len(toks)] = torch.tensor(toks)
    labels = torch.full((len(batch), max(len(a) for _, a in batch)), -100, dtype=torch.long)
    for i, (_, a) in enumerate(batch):
        labels[i, : len(a)] = torch.tensor([TOKEN[str(v)] for v in a])
    return {"input_ids": ids, "attention_mask": (ids != TOKEN["<pad>"]).long(), "labels": labels}


def bart_config():
    from transformers import BartConfig
    return BartConfig(vocab_size=len(VOCAB), d_model=64, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0,
                      activation_dropout=0.0)


def accuracy(model, data, batch_size: int = 256) -> float:
    """Share of questions whose final answer is right, decoding greedily (the model reads its own g(x))."""
    import torch
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            chunk = data[i: i + batch_size]
            b = encode(chunk)
            dec = torch.full((len(chunk), 1), model.config.decoder_start_token_id, dtype=torch.long)
            for _ in range(b["labels"].shape[1]):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               decoder_input_ids=dec).logits
                dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            right += int((dec[:, -1] == b["labels"][:, -1]).sum())
    return right / len(data)


def _versions() -> dict:
    import torch
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def pretrain(out: Path, steps: int = 2500, seed: int = 0) -> dict:
    """The base: a tiny BART that answers "f x" for every function (100 % on them), never shown a composition."""
    import torch
    from transformers import BartForConditionalGeneration

    torch.manual_seed(seed)
    model = BartForConditionalGeneration(bart_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        b = encode([primitive_question(rng) for _ in range(64)])
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    held_out = random.Random(seed + 12345)
    acc = accuracy(model, [primitive_question(held_out) for _ in range(1000)])
    model.save_pretrained(out)
    info = {"pretrain_steps": steps, "primitive_accuracy": acc,
            "task_accuracy_before_finetuning": accuracy(model, splits()["test"]),
            "test_questions_seen_in_training": overlap(splits()),
            "pretrain_seconds": time.perf_counter() - t0}
    (out / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


class Questions:
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def snapshot_steps(steps: int) -> list:
    return sorted({max(1, round(f * steps)) for f in SNAPSHOT_FRACTIONS})


def vera_rule(method: str, dropout: float = 0.0) -> dict:
    """The VeRA (no magnitude) or DVoRA rule: this library's `variant: vera` on the same modules."""
    return {"match": TARGET, "rank": VERA_RANK, "variant": "vera", "magnitude": method == "dvora", "d_initial": 0.1,
            "projection_seed": 0, "dropout": dropout, "detach_norm": True}


def train(args) -> dict:
    """One run: base model, method, trainer with snapshots; writes result.json in args.run."""
    import torch
    torch.set_num_threads(1)
    from transformers import BartForConditionalGeneration

    from recipes.trainer import TrainConfig, Trainer
    from recipes.vlbart.train import adapt

    data = splits()
    torch.manual_seed(args.seed)
    model = BartForConditionalGeneration.from_pretrained(args.base)
    method = {"method": args.method}
    if args.method == "dora":
        method["dora"] = {"rules": [{"match": TARGET, "rank": RANK, "alpha": 2 * RANK, "dropout": args.dropout,
                                     "dropout_mode": args.dropout_mode, "detach_norm": True}]}
    elif args.method == "lora":
        method["lora"] = {"target": TARGET, "rank": RANK, "alpha": 2 * RANK, "dropout": args.dropout}
    elif args.method in ("vera", "dvora"):
        method = {"method": "dora", "dora": {"rules": [vera_rule(args.method, args.dropout)]}}
    else:
        method["full"] = {"train_fully": [".*"]}
    table = adapt(model, method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = TrainConfig(output_dir=str(args.run), max_steps=args.steps, epochs=10 ** 6, micro_batch_size=32,
                         global_batch_size=32, lr=args.lr, weight_decay=0.0, scheduler="linear", warmup_ratio=0.05,
                         max_grad_norm=1.0, deepspeed="launch/zero2.json", seed=args.seed, resume="none",
                         snapshot_steps=snapshot_steps(args.steps))

    def loss_fn(engine, batch):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, int((batch["labels"] != -100).sum())

    trainer = Trainer(config, model, Questions(data["train"]), encode, loss_fn, hidden_size=64)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    module = trainer.engine.module
    out = {"method": args.method, "lr": args.lr, "seed": args.seed, "steps": result.global_step,
           "dropout": args.dropout, "dropout_mode": args.dropout_mode if args.method == "dora" else None,
           "trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in module.parameters()),
           "train_seconds": seconds, "seconds_per_step": seconds / result.global_step,
           "final_loss": result.losses[-1], "val_accuracy": accuracy(module, data["val"]),
           "test_accuracy": accuracy(module, data["test"]), "train_accuracy": accuracy(module, data["train"]),
           "table": table}
    trainer.close()
    (Path(args.run) / "result.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def run_one(out: Path, base: Path, method: str, lr: float, seed: int, steps: int, dropout: float = 0.0,
            dropout_mode: str = "exact") -> dict:
    tag = f"{method}_lr{lr:g}_s{seed}" + (f"_drop{dropout:g}_{dropout_mode}" if dropout else "")
    run = out / "runs" / tag
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), "train", "--base", str(base), "--run", str(run),
           "--method", method, "--lr", str(lr), "--seed", str(seed), "--steps", str(steps),
           "--dropout", str(dropout), "--dropout-mode", dropout_mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"run {tag} failed:\n{proc.stderr[-3000:]}")
    result = json.loads((run / "result.json").read_text())
    print(f"{tag}: val {result['val_accuracy']:.3f} test {result['test_accuracy']:.3f} "
          f"train {result['train_accuracy']:.3f}, {result['seconds_per_step'] * 1000:.1f} ms/step", flush=True)
    return result


LRS = {"full": [3e-4, 1e-3, 3e-3], "lora": [3e-3, 1e-2, 3e-2], "dora": [3e-3, 1e-2, 3e-2],
       "vera": [1e-2, 3e-2, 1e-1], "dvora": [1e-2, 3e-2, 1e-1]}  # VeRA's vectors take higher rates (its paper)
STEPS = 1000
NAMES = {"full": "FT", "lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "dvora": "DVoRA"}
METHODS = tuple(NAMES)


def mean_std(values):
    m = sum(values) / len(values)
    s = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, s


def experiment(args) -> dict:
    import torch
    torch.set_num_threads(1)
    out = Path(args.out)
    base = out / "base"
    if not (base / "model.safetensors").is_file():
        info = pretrain(base)
        print(f"base: {info}", flush=True)
    load = os.getloadavg()
    t_start = time.perf_counter()
    reused = len(list((out / "runs").glob("*/result.json")))  # runs of an earlier invocation are not run again
    chosen, results, searched = {}, {}, {}
    for method in METHODS:
        search = [run_one(out, base, method, lr, args.seeds[0], args.steps) for lr in LRS[method]]
        best = max(search, key=lambda r: (r["val_accuracy"], -r["final_loss"]))
        # a best rate at the edge of the grid: one more rate beyond it, as many times as it stays the best
        for _ in range(3):
            lrs = sorted(r["lr"] for r in search)
            if best["lr"] not in (lrs[0], lrs[-1]):
                break
            step = lrs[-1] / lrs[-2] if best["lr"] == lrs[-1] else lrs[0] / lrs[1]
            search.append(run_one(out, base, method, float(f"{best['lr'] * step:.3g}"), args.seeds[0], args.steps))
            best = max(search, key=lambda r: (r["val_accuracy"], -r["final_loss"]))
        searched[method] = {r["lr"]: r["val_accuracy"] for r in search}
        chosen[method] = best["lr"]
        results[method] = [run_one(out, base, method, best["lr"], s, args.steps) for s in args.seeds]
    # the two dropout forms alternate seed by seed, so that a change of machine load falls on both alike
    dropout, lora_dropout = {"exact": [], "lora-branch": []}, []
    for s in args.seeds:
        for mode in dropout:
            dropout[mode].append(run_one(out, base, "dora", chosen["dora"], s, args.steps, 0.05, mode))
        lora_dropout.append(run_one(out, base, "lora", chosen["lora"], s, args.steps, 0.05))

    # the analysis of the first seed's runs, from their snapshots
    analysis_dir = out / "analysis"
    checkpoints = []
    for method in METHODS:
        tag = f"{method}_lr{chosen[method]:g}_s{args.seeds[0]}"
        for step in snapshot_steps(args.steps):
            snap = out / "runs" / tag / "snapshots" / f"step_{step}"
            if snap.is_dir():
                checkpoints.append(f"{NAMES[method]}={snap}")
    module_sets = (("query+value", ANALYSED), ("query", ANALYSED.replace("(q|v)", "q").replace(
        "self_attn\\.v_proj|", "")), ("value", ANALYSED.replace("(q|v)", "v")))

    def analyse_runs(checkpoints, where, title):
        slopes = {}
        for label, modules in module_sets:
            sub = where if label == "query+value" else where / label
            cmd = [sys.executable, "-m", "dora.analysis", "--base", str(base), "--checkpoints", *checkpoints,
                   "--modules", modules, "--out", str(sub), "--title", f"{title}: {label} projections"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            print(f"{label}:\n{proc.stdout}", flush=True)
            slopes[label] = json.loads((sub / "summary.json").read_text())
        return slopes

    slopes = analyse_runs(checkpoints, analysis_dir, "tiny BART, neighbour questions on held-out scenes")
    # DoRA at LoRA's rate as well: is DoRA's pattern its own, or that of its higher rate?
    lora_lr, seed = chosen["lora"], args.seeds[0]
    same_lr = [f"{NAMES[m]}={out / 'runs' / f'{m}_lr{lora_lr:g}_s{seed}' / 'snapshots' / f'step_{s}'}"
               for m in ("lora", "dora") for s in snapshot_steps(args.steps)]
    slopes_same_lr = analyse_runs(same_lr, out / "analysis_same_lr", f"LoRA and DoRA at lr {chosen['lora']:g}")
    step_time = time_steps(argparse.Namespace(base=str(base), rounds=40, steps_per_round=30, json=None))

    def row(name, runs):
        acc = mean_std([r["test_accuracy"] * 100 for r in runs])
        ms = mean_std([r["seconds_per_step"] * 1000 for r in runs])
        return {"name": name, "lr": runs[0]["lr"], "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
                "test_accuracy_per_seed": [round(r["test_accuracy"] * 100, 2) for r in runs],
                "train_accuracy_mean": mean_std([r["train_accuracy"] * 100 for r in runs])[0],
                "ms_per_step_mean": ms[0], "ms_per_step_std": ms[1],
                "trainable_parameters": runs[0]["trainable_parameters"],
                "total_parameters": runs[0]["total_parameters"]}

    table = [row(NAMES[m], results[m]) for m in METHODS]
    table += [row("LoRA, dropout 0.05", lora_dropout),
              row("DoRA, dropout 0.05 exact", dropout["exact"]),
              row("DoRA, dropout 0.05 lora-branch", dropout["lora-branch"])]
    summary = {"setting": {"steps": args.steps, "batch": 32, "seeds": args.seeds, "rank": RANK, "alpha": 2 * RANK,
                           "target": TARGET, "vera": vera_rule("dvora"), "lr_grid": LRS,
                           "val_accuracy_by_lr": searched, "chosen_lr": chosen, "threads": 1,
                           # the base model's random draw depends on them (another transformers drew another base)
                           "versions": _versions(),
                           "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
                           "wall_seconds_this_invocation": time.perf_counter() - t_start,
                           "runs_reused_from_earlier_invocations": reused},
               "base": json.loads((base / "pretrain.json").read_text()),
               "table": table, "slopes": slopes, "slopes_dora_at_lora_lr": slopes_same_lr, "step_time": step_time,
               "runs": {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "table"}
                        for p in sorted((out / "runs").glob("*/result.json"))}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    if args.figures:
        import shutil
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        shutil.copy(analysis_dir / "decomposition.png", Path(args.figures) / "decomposition.png")
        shutil.copy(analysis_dir / "query" / "decomposition.png", Path(args.figures) / "decomposition_query.png")
    print(f"{'method':<32} {'lr':>7} {'test acc %':>16} {'ms/step':>12} {'trainable':>10}")
    for r in table:
        print(f"{r['name']:<32} {r['lr']:>7g} {r['test_accuracy_mean']:>8.1f} ± {r['test_accuracy_std']:<5.1f} "
              f"{r['ms_per_step_mean']:>7.1f} ± {r['ms_per_step_std']:<4.1f} {r['trainable_parameters']:>10,}")
    print(f"summary: {out / 'summary.json'}; figure: {analysis_dir / 'decomposition.png'}")
    return summary


TIMED = {"LoRA": ("lora", 0.0, "exact"), "LoRA, dropout 0.05": ("lora", 0.05, "exact"),
         "DoRA": ("dora", 0.0, "exact"), "DoRA, dropout 0.05 exact": ("dora", 0.05, "exact"),
         "DoRA, dropout 0.05 lora-branch": ("dora", 0.05, "lora-branch"), "VeRA": ("vera", 0.0, "exact"),
         "DVoRA": ("dvora", 0.0, "exact")}


def _paired(a, b) -> dict:
    import statistics
    ratios = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def time_steps(args) -> dict:
    """Training-step time of each variant in one process, the variants taking turns round by round (so that the
    load of a shared machine falls on all of them alike); median over rounds, and the ratio to LoRA's. A plain
    torch AdamW step (forward, backward, step) on the experiment's batches: what differs is the layers."""
    import statistics

    import torch
    torch.set_num_threads(1)
    from transformers import BartForConditionalGeneration

    from recipes.vlbart.train import adapt

    data = splits()["train"]
    variants = {}
    for name, (method, dropout, mode) in TIMED.items():
        torch.manual_seed(0)
        model = BartForConditionalGeneration.from_pretrained(args.base)
        cfg = {"method": method}
        if method == "dora":
            cfg["dora"] = {"rules": [{"match": TARGET, "rank": RANK, "alpha": 2 * RANK, "dropout": dropout,
                                      "dropout_mode": mode, "detach_norm": True}]}
        elif method in ("vera", "dvora"):
            cfg = {"method": "dora", "dora": {"rules": [vera_rule(method, dropout)]}}
        else:
            cfg["lora"] = {"target": TARGET, "rank": RANK, "alpha": 2 * RANK, "dropout": dropout}
        adapt(model, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        variants[name] = (model, opt)
    batches = [encode(data[i: i + 32]) for i in range(0, 32 * 20, 32)]

    def run(name, n):
        model, opt = variants[name]
        t0 = time.perf_counter()
        for i in range(n):
            model(**batches[i % len(batches)]).loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t0) / n

    for name in variants:
        run(name, 20)  # warm-up
    times = {name: [] for name in variants}
    load = os.getloadavg()
    for r in range(args.rounds):
        order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
        for name in order:
            times[name].append(run(name, args.steps_per_round))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"rounds": args.rounds, "steps_per_round": args.steps_per_round, "threads": 1,
              "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
              "ms_per_step_median": {n: m * 1000 for n, m in median.items()},
              "ratio_to_lora": {n: m / median["LoRA"] for n, m in median.items()},
              # paired within each round (the same load for both): median and range of the per-round ratios
              "paired_ratio_exact_to_lora_branch": _paired(times["DoRA, dropout 0.05 exact"],
                                                           times["DoRA, dropout 0.05 lora-branch"]),
              "paired_ratio_to_lora": {n: _paired(t, times["LoRA"]) for n, t in times.items()},
              "ms_per_step_rounds": {n: [round(t * 1000, 3) for t in ts] for n, ts in times.items()}}
    for n in variants:
        print(f"{n:<32} {median[n] * 1000:7.2f} ms/step  {median[n] / median['LoRA']:.3f}x LoRA")
    p = result["paired_ratio_exact_to_lora_branch"]
    print(f"exact / lora-branch, paired by round: median {p['median']:.3f} (range {p['min']:.2f}-{p['max']:.2f})")
    print(f"load average {load} -> {result['load_average_at_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train", help="one run (used by the experiment)")
    t.add_argument("--base", required=True)
    t.add_argument("--run", required=True)
    t.add_argument("--method", choices=METHODS, required=True)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=STEPS)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--dropout-mode", default="exact")
    tm = sub.add_parser("time", help="step time of LoRA, the DoRA dropout forms, VeRA and DVoRA, interleaved in one "
                                     "process")
    tm.add_argument("--base", default="runs/decomposition/base")
    tm.add_argument("--rounds", type=int, default=40)
    tm.add_argument("--steps-per-round", type=int, default=30)
    tm.add_argument("--json", default=None)
    parser.add_argument("--out", default="runs/decomposition")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default=None, help="also write the summary here (bench/results_*.json)")
    parser.add_argument("--figures", default=None, help="copy the two figures into this directory (docs/)")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args)
    elif args.command == "time":
        time_steps(args)
    else:
        experiment(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
