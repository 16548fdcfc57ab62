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

from .layer import _CHUNK_ELEMENTS, DoRALinear


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

    The adapted weight's row magnitude is m; its direction is that of W0_i + D_i with D_i = s B_i A. With
    c = W0_i.D_i and q = ||D_i||^2 (both from factors):
        1 - cos = (||W0_i||^2 q - c^2) / (n0 n (n0 n + dot)),  dot = ||W0_i||^2 + c,  n = ||W0_i + D_i||,
    which equals 1 - dot / (n0 n) without its cancellation, so that small updates keep their digits. Everything
    is computed in float64, W0 upcast in bounded row chunks, whatever the layer's dtype.
    """
    if module.merged:
        raise ValueError("unmerge the module first: the analysis needs W0")
    w = module.weight
    rows = max(1, _CHUNK_ELEMENTS // w.shape[1])
    f64 = torch.float64
    w2, cross = [], []
    for chunk in w.split(rows):
        chunk = chunk.to(f64)
        w2.append(torch.linalg.vecdot(chunk, chunk))
        if module.lora_A is not None:
            cross.append(chunk @ module.lora_A.to(f64).t())  # (rows, r)
    w2 = torch.cat(w2)
    if module.lora_A is None:
        c = q = torch.zeros_like(w2)
    else:
        s = module.scaling
        B, A = module.lora_B.to(f64), module.lora_A.to(f64)
        c = s * torch.linalg.vecdot(B, torch.cat(cross))
        q = s * s * torch.linalg.vecdot(B, B @ (A @ A.t()))
    n0 = w2.sqrt()
    n = (w2 + 2 * c + q).clamp_min(0).sqrt()
    dot = w2 + c
    tiny = torch.finfo(f64).tiny
    direct = 1 - dot / (n0 * n).clamp_min(tiny)
    stable = (w2 * q - c * c).clamp_min(0) / (n0 * n * (n0 * n + dot)).clamp_min(tiny)
    one_minus_cos = torch.where(dot > 0, stable, direct)
    magnitude = module.magnitude.to(f64)
    return DecompositionDelta((magnitude - n0).abs().mean().item(), one_minus_cos.mean().item())


def model_decomposition_deltas(model: nn.Module) -> dict[str, DecompositionDelta]:
    """delta_M and delta_D of every DoRA layer of a model, by module name."""
    return {name: dora_decomposition_delta(m) for name, m in model.named_modules() if isinstance(m, DoRALinear)}
