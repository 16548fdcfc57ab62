"""DoRA over a quantized base layer (QDoRA): bitsandbytes' 4-bit `Linear4bit` (NF4 / FP4, double quantization, any
compute dtype) and 8-bit `Linear8bitLt`, as transformers loads them with `BitsAndBytesConfig`.

The base weight W0 is used only through the base layer's own forward, the quantized kernel. The factored norm
needs two things of W0 (dora/layer.py, `row_norm_from_parts`):
- ||W0||^2 per row: W0 is frozen, so it is computed once, when the adapter is applied, from a dequantization one
  block of rows at a time (4-bit), or from the layer's int8 rows and their scales (8-bit), and kept (out floats);
- W0 A^T (out x r): the base layer's forward on the r rows of A.
So nothing of size out x in is formed in a training step (PEFT's QDoRA dequantizes the whole weight and builds
B @ A beside it, for every layer and step). The output is PEFT's and the official formula:
    y = g * (W0 x + s B A x~) + b                          (no dropout, or dropout on the adapter's input x~)
    y = W0 x + (g - 1) W0 x~ + g s B A x~ + b                (dropout_mode "exact": W0 also sees the dropped x~)
with g = m / ||W0 + s B A||_row (detached unless detach_norm=False), g - 1 kept in fp32 until it multiplies.

Merging cannot write into a quantized weight: `to_linear()` dequantizes, merges and returns a dense nn.Linear in
the compute dtype (bf16 / fp16 for deployment), which is what `unload_dora` uses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import DoRALinear, _accumulation_dtype, _dropped, _validated_alpha, _validated_rank

_ROWS_PER_BLOCK = 1024  # rows of the dequantized W0 upcast to fp32 at once when ||W0||^2 is computed


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt (or a subclass): a Linear whose weight is only usable through its
    own forward."""
    if not any(c.__module__.startswith("bitsandbytes") for c in type(module).__mro__):
        return False  # decided without importing bitsandbytes (slow, and it warns), which such a model has loaded
    import bitsandbytes as bnb
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """W0 of a quantized layer, dense: 4-bit in the dtype it was quantized from, 8-bit in fp32."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(layer)
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward on an AVX512-BF16 CPU
            unpack = getattr(bf, "_convert_weight_packed_for_cpu_inverse", None)  # bitsandbytes' own, private
            if unpack is None:
                raise RuntimeError("this bitsandbytes repacked the 4-bit weight for its CPU kernel and offers no "
                                   "way back: dequantize before any inference forward, or on a GPU")
            data, state = unpack(data, state)
        return bf.dequantize_4bit(data, state)
    cb, scb = _int8_rows(layer)
    return cb.float() * (scb.float() / 127.0)[:, None]


def _int8_rows(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, per-row absmax) of a Linear8bitLt: W0 = CB * SCB / 127."""
    w = layer.weight
    cb = getattr(w, "CB", None)
    scb = getattr(w, "SCB", None)
    if cb is None:  # after a first forward bitsandbytes may keep them in the layer's state only
        cb, scb = layer.state.CB, layer.state.SCB
    if cb is None or scb is None:
        raise ValueError("the Linear8bitLt holds no int8 weight (CB / SCB): quantize it first (move it to its device)")
    return cb, scb


@torch.no_grad()
def quantized_sq_norm(layer: nn.Module) -> torch.Tensor:
    """||W0||^2 per row in fp32, once per layer when the adapter is applied: 4-bit from its dequantization (one
    layer's dense copy, transient; upcast a block of rows at a time), 8-bit from its int8 rows and scales."""
    import bitsandbytes as bnb

    if not isinstance(layer, bnb.nn.Linear4bit):
        cb, scb = _int8_rows(layer)
        return cb.float().square().sum(dim=1) * (scb.float() / 127.0).square()
    out = layer.out_features
    dense = dequantized_weight(layer)
    return torch.cat([dense[i:i + _ROWS_PER_BLOCK].float().square().sum(dim=1)
                      for i in range(0, out, _ROWS_PER_BLOCK)])


