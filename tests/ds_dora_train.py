"""Train a small DoRA model with DeepSpeed ZeRO and write the per-step global losses (used by the tests).

    deepspeed --num_gpus 2 tests/ds_dora_train.py --stage 3 --micro 4 --accum 1 --out losses.json

Without the deepspeed launcher (`--plain`), the same training runs in one process with torch.optim.AdamW:
the reference the DeepSpeed runs are compared with. Every run sees the same global batches.

`--dropout P --sparse-dropout FORM` adapts with dropout P in the exact form, its second base product in the given
form (dora.layer.SPARSE_DROPOUT); every rank seeds its dropout masks alike in both forms, and the output then also
counts the sparse forwards run on rank 0.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dora.layer as dora_layer  # noqa: E402
from dora import apply_dora  # noqa: E402
from dora_helpers import TinyNet, perturb_adapter  # noqa: E402
from recipes.trainer import leave_process_group  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 6
LR = 2e-2
# the head is DVoRA (dora/vera.py): b, d and m trained around projections every rank draws from the same seed
RULES = [{"match": r"layers\.\d+\.(q_proj|v_proj|up|down)", "rank": 4, "alpha": 8},
         {"match": r"head", "rank": 8, "variant": "vera", "projection_seed": 3}]
TRAIN_FULLY = [r"projector\..*"]


def build_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyNet(d_in=12, d=32, hidden=48, layers=2, classes=5)
    apply_dora(model, [dict(rule, dropout=dropout) for rule in RULES], TRAIN_FULLY, verbose=False)
    if dropout:
        perturb_adapter(model)  # g - 1 and B away from 0: the exact form's dropped-input terms matter from step 1
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield torch.randn(GLOBAL_BATCH, 12, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def make_optimizer(params, name: str):
    # SGD makes runs comparable to float rounding; Adam divides by sqrt(v) and amplifies the rounding
    # differences of different reduction orders in near-zero gradients (lora_A's is exactly 0 at step 1).
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def train_plain(accum: int, optimizer_name: str) -> list[float]:
    model = build_model()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer_name)
    losses = []
    for x, y in batches():
        total = 0.0
        for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
            loss = loss_fn(model, xs, ys) / accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def train_deepspeed(stage: int, micro: int, accum: int, optimizer_name: str, dropout: float = 0.0) -> list[float]:
    import deepspeed
    import torch.distributed as dist

    from recipes.deepspeed_ops import prepare
    prepare()  # as every DeepSpeed start of the project: this environment's extension folder
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    assert micro * accum * world == GLOBAL_BATCH, "micro x accum x world must equal the global batch"
    model = build_model(dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "reduce_bucket_size": 1000, "allgather_bucket_size": 1000},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }
    optimizer = make_optimizer(params, optimizer_name)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    torch.manual_seed(100 + rank)  # the dropout masks: the same in every run of this rank
    losses = []
    for x, y in batches():
        total = torch.zeros(())
        # This rank's share of the global batch, split into micro-batches.
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        for xm, ym in zip(xs.chunk(accum), ys.chunk(accum)):
            loss = loss_fn(engine, xm, ym)
            engine.backward(loss)
            engine.step()
            total += loss.detach() / accum
        dist.all_reduce(total)
        losses.append(total.item() / world)
    # Leave the process group before the interpreter exits: tearing gloo down during interpreter shutdown, with
    # its threads still joinable, aborts the process ("terminate called without an active exception").
    dist.barrier()
    leave_process_group()
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--sparse-dropout", choices=dora_layer.SPARSE_DROPOUT_FORMS, default="auto")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    dora_layer.SPARSE_DROPOUT = args.sparse_dropout
    sparse_forwards = 0
    sparse_form = dora_layer._sparse_dropped_products

    def counted(*a, **k):
        nonlocal sparse_forwards
        sparse_forwards += 1
        return sparse_form(*a, **k)
    dora_layer._sparse_dropped_products = counted
    if args.plain:
        losses = train_plain(args.accum, args.optimizer)
    else:
        losses = train_deepspeed(args.stage, args.micro, args.accum, args.optimizer, args.dropout)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(losses if not args.dropout else
                                             {"losses": losses, "sparse_forwards": sparse_forwards}))


if __name__ == "__main__":
    main()
