"""The VL-BART paper configs run the official protocol (NVlabs/DoRA 7e2f10a image_video_text_understanding, and
ylsung/VL_adapter 545fcbb for the LoRA and full fine-tuning rows, both on transformers 4.2.1): each official value
below is a fact read from that code, and a config that drifts from it fails here. Also the rules that carry it:
transformers 4.x's AdamW, greedy decoding without forced tokens, `label: {}` with weight 0, VALUE's answer parsing."""
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import subprocesses
from recipes.trainer import TrainConfig, TransformersAdamW

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the optimizer
def reference_adamw_4x(params, grads_per_step, lrs, betas=(0.9, 0.999), eps=1e-6, decays=(0.0,)):
    """transformers 4.2.1 optimization.py AdamW.step, element by element in Python floats: m, v moving averages;
    step size lr * sqrt(1 - b2^t) / (1 - b1^t); p -= step * m / (sqrt(v) + eps); then p -= lr * wd * p."""
    b1, b2 = betas
    ps = [list(p) for p in params]
    ms = [[0.0] * len(p) for p in params]
    vs = [[0.0] * len(p) for p in params]
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for i, g in enumerate(grads):
            for j, gj in enumerate(g):
                ms[i][j] = b1 * ms[i][j] + (1 - b1) * gj
                vs[i][j] = b2 * vs[i][j] + (1 - b2) * gj * gj
                ps[i][j] -= step * ms[i][j] / (math.sqrt(vs[i][j]) + eps)
                ps[i][j] -= lr * decays[i] * ps[i][j]
    return ps


def run_optimizer(make, params, grads_per_step, lrs):
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    optimizer = make(tensors)
    for grads, lr in zip(grads_per_step, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr  # a schedule
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return [t.detach().tolist() for t in tensors]


def test_adamw_hf_is_transformers_4x_adamw_over_several_steps():
    rng = random.Random(0)
    params = [[rng.uniform(-1, 1) for _ in range(7)], [rng.uniform(-1, 1) for _ in range(4)]]
    steps = 8
    # gradient scales 1e-2 .. 1e-7: where eps against the un-corrected sqrt(v) matters
    grads = [[[rng.gauss(0, 1) * 10.0 ** -(2 + s % 6) for _ in p] for p in params] for s in range(steps)]
    lrs = [1e-3 * (s + 1) / steps for s in range(steps)]
    decays = (0.01, 0.0)  # a decayed group and a no-decay group

    def ours(tensors):
        return TransformersAdamW([{"params": [tensors[0]], "weight_decay": decays[0]},
                                  {"params": [tensors[1]], "weight_decay": decays[1]}], lr=lrs[0], eps=1e-6)
    got = run_optimizer(ours, params, grads, lrs)
    want = reference_adamw_4x(params, grads, lrs, decays=decays)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12, abs=1e-15)

    def torch_adamw(tensors):
        return torch.optim.AdamW([{"params": [tensors[0]], "weight_decay": decays[0]},
                                  {"params": [tensors[1]], "weight_decay": decays[1]}], lr=lrs[0], eps=1e-6)
    # torch's form (eps after the bias correction, decay before the step) moves these weights differently
    other = run_optimizer(torch_adamw, params, grads, lrs)
    moved = [abs(o - p0) for o_, p_ in zip(other, params) for o, p0 in zip(o_, p_)]
    ours_moved = [abs(g - p0) for g_, p_ in zip(got, params) for g, p0 in zip(g_, p_)]
    assert max(abs(a / b - 1) for a, b in zip(moved, ours_moved)) > 0.02


def test_adamw_hf_through_deepspeed_zero2_takes_the_same_steps(tmp_path):
    """The trainer hands the optimizer to DeepSpeed as a client optimizer; under ZeRO-2 (1 process) it updates its
    flattened partition: the weights after 5 steps equal the plain run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    out = {}
    for kind in ("deepspeed", "plain"):
        out[kind] = tmp_path / f"{kind}.json"
        cmd = [sys.executable, str(ROOT / "tests/ds_adamw_hf.py"), "--out", str(out[kind])]
        proc = subprocesses.run(cmd + (["--plain"] if kind == "plain" else []), what=f"adamw_hf, {kind}",
                                timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, subprocesses.output(proc)
    ds, plain = (json.loads(out[k].read_text()) for k in ("deepspeed", "plain"))
    assert ds.keys() == plain.keys()
    for name in ds:
        assert ds[name] == pytest.approx(plain[name], rel=1e-6, abs=1e-9), name


def test_warmup_steps_round_as_configured():
    from recipes.trainer import make_scheduler, warmup_steps
    assert warmup_steps(TrainConfig(output_dir="x", warmup_ratio=0.1), 1234) == 124  # HF Trainer: ceil
    assert warmup_steps(TrainConfig(output_dir="x", warmup_ratio=0.1, warmup_rounding="floor"), 1234) == 123  # int()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, TrainConfig(output_dir="x", scheduler="linear", warmup_ratio=0.1,
                                                      warmup_rounding="floor"), 1234)
    lrs = []
    for _ in range(125):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[123] == 1.0 and lrs[122] == pytest.approx(122 / 123)  # the peak at step 123, as int(123.4)


def test_adamw_hf_with_optimizer_offload_is_a_config_error():
    from recipes.config import ConfigError
    from recipes.trainer import make_optimizer
    with pytest.raises(ConfigError, match="adamw_hf runs on the device"):
        make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}],
                       TrainConfig(output_dir="x", optimizer="adamw_hf"), cpu_offload=True)