class QuantizedDoRALinear(DoRALinear):
    """A DoRA layer whose frozen base is a quantized Linear (`base_layer`), used only through its forward.

    `weight` is the base layer's quantized weight (for the norm caches, which follow its version counter); the bias
    is taken from the base layer, which then computes W0 x alone. Options, saving, loading and PEFT export are
    those of DoRALinear."""

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0, *, dropout: float = 0.0,
                 dropout_mode: str = "exact", magnitude_only: bool = False, detach_norm: bool = True,
                 rslora: bool = False, inplace_safe: bool = False, adapter_dtype=None):
        nn.Module.__init__(self)
        if not is_quantized_linear(base_layer):
            raise TypeError(f"QuantizedDoRALinear wraps a bitsandbytes Linear4bit / Linear8bitLt, got "
                            f"{type(base_layer).__name__}")
        if not magnitude_only:
            rank, alpha = _validated_rank(rank), _validated_alpha(alpha)
        self._set_options(base_layer.in_features, base_layer.out_features, rank, alpha, dropout, dropout_mode,
                          magnitude_only, detach_norm, rslora, inplace_safe)
        bias = base_layer.bias
        base_layer.bias = None  # W0 x alone from the base layer; the bias is added after the scaling, unscaled
        self.base_layer = base_layer.requires_grad_(False)
        self.bias = None if bias is None else nn.Parameter(bias.data, requires_grad=False)
        device = base_layer.weight.device
        self._make_adapter(device, adapter_dtype or torch.float32)
        # fp32 whatever .half() / .bfloat16() does to the module (not a buffer: those are cast); moved with it
        self.base_sq_norm = quantized_sq_norm(base_layer).to(device)
        self.reset_adapter()
        self.train(base_layer.training)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int = 8, alpha: float = 16.0, **options) -> "QuantizedDoRALinear":
        options.pop("device", None), options.pop("dtype", None)
        return cls(linear, rank, alpha, **options)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.base_sq_norm = self.base_sq_norm.to(fn(torch.empty(0, device=self.base_sq_norm.device)).device)
        return module

    def _original_dtype(self) -> torch.dtype:
        """The dtype the model held this layer in: a 4-bit weight's pre-quantization dtype, else its bias's."""
        state = getattr(self.base_layer.weight, "quant_state", None)
        if state is not None and getattr(state, "dtype", None) is not None:
            return state.dtype
        return self.bias.dtype if self.bias is not None else torch.float32

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the base kernel computes in: a Linear4bit's compute_dtype, else the input's (floating)."""
        dtype = getattr(self.base_layer, "compute_dtype", None)
        return dtype or (x.dtype if x.is_floating_point() else torch.float32)

    def reset_parameters(self) -> None:
        raise RuntimeError("the base weight of a QuantizedDoRALinear is the quantized layer's: reset_adapter() "
                           "resets what is trained")

    # ----------------------------------------------------------------------------------------- norm parts
    def dense_weight(self) -> torch.Tensor:
        return dequantized_weight(self.base_layer)

    def _base_sq_norm(self) -> torch.Tensor:
        return self.base_sq_norm

    def _weight_sq_norm(self) -> torch.Tensor:
        return self.base_sq_norm  # W0 is frozen: computed once, when the adapter was applied

    def _base_cross(self, lora_A: torch.Tensor) -> torch.Tensor:
        """W0 A^T (out, r): the base layer's forward on the r rows of A."""
        dtype = getattr(self.base_layer, "compute_dtype", None) or lora_A.dtype
        return self.base_layer(lora_A.to(dtype)).t()

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":
            raise ValueError(f"QuantizedDoRALinear({self.in_features} -> {self.out_features}): x on the meta device")
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._forward(x.to(dtype), dtype)
        # computed in the kernel's dtype, returned in the input's, as the 4-bit layer it replaces does (an fp32
        # compute dtype must not promote a bf16 model's hidden states)
        return self._forward(x, self.compute_dtype(x)).to(x.dtype)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        lora_A = None if self.lora_A is None else self.lora_A.to(dtype)
        lora_B = None if self.lora_B is None else self.lora_B.to(dtype)
        dropping = self.training and self.dropout > 0.0
        keep = 1.0 - self.dropout
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep) if dropping else None
        x_drop = x if mask is None else _dropped(x, mask, keep)
        trainable = (self.magnitude, self.lora_A, self.lora_B)
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p is not None and p.requires_grad
                                                                    for p in trainable)):
            gm1 = self._cached_gm1(dtype)
        else:
            gm1 = (self._scale() - 1.0).to(dtype)  # differentiable in m (and A, B without detach_norm)
        base = self.base_layer(x).to(dtype)  # W0 x, through the quantized kernel
        lora = None
        if lora_A is not None:
            lora = F.linear(F.linear(x_drop, lora_A), lora_B) * self.scaling
        if dropping and self.dropout_mode == "exact":
            # W0 x + (g - 1) W0 x~ + g s B A x~
            y = base + gm1 * self.base_layer(x_drop).to(dtype)
            if lora is not None:
                y = y + lora + gm1 * lora
        else:
            v = base if lora is None else base + lora  # g * v = v + (g - 1) v: small changes of g survive bf16
            y = v + gm1 * v
        return y if bias is None else y + bias

    # ----------------------------------------------------------------------------------------- merge
    def merge(self) -> None:
        raise RuntimeError("a quantized weight cannot hold the merged W: use to_linear() (or dora.unload_dora), "
                           "which dequantizes, merges and returns a dense nn.Linear in the compute dtype")

    def unmerge(self) -> None:
        return

    @torch.no_grad()
    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A dense nn.Linear holding g * (W0 + s B A) with W0 dequantized, in `dtype` (default: the dtype the model
        held this layer in), in this layer's training / eval mode."""
        dense = dequantized_weight(self.base_layer)
        dtype = dtype or self._original_dtype()
        merged = dense.to(_accumulation_dtype(dense), copy=True)
        if self.lora_A is not None:
            merged.addmm_(self.lora_B.to(merged.dtype), self.lora_A.to(merged.dtype), alpha=self.scaling)
        g = self.magnitude.to(merged.dtype) / self.weight_norm().to(merged.dtype)
        merged.mul_(g[:, None])
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=merged.device,
                           dtype=dtype)
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.train(self.training)


@torch.no_grad()
def dequantize_linears(model: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Replace every quantized Linear left in `model` (the layers no rule adapted) by a dense nn.Linear holding its
    dequantized weight, in `dtype` (default: its compute dtype): a model to save and serve without bitsandbytes.
    Returns how many were replaced. Drops `quantization_config` from the model's configs."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        weight = dequantized_weight(module)
        target = dtype or getattr(module, "compute_dtype", None) or weight.dtype
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=target)
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense.train(module.training))
        replaced += 1
    # what transformers' own dequantize() forgets of a model it loaded quantized, so that it saves, loads and casts
    # as a plain model
    for config in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        for key in ("quantization_config", "_pre_quantization_dtype"):
            if config is not None and hasattr(config, key):
                delattr(config, key)
    for key in ("hf_quantizer", "quantization_method"):
        if hasattr(model, key):
            delattr(model, key)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return replaced
