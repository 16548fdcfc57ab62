"""A few optimizer steps of `train.optimizer: adamw_hf` through DeepSpeed ZeRO-2, the way the trainer builds it
(parameter groups, launch/zero2.json with its "auto" values filled, the optimizer handed to deepspeed.initialize as
a client optimizer), in one process; writes the trained parameters as JSON (used by tests/test_paper_protocol.py).

    python tests/ds_adamw_hf.py --out params.json [--plain]

`--plain` runs the same steps without DeepSpeed: the reference.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.trainer import (TrainConfig, deepspeed_config, init_distributed, leave_process_group,  # noqa: E402
                             make_optimizer, parameter_groups)

STEPS = 5


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        # gradients of very different sizes from step to step: the eps placement matters at the small ones
        yield torch.randn(4, 6, generator=g) * 10.0 ** -(step % 3 * 2), torch.randint(0, 3, (4,), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--plain", action="store_true")
    args = parser.parse_args()
    config = TrainConfig(output_dir="unused", optimizer="adamw_hf", lr=1e-2, adam_eps=1e-6, weight_decay=0.1,
                         no_decay=[".*bias.*"], max_grad_norm=0.0, precision="fp32", deepspeed="launch/zero2.json")
    model = build_model()
    groups = parameter_groups(model, config)
    for g in groups:
        g.pop("names")
    optimizer = make_optimizer(groups, config)
    if args.plain:
        engine = None
    else:
        import deepspeed
        init_distributed()
        ds = deepspeed_config(config.deepspeed, micro=4, accumulation=1, world=1, max_grad_norm=0.0,
                              precision="fp32", hidden_size=8)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        assert ds["zero_optimization"]["stage"] == 2, ds
        assert type(optimizer.optimizer).__name__ == "TransformersAdamW", type(optimizer.optimizer)  # ZeRO's inner
    for x, y in batches():
        loss = torch.nn.functional.cross_entropy((engine or model)(x) * 100.0, y)
        if engine is None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            engine.backward(loss)
            engine.step()
    module = engine.module if engine is not None else model
    Path(args.out).write_text(json.dumps({n: p.detach().double().flatten().tolist()
                                          for n, p in module.named_parameters()}))
    if engine is not None:
        torch.distributed.barrier()
        leave_process_group()


if __name__ == "__main__":
    main()
