"""The DoRA linear layer (Liu et al., 2024, arXiv 2402.09353).

    W' = m * (W0 + s*B@A) / ||W0 + s*B@A||_row        y = g * (W0 x + s*B A x) + b,   g = m / ||.||_row

W0 is (out, in) as in nn.Linear, so the norm is taken per output row and m has shape (out,).

What this implementation does differently from PEFT / torchtune / the official code:
- The row norm is computed from factors and never materialises the out x in matrix W0 + s*B@A:
      ||W0_i + s B_i A||^2 = ||W0_i||^2 + 2s B_i.(A W0_i^T) + s^2 B_i (A A^T) B_i^T
  ||W0||^2 is cached (W0 is frozen), the cross term costs one (out x in x r) GEMM, the Gram term is r x r.
- With the paper's detached norm (section 4.3) the norm is a constant of the parameters, so it is computed
  once per optimizer step and reused by gradient-accumulation micro-steps and activation-checkpoint
  recomputation.
- The scaled output is produced by one autograd Function that keeps no extra copy of the output for the
  magnitude gradient: it saves its own output y and recovers the unscaled output as (y - b) / g.
- g - 1 is applied in the compute dtype, so bf16/fp16 weights keep small magnitude changes (bf16 cannot
  represent 1 + 1e-3, but represents 1e-3 fine).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

DROPOUT_MODES = ("exact", "lora-branch")

# Bumped after every optimizer step in this process (any torch.optim.Optimizer, including the ones inside
# DeepSpeed). Part of the norm-cache key: DeepSpeed writes updated weights through `.data`, which does not
# bump a tensor's version counter, so versions alone cannot tell that an optimizer step happened.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)

_CHUNK_ELEMENTS = 1 << 22  # rows are upcast to fp32 in chunks of at most this many elements


def _accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def squared_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 per row in fp32 (fp64 for fp64 W); a low-precision W is upcast in bounded row chunks."""
    acc = _accumulation_dtype(weight)
    if weight.dtype == acc:
        return torch.linalg.vector_norm(weight, dim=1).square()
    rows = max(1, _CHUNK_ELEMENTS // weight.shape[1])
    return torch.cat([torch.linalg.vector_norm(c.to(acc), dim=1).square() for c in weight.split(rows)])


def factored_row_norm(
    weight: torch.Tensor,
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    weight_sq_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """||W + s*B@A|| per row, in fp32, from factors: no out x in temporary.

    Differentiable in lora_A and lora_B (the non-detached variant); `weight_sq_norm` is ||W||^2 per row
    when the caller has it cached.
    """
    acc = _accumulation_dtype(weight)
    w2 = squared_row_norm(weight) if weight_sq_norm is None else weight_sq_norm
    tiny = torch.finfo(torch.float32).tiny
    if lora_A is None:
        return w2.clamp_min(tiny).sqrt()
    B = lora_B.to(acc)
    # (out, r): the base GEMM applied to the r rows of A. A low-precision W stays in its dtype (the GEMM
    # accumulates in fp32); only the small product is upcast.
    cross = (weight @ lora_A.to(weight.dtype).t()).to(acc)
    gram = lora_A.to(acc) @ lora_A.to(acc).t()  # (r, r)
    # n2 = ||W||^2 + rowsum(B * (2s (W A^T) + s^2 B (A A^T)))
    n2 = torch.linalg.vecdot(B, torch.addmm(cross, B, gram, beta=2.0 * scaling, alpha=scaling * scaling)).add_(w2)
    # Clamp: zero rows of W0 + s*B@A (pruned weights) would give 0/0 = NaN (PEFT issue #2049); the factored
    # sum can also round slightly below zero when the row nearly cancels.
    return n2.clamp_min(tiny).sqrt()


def _scaled_output(x, x_lora, weight, bias, lora_A, lora_B, gm1, scaling):
    """y = (1 + gm1) * (x W^T + s (x_lora A^T) B^T) (+ b, in place), with one allocation of y; returns (y, xa)."""
    y = F.linear(x, weight)
    xa = None
    if lora_A is not None:
        xa = F.linear(x if x_lora is None else x_lora, lora_A)
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_B.t(), alpha=scaling)
    y.addcmul_(y, gm1)
    if bias is not None:
        y.add_(bias)
    return y, xa


class _DoRAScaledLinear(torch.autograd.Function):
    """y = u + b with u = g * (x W^T + s * (x_lora A^T) B^T), g an fp32 (out,) vector; x_lora is dropout(x),
    or None for x itself.

    One node for the whole layer, so that its input gradient is one tensor (g dL/dy W + s (g dL/dy B) A,
    accumulated in place) and nothing is saved twice. The magnitude gradient needs u (sum_t dL/dy * u / g). A layer
    without bias returns u itself and saves it: no extra memory when the next op keeps its input anyway (a linear
    layer, attention's v, SwiGLU's gate and up). With a bias, or with `inplace_safe`, the output is a separate
    tensor and u is kept: one output-sized tensor, exact in bf16 (u recovered as y - b would lose the digits that
    a large bias takes), and the output may be modified in place.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, g, scaling, inplace_safe):
        gm1 = (g - 1.0).to(x.dtype)
        u, xa = _scaled_output(x, x_lora, weight, None, lora_A, lora_B, gm1, scaling)
        if bias is not None:
            y = torch.add(u, bias)
        elif inplace_safe:
            y = u.clone()
        else:
            y = u
        ctx.scaling = scaling
        ctx.save_for_backward(x if x_lora is None else x_lora, xa, weight, lora_A, lora_B, g, gm1,
                              u if ctx.needs_input_grad[6] else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_in, xa, weight, lora_A, lora_B, g, gm1, u = ctx.saved_tensors
        s = ctx.scaling
        out = weight.shape[0]
        need_x, need_x_lora, _, need_b, need_A, need_B, need_g, _, _ = ctx.needs_input_grad
        acc = g.dtype  # fp32 (fp64 for fp64 weights)
        grad_y = grad_y.contiguous()  # e.g. when the output was used transposed

        grad_b = grad_y.view(-1, out).sum(dim=0, dtype=acc) if need_b else None
        grad_g = buffer = None
        if need_g:
            buffer = torch.mul(grad_y, u)
            # A row with g == 0 (magnitude exactly 0) has u = 0, so its gradient is 0: exact when W0's row is
            # zero too, which is how such rows arise (m starts at ||W0 row|| = 0).
            grad_g = buffer.view(-1, out).sum(dim=0, dtype=acc) / torch.where(g == 0, 1.0, g)
        grad_h = torch.addcmul(grad_y, grad_y, gm1, out=buffer)  # dL/dh = g * dL/dy, in the same buffer
        # Gradients keep the inputs' N-d shapes (matmul, not a view of mm): autograd accumulates a view
        # out of place, which would cost one more copy of the input gradient.
        grad_x = torch.matmul(grad_h, weight) if need_x else None
        grad_x_lora = grad_A = grad_B = None
        if lora_A is not None:
            gh2 = grad_h.view(-1, out)
            if need_B:
                grad_B = (gh2.t() @ xa.view(-1, xa.shape[-1])).mul_(s)
            grad_xa = torch.matmul(grad_h, lora_B * s)  # (..., r)
            if need_A:
                grad_A = grad_xa.view(-1, grad_xa.shape[-1]).t() @ x_in.reshape(-1, x_in.shape[-1])
            if need_x_lora:
                grad_x_lora = torch.matmul(grad_xa, lora_A)
            elif need_x:
                grad_x.view(-1, grad_x.shape[-1]).addmm_(grad_xa.view(-1, grad_xa.shape[-1]), lora_A)
        grad_b = grad_b.to(weight.dtype) if need_b else None
        return grad_x, grad_x_lora, None, grad_b, grad_A, grad_B, grad_g, None, None


class DoRALinear(nn.Module):
    """A drop-in replacement for nn.Linear with a DoRA adapter.

    Owns weight, bias, lora_A, lora_B and magnitude directly (no wrapped base layer), so DeepSpeed ZeRO-3
    gathers all of them in this module's own forward hook.

    Args:
        rank, alpha: LoRA rank r and alpha; the scale is alpha / r (alpha / sqrt(r) with `rslora`).
        dropout: dropout probability on the adapter input.
        dropout_mode: "exact" (official DoRA / PEFT): y = W0 x + (g-1) W0 drop(x) + g s B A drop(x) + b, which
            costs a second base GEMM while dropout is active; "lora-branch": y = g (W0 x + s B A drop(x)) + b,
            one GEMM. The two agree when dropout is 0 or in eval mode.
        magnitude_only: no A, B; only m is trained (the paper's tuning-granularity setting).
        detach_norm: treat ||W0 + sBA|| as a constant in backward (paper section 4.3; default). False
            back-propagates through the norm into A and B.
        inplace_safe: the next op modifies this layer's output in place (nn.ReLU(inplace=True)). A layer without
            bias saves its own output for the magnitude gradient, which such an op would change (autograd then
            raises); with this option the output is a separate tensor (one output-sized tensor more).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16.0,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        dropout_mode: str = "exact",
        magnitude_only: bool = False,
        detach_norm: bool = True,
        rslora: bool = False,
        inplace_safe: bool = False,
        device=None,
        dtype=None,
        adapter_dtype=None,
    ):
        super().__init__()
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not magnitude_only and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank = 0 if magnitude_only else int(rank)
        self.alpha = float(alpha)
        self.rslora = bool(rslora)
        self.dropout = float(dropout)
        self.dropout_mode = dropout_mode
        self.magnitude_only = bool(magnitude_only)
        self.detach_norm = bool(detach_norm)
        self.inplace_safe = bool(inplace_safe)
        self.scaling = 0.0 if magnitude_only else (alpha / math.sqrt(rank) if rslora else alpha / rank)

        factory = {"device": device, "dtype": dtype}
        if adapter_dtype is None:
            adapter_dtype = dtype if dtype in (None, torch.float32, torch.float64) else torch.float32
        adapter = {"device": device, "dtype": adapter_dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        if magnitude_only:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        else:
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, **adapter))
            self.lora_B = nn.Parameter(torch.empty(out_features, rank, **adapter))
        self.magnitude = nn.Parameter(torch.empty(out_features, **adapter))
        self.merged = False
        self._merge_norm: Optional[torch.Tensor] = None  # the norm at merge time; exact unmerge needs it
        self.norm_computations = 0  # how many times the row norm was computed (observability and tests)
        self._clear_caches()
        if self.weight.device.type != "meta":
            self.reset_parameters()

    # ----------------------------------------------------------------------------------------- creation
    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, **options) -> "DoRALinear":
        """Wrap an existing nn.Linear: its weight and bias Parameters are taken over as they are (no copy)."""
        w = linear.weight
        # Built on the meta device so that no second base weight is allocated, then given the real one.
        module = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None,
                     device="meta", dtype=w.dtype, **options)
        module.weight = w.requires_grad_(False)
        if linear.bias is not None:
            module.bias = linear.bias.requires_grad_(False)
        for name in ("lora_A", "lora_B", "magnitude"):
            p = getattr(module, name)
            if p is not None:
                setattr(module, name, nn.Parameter(torch.empty_like(p, device=w.device)))
        module.reset_adapter()
        return module

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Base weight and bias as nn.Linear initialises them, then a fresh adapter."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A: Kaiming-uniform (as nn.Linear and LoRA), B: zeros, m: ||W0||_row, so that W' == W0."""
        if self.merged:
            raise RuntimeError("unmerge before resetting the adapter")
        if self.lora_A is not None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        self._clear_caches()
        self.magnitude.copy_(squared_row_norm(self.weight).sqrt())

    def extra_repr(self) -> str:
        kind = "magnitude_only" if self.magnitude_only else f"rank={self.rank}, alpha={self.alpha:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"bias={self.bias is not None}, dropout={self.dropout:g} ({self.dropout_mode}), "
                f"detach_norm={self.detach_norm}, merged={self.merged}")

    # ----------------------------------------------------------------------------------------- norm and caches
    def _clear_caches(self) -> None:
        self._w2 = None
        self._w2_key = None
        self._norm = None
        self._norm_key = None
        self._gm1 = None
        self._gm1_key = None

    def invalidate_norm_cache(self) -> None:
        """Call after editing weight / lora_A / lora_B through `.data` outside an optimizer step."""
        self._clear_caches()

    def _weight_sq_norm(self) -> torch.Tensor:
        w = self.weight
        key = (w._version, w.device, w.dtype, w.shape, torch.is_inference_mode_enabled())
        if self._w2_key != key:
            with torch.no_grad():
                self._w2 = squared_row_norm(w)
            self._w2_key = key
        return self._w2

    def _norm_cache_key(self):
        # inference mode is part of the key: a tensor made under it cannot be saved for a later backward
        key = (_optimizer_steps, self.weight._version, self.weight.device, self.weight.dtype,
               torch.is_inference_mode_enabled())
        if self.lora_A is not None:
            key += (self.lora_A._version, self.lora_B._version)
        return key

    def weight_norm(self, differentiable: bool = False) -> torch.Tensor:
        """||W0 + s*B@A||_row in fp32. Cached unless `differentiable` (the non-detached variant)."""
        if differentiable:
            self.norm_computations += 1
            return factored_row_norm(self.weight, self.lora_A, self.lora_B, self.scaling, self._weight_sq_norm())
        key = self._norm_cache_key()
        if self._norm_key != key:
            with torch.no_grad():
                self._norm = factored_row_norm(
                    self.weight, self.lora_A, self.lora_B, self.scaling, self._weight_sq_norm())
            self.norm_computations += 1
            self._norm_key = key
        return self._norm

    def _needs_norm_graph(self) -> bool:
        return (not self.detach_norm and not self.magnitude_only and torch.is_grad_enabled()
                and (self.lora_A.requires_grad or self.lora_B.requires_grad))

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._forward(x.to(dtype), dtype)
        return self._forward(x, self.weight.dtype)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("DoRALinear keeps its base weight frozen; its `weight` must not require grad")
        weight = self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        lora_A = None if self.lora_A is None else self.lora_A.to(dtype)
        lora_B = None if self.lora_B is None else self.lora_B.to(dtype)
        dropping = self.training and self.dropout > 0.0
        x_lora = F.dropout(x, self.dropout, training=True) if dropping else None
        if dropping and self.dropout_mode == "exact":
            return self._forward_exact_dropout(x, x_lora, weight, bias, lora_A, lora_B)

        trainable = (self.magnitude, self.lora_A, self.lora_B, self.bias)
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p is not None and p.requires_grad
                                                                    for p in trainable)):
            return _scaled_output(x, x_lora, weight, bias, lora_A, lora_B, self._cached_gm1(dtype),
                                  self.scaling)[0]
        return _DoRAScaledLinear.apply(x, x_lora, weight, bias, lora_A, lora_B, self._scale(), self.scaling,
                                       self.inplace_safe)

    def _scale(self) -> torch.Tensor:
        """g = m / ||W0 + sBA||_row in fp32, differentiable in m (and in A, B without detach_norm)."""
        norm = self.weight_norm(differentiable=self._needs_norm_graph())
        return self.magnitude.to(norm.dtype) / norm

    def _cached_gm1(self, dtype: torch.dtype) -> torch.Tensor:
        # Inference: g - 1 cached in the compute dtype, keyed on the norm and the magnitude.
        key = (self._norm_cache_key(), self.magnitude._version, self.magnitude.device, dtype)
        if self._gm1_key != key:
            norm = self.weight_norm()
            self._gm1 = (self.magnitude.to(norm.dtype) / norm - 1.0).to(dtype)
            self._gm1_key = key
        return self._gm1

    def _forward_exact_dropout(self, x, x_drop, weight, bias, lora_A, lora_B):
        # y = W0 x + b + (g - 1) * (W0 drop(x) + s B A drop(x)) + s B A drop(x): a second base GEMM.
        gm1 = (self._scale() - 1.0).to(x.dtype)
        h_drop = F.linear(x_drop, weight)
        if lora_A is None:
            return F.linear(x, weight, bias) + gm1 * h_drop
        lora = F.linear(F.linear(x_drop, lora_A), lora_B) * self.scaling
        return F.linear(x, weight, bias) + gm1 * (h_drop + lora) + lora

    # ----------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """W <- g * (W0 + s*B@A). Keeps the norm so that `unmerge` restores W0 (up to rounding)."""
        if self.merged:
            return
        norm = self.weight_norm()
        g = self.magnitude.to(norm.dtype) / norm
        w = self.weight
        merged = w.to(_accumulation_dtype(w), copy=True)
        if self.lora_A is not None:
            merged.addmm_(self.lora_B.to(merged.dtype), self.lora_A.to(merged.dtype), alpha=self.scaling)
        merged.mul_(g.to(merged.dtype)[:, None])
        w.copy_(merged)
        self._merge_norm = norm.clone()
        self.merged = True
        self._clear_caches()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        g = self.magnitude.to(self._merge_norm.dtype) / self._merge_norm
        w = self.weight
        base = w.to(_accumulation_dtype(w), copy=True)
        base.div_(g.to(base.dtype)[:, None])
        if self.lora_A is not None:
            base.addmm_(self.lora_B.to(base.dtype), self.lora_A.to(base.dtype), alpha=-self.scaling)
        w.copy_(base)
        self._merge_norm = None
        self.merged = False
        self._clear_caches()

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (merges first)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear
