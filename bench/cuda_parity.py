"""On a GPU: our DoRA and QDoRA layers against PEFT's in bf16, with the same factors (what the CPU tests check in
fp32/fp64, where no GPU runs them).

    python bench/cuda_parity.py [--json OUT]

Per case, the largest difference of the output and of each gradient relative to the largest PEFT value, ours
against PEFT; a case passes under 2e-2 (bf16 keeps 8 bits: its rounding, summed over a product, reaches ~1e-2).
Cases: a bf16 Linear stack and a bitsandbytes NF4 layer with bf16 compute (QDoRA), no dropout (the two draw their
masks from CUDA's random stream differently, so masked outputs would differ by the masks). Exit status 1 when a case fails; on a machine without a GPU it says so and
exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.filterwarnings("ignore")
TOLERANCE = 2e-2


def _copy_factors(ours: nn.Module, peft_model: nn.Module) -> None:
    """PEFT's lora_A / lora_B / magnitude of each adapted layer set to ours (B and m moved off their start)."""
    from dora import dora_modules
    layers = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, m in dora_modules(ours).items():
            m.lora_B.normal_(0, 0.02)
            m.magnitude.mul_(1.05)
            theirs = layers[f"base_model.model.{name}"]
            theirs.lora_A["default"].weight.copy_(m.lora_A)
            theirs.lora_B["default"].weight.copy_(m.lora_B)
            theirs.lora_magnitude_vector["default"].weight.copy_(m.magnitude)


def _compare(ours: nn.Module, peft_model: nn.Module, x: torch.Tensor) -> dict:
    from dora import dora_modules
    outputs = []
    for model in (ours, peft_model):
        xi = x.detach().clone().requires_grad_(True)
        y = model(xi)
        y.float().square().mean().backward()
        outputs.append((y.detach().float(), xi.grad.float()))
    (yo, xo), (yp, xp) = outputs
    layers = dict(peft_model.named_modules())
    magnitude = max(((m.magnitude.grad.float() - theirs.grad.float()).abs().max() / theirs.grad.float().abs().max())
                    .item() for name, m in dora_modules(ours).items()
                    for theirs in [layers[f"base_model.model.{name}"].lora_magnitude_vector["default"].weight])
    return {"output": ((yo - yp).abs().max() / yp.abs().max()).item(),
            "input_grad": ((xo - xp).abs().max() / xp.abs().max()).item(), "magnitude_grad": magnitude}


def stack_case() -> dict:
    from peft import LoraConfig, get_peft_model

    from dora import apply_dora
    torch.manual_seed(0)
    make = lambda: nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(4)]).cuda().bfloat16()  # noqa
    ours, theirs = make(), make()
    theirs.load_state_dict(ours.state_dict())
    apply_dora(ours, [{"match": r"\d+", "rank": 16, "alpha": 32}], verbose=False)
    peft_model = get_peft_model(theirs, LoraConfig(r=16, lora_alpha=32, target_modules=["0", "1", "2", "3"],
                                                   use_dora=True))
    _copy_factors(ours, peft_model)
    return _compare(ours.train(), peft_model.train(), torch.randn(8, 256, 1024, device="cuda", dtype=torch.bfloat16))


def qdora_case() -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from dora import apply_dora

    def make():
        layer = bnb.nn.Linear4bit(1024, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True)
        g = torch.Generator().manual_seed(0)
        layer.weight = bnb.nn.Params4bit(torch.randn(1024, 1024, generator=g) / 32, requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
        return nn.Sequential(layer).cuda()

    ours, theirs = make(), make()
    apply_dora(ours, [{"match": "0", "rank": 16, "alpha": 32}], verbose=False)
    peft_model = get_peft_model(theirs, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], use_dora=True))
    _copy_factors(ours, peft_model)
    return _compare(ours.train(), peft_model.train(), torch.randn(8, 256, 1024, device="cuda", dtype=torch.bfloat16))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/cuda_parity.py: no CUDA GPU on this machine; nothing to compare")
        return 0
    cases = {"bf16 Linear stack": stack_case, "NF4 QDoRA, bf16 compute": qdora_case}
    results, failed = {}, []
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception as e:  # report and go on: one JSON for every case
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        worst = max((v for v in results[name].values() if isinstance(v, float)), default=float("inf"))
        ok = worst < TOLERANCE
        failed += [] if ok else [name]
        print(f"{name:<34} {'ok' if ok else 'FAIL'}  {results[name]}", flush=True)
    summary = {"device": torch.cuda.get_device_name(), "tolerance": TOLERANCE, "cases": results, "failed": failed}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
