"""Weight-decomposition analysis (paper section 2.2): how much fine-tuning changed magnitude and direction.

For a weight W (PyTorch layout, one row per output) and its pre-trained W0:
    delta_M = mean_i | ||W_i|| - ||W0_i|| |            delta_D = mean_i (1 - cos(W_i, W0_i))
The paper plots delta_D against delta_M per layer and training step: full fine-tuning and DoRA show a
negative slope, LoRA a positive one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .layer import DoRALinear, factored_row_norm, squared_row_norm


@dataclass(frozen=True)
class DecompositionDelta:
    magnitude: float  # delta_M
    direction: float  # delta_D


def decomposition_delta(weight: torch.Tensor, base_weight: torch.Tensor) -> DecompositionDelta:
    """delta_M and delta_D between a (fine-tuned) weight and the pre-trained one, both (out, in)."""
    w, w0 = weight.double(), base_weight.double()
    norm, norm0 = w.norm(dim=1), w0.norm(dim=1)
    cos = (w * w0).sum(dim=1) / (norm * norm0).clamp_min(torch.finfo(torch.float64).tiny)
    return DecompositionDelta((norm - norm0).abs().mean().item(), (1 - cos).mean().item())


@torch.no_grad()
def dora_decomposition_delta(module: DoRALinear) -> DecompositionDelta:
    """delta_M and delta_D of an unmerged DoRA layer against its frozen W0, from factors (no out x in matrix).

    The adapted weight's row magnitude is m; its direction is that of W0 + sBA, and
    cos(W0_i + s B_i A, W0_i) = (||W0_i||^2 + s B_i.(A W0_i^T)) / (||W0_i|| ||W0_i + s B_i A||).
    """
    if module.merged:
        raise ValueError("unmerge the module first: the analysis needs W0")
    w = module.weight
    w2 = squared_row_norm(w).double()
    norm0 = w2.sqrt()
    norm = factored_row_norm(w, module.lora_A, module.lora_B, module.scaling).double()
    dot = w2.clone()
    if module.lora_A is not None:
        cross = (w @ module.lora_A.to(w.dtype).t()).double()
        dot += module.scaling * (module.lora_B.double() * cross).sum(dim=1)
    tiny = torch.finfo(torch.float64).tiny
    cos = dot / (norm0 * norm).clamp_min(tiny)
    magnitude = module.magnitude.double()
    return DecompositionDelta((magnitude - norm0).abs().mean().item(), (1 - cos).mean().item())


def model_decomposition_deltas(model: nn.Module) -> dict[str, DecompositionDelta]:
    """delta_M and delta_D of every DoRA layer of a model, by module name."""
    return {name: dora_decomposition_delta(m) for name, m in model.named_modules() if isinstance(m, DoRALinear)}
