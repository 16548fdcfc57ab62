"""The DoRA linear layer (Liu et al., 2024, arXiv 2402.09353).

    W' = m * (W0 + s*B@A) / ||W0 + s*B@A||_row        y = g * (W0 x + s*B A x) + b,   g = m / ||.||_row

W0 is (out, in) as in nn.Linear, so the norm is taken per output row and m has shape (out,).

What this implementation does differently from PEFT / torchtune / the official code:
- The row norm is computed from factors and never materialises the out x in matrix W0 + s*B@A:
      ||W0_i + s B_i A||^2 = ||W0_i||^2 + 2s B_i.(A W0_i^T) + s^2 B_i (A A^T) B_i^T
  ||W0||^2 is cached (W0 is frozen), the cross term costs one (out x in x r) GEMM, the Gram term is r x r.
- With the paper's detached norm (section 4.3) the norm is a constant of the parameters, so it is computed
  once per optimizer step and reused by gradient-accumulation micro-steps and activation-checkpoint
  recomputation (see `DoRALinear` for when the cache is refreshed).
- The whole layer is one autograd Function, also with dropout in either mode. For the magnitude gradient it
  keeps (W0 + sBA) x (no dropout, lora-branch) or the adapted output of the dropped input (W0 + sBA) drop(x)
  (exact dropout): one output-sized tensor, none when a layer without bias and without exact dropout returns
  u = g * (W0 + sBA) x itself and divides by g in backward (only while every |g| >= 1/16: see _SMALL_SCALE).
- g - 1, not g, multiplies the output, in the compute dtype: bf16 cannot represent g = 1.003 (it rounds to
  1.0) but represents 0.003, so small magnitude changes survive bf16/fp16 weights.
- The exact dropout form needs the base weight applied to the dropped input too. On CPU, at small dropout
  probabilities p, that second base GEMM is a sparse product over the dropped entries (density p):
      W0 x~ = (W0 x - W0 r) / keep,  r = x at the dropped positions, 0 elsewhere
  and its backward counterpart a sampled product at those positions (see `SPARSE_DROPOUT`).
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

DROPOUT_MODES = ("exact", "lora-branch")

# The exact dropout form's second base GEMM, W0 x~, from the dropped entries alone (`_sparse_dropped_products`):
# "auto" where that is faster (CPU, fp32 / fp64, dropout <= SPARSE_DROPOUT_MAX_P, at least SPARSE_DROPOUT_MIN_ROWS
# rows, i.e. tokens, and at least SPARSE_DROPOUT_MIN_WEIGHT weight elements), "always" wherever it is supported
# (CPU, fp32 / fp64: PyTorch's CPU CSR kernels have no bf16; not under torch.compile), "never". CUDA stays dense:
# cuSPARSE at a random 5 % density is not expected to beat a dense tensor-core GEMM (not measured: no GPU here).
# The form saves the dropped entries' int64 positions instead of the bool mask: less memory up to p = 1/8, up to
# 8p bytes per input element above that ("always" only).
SPARSE_DROPOUT = "auto"
SPARSE_DROPOUT_FORMS = ("auto", "always", "never")
# One layer's forward + backward on CPU in fp32 (rank 16, 1 and 2 threads, out x in from 1024 x 1024 to 4096 x 4096)
# with 256 or 1024 rows took 0.62-0.89x the dense form's time at p = 0.05, 0.69-0.96x at 0.1, 0.78-1.02x at 0.15,
# 0.88-1.12x at 0.2, 1.03-1.21x at 0.3; with 16 to 128 rows 0.74-1.46x at p = 0.05 (mostly above 1x at 2 threads).
# Narrow layers lose: 96 x 96 to 192 x 96 took 0.97-1.38x (256 / 1024 rows, 1 and 2 threads), 256 x 256 0.70-0.98x.
SPARSE_DROPOUT_MAX_P = 0.1
SPARSE_DROPOUT_MIN_ROWS = 256
SPARSE_DROPOUT_MIN_WEIGHT = 256 * 256
_SPARSE_CHUNK_ELEMENTS = 1 << 18  # W0 elements per sparse product (see `_weight_row_chunks`)

# Bumped after every optimizer step in this process (any torch.optim.Optimizer, including the ones inside
# DeepSpeed). Part of every cache key: DeepSpeed writes updated weights through `.data`, which does not
# bump a tensor's version counter, so versions alone cannot tell that an optimizer step happened.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)

_CHUNK_ELEMENTS = 1 << 22  # rows are upcast to fp32 in chunks of at most this many elements

# Below this |g| = |m| / ||W0 + sBA|| a bias-free layer keeps its unscaled output for the magnitude gradient (one
# output-sized tensor) instead of recovering it from its output as u / g (see _DoRAScaledLinear): at g = 1/16 that
# division costs about 17 units of rounding, at g = 0 everything. Training keeps g near 1 (m starts at the norm).
_SMALL_SCALE = 1.0 / 16


def _validated_rank(rank) -> int:
    # bool is an int to Python, and a float or str rank used to fail deep inside torch.empty
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an integer, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    return int(rank)


def _validated_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a finite number > 0, got {alpha!r} ({type(alpha).__name__})")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}: the update s B A is scaled by "
                         f"s = alpha / rank, so at alpha 0 lora_A and lora_B never get a gradient")
    return float(alpha)


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
    w2 = squared_row_norm(weight) if weight_sq_norm is None else weight_sq_norm
    # (out, r): the base GEMM applied to the r rows of A. A low-precision W stays in its dtype (the GEMM
    # accumulates in fp32); only the small product is upcast.
    cross = None if lora_A is None else weight @ lora_A.to(weight.dtype).t()
    return row_norm_from_parts(w2, cross, lora_A, lora_B, scaling, _accumulation_dtype(weight))


def row_norm_from_parts(w2: torch.Tensor, cross: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                        lora_B: Optional[torch.Tensor], scaling: float,
                        acc: torch.dtype = torch.float32) -> torch.Tensor:
    """||W + s*B@A|| per row from ||W||^2 per row and W A^T (out, r): the two things the norm needs of W, so that
    a base W that is only reachable through its own forward (a quantized layer) gives them too."""
    tiny = torch.finfo(torch.float32).tiny
    if lora_A is None:
        return w2.clamp_min(tiny).sqrt()
    B = lora_B.to(acc)
    cross = cross.to(acc)
    gram = lora_A.to(acc) @ lora_A.to(acc).t()  # (r, r)
    # n2 = ||W||^2 + rowsum(B * (2s (W A^T) + s^2 B (A A^T)))
    n2 = torch.linalg.vecdot(B, torch.addmm(cross, B, gram, beta=2.0 * scaling, alpha=scaling * scaling)).add_(w2)
    # Clamp: zero rows of W0 + s*B@A (pruned weights) would give 0/0 = NaN (PEFT issue #2049); the factored
    # sum can also round slightly below zero when the row nearly cancels.
    return n2.clamp_min(tiny).sqrt()


class _NormCache:
    """One cached tensor and what it was computed from.

    It is valid while every source is still the same tensor object (held weakly: a parameter that was replaced
    is neither kept alive nor mistaken for its successor, whose version counter may well be equal) with the same
    version counter, and the stamp (optimizer steps, inference mode, ...) is unchanged. Copies and pickles of
    a cache are empty, so a deep-copied or unpickled layer computes its own.
    """

    __slots__ = ("value", "_sources", "_stamp")

    def __init__(self):
        self.clear()

    def __reduce__(self):
        return (_NormCache, ())

    def clear(self) -> None:
        self.value = None
        self._sources = ()
        self._stamp = None

    def get(self, sources: Sequence[torch.Tensor], stamp: tuple) -> Optional[torch.Tensor]:
        if self.value is None or stamp != self._stamp or len(sources) != len(self._sources):
            return None
        for (ref, version), t in zip(self._sources, sources):
            if ref() is not t or t._version != version:
                return None
        return self.value

    def put(self, value: torch.Tensor, sources: Sequence[torch.Tensor], stamp: tuple) -> torch.Tensor:
        self.value = value
        self._sources = tuple((weakref.ref(t), t._version) for t in sources)
        self._stamp = stamp
        return value


def _add_low_rank(out: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """out += s * xa B^T, in place, for any number of leading dimensions."""
    out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_B.t(), alpha=scaling)


def _dropped(x: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """dropout(x) for a given keep mask (bool, x's shape) and keep probability: x * mask / keep."""
    return torch.mul(x, mask).mul_(1.0 / keep)


def _unscaled_output(x, x_drop, weight, lora_A, lora_B, scaling):
    """v = x W^T + s (x_drop A^T) B^T; x_drop is the adapter's input (dropout(x) in the lora-branch mode), None for
    x itself. Returns (v, xa)."""
    v = F.linear(x, weight)
    xa = None
    if lora_A is not None:
        xa = F.linear(x if x_drop is None else x_drop, lora_A)
        _add_low_rank(v, xa, lora_B, scaling)
    return v, xa


def _scaled_output(x, x_drop, weight, bias, lora_A, lora_B, gm1, scaling):
    """y = (1 + gm1) * v (+ b), v as `_unscaled_output`, in place: one allocation of y. Returns (y, xa)."""
    y, xa = _unscaled_output(x, x_drop, weight, lora_A, lora_B, scaling)
    y.addcmul_(y, gm1)
    if bias is not None:
        y.add_(bias)
    return y, xa


def _sparse_dropout(x: torch.Tensor, weight: torch.Tensor, keep: float) -> bool:
    """Whether the exact dropout form of this input takes the sparse form (see `SPARSE_DROPOUT`). Not under
    torch.compile: the number of dropped entries is data-dependent (nonzero), which would break the graph."""
    if SPARSE_DROPOUT not in SPARSE_DROPOUT_FORMS:
        raise ValueError(f"SPARSE_DROPOUT must be one of {SPARSE_DROPOUT_FORMS}, got {SPARSE_DROPOUT!r}")
    if (SPARSE_DROPOUT == "never" or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or torch.compiler.is_compiling()):
        return False
    return SPARSE_DROPOUT == "always" or (1.0 - keep <= SPARSE_DROPOUT_MAX_P
                                          and x.numel() >= SPARSE_DROPOUT_MIN_ROWS * x.shape[-1]
                                          and weight.numel() >= SPARSE_DROPOUT_MIN_WEIGHT)


def _dropped_positions(mask: torch.Tensor) -> torch.Tensor:
    """The flat (row-major, ascending) int64 positions of the entries that a keep mask drops."""
    return torch.logical_not(mask).reshape(-1).nonzero().squeeze(1)


def _dropped_csr(dropped: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The rows x cols CSR matrix with `values` at the flat positions `dropped` (ascending)."""
    crow = torch.searchsorted(dropped, torch.arange(0, (rows + 1) * cols, cols, device=dropped.device))
    with warnings.catch_warnings():  # PyTorch's one-time "CSR support is in beta" notice
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, dropped % cols, values, (rows, cols), check_invariants=False)


def _weight_row_chunks(weight: torch.Tensor) -> list:
    """Row slices of W0 for the sparse products. PyTorch's CPU kernels copy their dense operand transposed (W0^T:
    out x in); per chunk that copy stays small and in cache, which made both products ~3x faster at 4096 x 4096."""
    rows = max(1, _SPARSE_CHUNK_ELEMENTS // weight.shape[1])
    return [slice(i, i + rows) for i in range(0, weight.shape[0], rows)]


def _sparse_dropped_products(x, base, dropped, keep, weight, lora_A):
    """W0 x~ and x~ A^T from W0 x (`base`) and the dropped entries alone: W0 x~ = (W0 x - W0 r) / keep, r = x at the
    `dropped` flat positions (0 elsewhere) as a CSR matrix, one sparse product of density p (in row chunks of W0);
    x~ A^T the same way, so x~ is never formed. Same math as the dense products, other rounding."""
    r = _dropped_csr(dropped, x.take(dropped), math.prod(x.shape[:-1]), x.shape[-1])
    h = torch.mul(base, 1.0 / keep)
    h2 = h.view(-1, h.shape[-1])
    for rows in _weight_row_chunks(weight):
        h2[:, rows].addmm_(r, weight[rows].t(), alpha=-1.0 / keep)
    xa = None
    if lora_A is not None:
        xa = F.linear(x, lora_A)
        xa.view(-1, xa.shape[-1]).addmm_(r, lora_A.t(), beta=1.0 / keep, alpha=-1.0 / keep)
    return h, xa


def _exact_dropout_output(x, mask, keep, weight, bias, lora_A, lora_B, gm1, scaling):
    """The official / PEFT dropout form y = W0 x + (g-1) W0 x~ + g s B A x~ + b, x~ = dropout(x), computed as
    y = W0 x + s B A x~ + (g-1) h + b with h = (W0 + sBA) x~; g - 1 (not g) multiplies. W0 x~ is a second dense
    GEMM, or where `_sparse_dropout` says so a product over the dropped entries (`_sparse_dropped_products`).
    Returns (y, xa, h, dropped): h is what the magnitude gradient needs (dL/dg = sum dL/dy * h); dropped is the
    dropped entries' flat positions when the sparse form ran, else None."""
    y = F.linear(x, weight)
    dropped = _dropped_positions(mask) if _sparse_dropout(x, weight, keep) else None
    if dropped is not None:
        h, xa = _sparse_dropped_products(x, y, dropped, keep, weight, lora_A)
    else:
        x_drop = _dropped(x, mask, keep)
        h = F.linear(x_drop, weight)
        xa = None if lora_A is None else F.linear(x_drop, lora_A)
    if xa is not None:
        _add_low_rank(h, xa, lora_B, scaling)
        _add_low_rank(y, xa, lora_B, scaling)
    y.addcmul_(h, gm1)
    if bias is not None:
        y.add_(bias)
    return y, xa, h, dropped


class _DoRAScaledLinear(torch.autograd.Function):
    """The whole DoRA layer as one autograd node, dropout included; g an fp32 (out,) vector (m / norm).

    Without dropout (mask None), or with dropout in the lora-branch mode (x~ = x * mask / keep):
        y = u + b,  u = g * (x W^T + s (x~ A^T) B^T)
    With dropout in the exact mode (`exact_dropout`):
        y = x W^T + s (x~ A^T) B^T + (g - 1) * h + b,  h = x~ W^T + s (x~ A^T) B^T

    Saved for backward: x (not x~, which is recomputed from x and the bool mask: x is often kept anyway, as the
    previous DoRA layer's u), the mask, x~ A^T, and for the magnitude gradient (dL/dg = sum_t dL/dy * v, with
    v = x W^T + s (x~ A^T) B^T, or h in the exact form) one of:
    - u = g * v itself, which a layer without bias returns (`separate_output` False): no extra memory when the next
      op keeps its input anyway (a linear layer, attention's v, SwiGLU's gate and up, the next DoRA layer); backward
      divides by g. u holds nothing of v where g == 0, and u / g loses about 1 / |g| units of rounding (below
      1e-16 in float64, g - 1 rounds to -1 and u to 0): the caller takes this form only if every |g| >= _SMALL_SCALE.
    - v, the output being a separate tensor (a bias, or `separate_output`): one output-sized tensor, exact for any
      g, 0 included, and in bf16 (v recovered from y - b would lose the digits that a large bias takes); the output
      may be modified in place.
    - h (exact dropout).
    The input gradient is one tensor accumulated in place (the dropout's mask applied on the way); the exact form
    needs a second base product in backward too ((g - 1) dL/dy W for x~ besides dL/dy W for x).

    The exact form's second base product in either direction is a dense GEMM, or (`SPARSE_DROPOUT`, on CPU at
    small p) a product over the dropped entries only: W0 x~ = (W0 x - W0 r) / keep in forward, and in backward
        dL/dx = dL/dy (1 + (g - 1) / keep) W - [(g - 1) dL/dy W at the dropped entries] / keep + (adapter)
    one dense GEMM and a sampled product (SDDMM) of density p. That form saves the dropped entries' flat positions
    (int64) instead of the mask.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, lora_A, lora_B, g, scaling, keep, exact_dropout, separate_output):
        gm1 = (g - 1.0).to(x.dtype)
        sparse = divide = False
        if exact_dropout:
            y, xa, kept, dropped = _exact_dropout_output(x, mask, keep, weight, bias, lora_A, lora_B, gm1, scaling)
            if dropped is not None:
                # The sparse form's positions are saved instead of the mask: rebuilding them in backward would be
                # another pass over the mask (nonzero: 2-4 % of the sparse backward's time), and up to p = 1/8 they
                # take no more memory than the bool mask.
                mask, sparse = dropped, True
        else:
            x_drop = None if mask is None else _dropped(x, mask, keep)
            kept, xa = _unscaled_output(x, x_drop, weight, lora_A, lora_B, scaling)
            if bias is None and not separate_output:
                y = kept = kept.addcmul_(kept, gm1)  # u, in place: the output is what backward keeps
                divide = True
            else:
                y = torch.addcmul(kept, kept, gm1)
                if bias is not None:
                    y.add_(bias)
        ctx.scaling, ctx.keep, ctx.exact_dropout, ctx.sparse, ctx.divide = scaling, keep, exact_dropout, sparse, divide
        ctx.save_for_backward(x, mask, xa, weight, lora_A, lora_B, g, gm1, kept if ctx.needs_input_grad[6] else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            raise RuntimeError("DoRALinear does not support double backward (create_graph=True): its backward "
                               "is not differentiable")
        x, mask, xa, weight, lora_A, lora_B, g, gm1, kept = ctx.saved_tensors
        dropped = mask if ctx.sparse else None  # the sparse form saved the dropped entries' flat positions
        s, keep = ctx.scaling, ctx.keep
        out, d_in = weight.shape
        need_x, _, _, need_b, need_A, need_B, need_g = ctx.needs_input_grad[:7]
        acc = g.dtype  # fp32 (fp64 for fp64 weights)
        grad_y = grad_y.contiguous()  # e.g. when the output was used transposed

        grad_b = grad_y.view(-1, out).sum(dim=0, dtype=acc).to(weight.dtype) if need_b else None
        grad_g = buffer = None
        if need_g:
            buffer = torch.mul(grad_y, kept)
            grad_g = buffer.view(-1, out).sum(dim=0, dtype=acc)
            if ctx.divide:
                # u = g * v: divide by g (no |g| < _SMALL_SCALE here, see the class docstring; the guard only keeps
                # a direct caller's g == 0 from giving NaN)
                grad_g /= torch.where(g == 0, 1.0, g)
        # Gradients keep the inputs' N-d shapes (matmul, not a view of mm): autograd accumulates a view
        # out of place, which would cost one more copy of the input gradient.
        grad_x = grad_x_drop = None  # dL/dx through W0 x, and dL/dx~ (the dropped input's path)
        sampled = None  # the sparse form: dL/dx~ at the dropped entries, to be taken out of grad_x
        if ctx.sparse:
            grad_h = torch.mul(grad_y, gm1, out=buffer)  # (g - 1) dL/dy, in the same buffer
            if need_x:
                # dL/dy W + (mask / keep) (g - 1) dL/dy W = dL/dy (1 + (g - 1) / keep) W - [(g - 1) dL/dy W at the
                # dropped entries] / keep: one dense GEMM and a sampled product (SDDMM) of density p.
                grad_x = torch.matmul(torch.add(grad_y, grad_h, alpha=1.0 / keep), weight)
                sampled = _dropped_csr(dropped, grad_x.new_zeros(dropped.numel()), *grad_x.view(-1, d_in).shape)
                gh2 = grad_h.view(-1, out)
                for rows in _weight_row_chunks(weight):
                    torch.sparse.sampled_addmm(sampled, gh2[:, rows], weight[rows], out=sampled)
            if lora_A is not None:
                grad_h.add_(grad_y)  # g * dL/dy: the adapter's path
        elif ctx.exact_dropout:
            grad_x = torch.matmul(grad_y, weight) if need_x else None
            grad_h = torch.mul(grad_y, gm1, out=buffer)  # (g - 1) dL/dy, in the same buffer
            if need_x:
                grad_x_drop = torch.matmul(grad_h, weight)
            if lora_A is not None:
                grad_h.add_(grad_y)  # g * dL/dy: the adapter's path
        else:
            grad_h = torch.addcmul(grad_y, grad_y, gm1, out=buffer)  # g * dL/dy, in the same buffer
            grad_x = torch.matmul(grad_h, weight) if need_x else None
        grad_A = grad_B = None
        if lora_A is not None:
            gh2 = grad_h.view(-1, out)
            if need_B:
                grad_B = (gh2.t() @ xa.view(-1, xa.shape[-1])).mul_(s)
            grad_xa = torch.matmul(grad_h, lora_B * s)  # (..., r)
            grad_xa2 = grad_xa.view(-1, grad_xa.shape[-1])
            if need_A:
                if ctx.sparse:
                    x_in = x.reshape(-1).mul(1.0 / keep).index_fill_(0, dropped, 0.0)
                else:
                    x_in = x if mask is None else _dropped(x, mask, keep)
                # reshape: a view of a contiguous input, no copy; a copy of an input that no view can flatten
                # (x.transpose(0, 1), hidden_states[:, 1:]), as nn.Linear copies such an input too
                grad_A = grad_xa2.t() @ x_in.reshape(-1, d_in)
            if need_x and ctx.sparse:
                # (mask / keep) grad_xa A: all of it at 1 / keep, the dropped entries taken out with the base part's
                grad_x.view(-1, d_in).addmm_(grad_xa2, lora_A, alpha=1.0 / keep)
                torch.sparse.sampled_addmm(sampled, grad_xa2, lora_A, out=sampled)
            elif need_x and mask is None:
                grad_x.view(-1, d_in).addmm_(grad_xa2, lora_A)
            elif need_x and grad_x_drop is None:
                grad_x_drop = torch.matmul(grad_xa, lora_A)
            elif need_x:
                grad_x_drop.view(-1, d_in).addmm_(grad_xa2, lora_A)
        if grad_x_drop is not None:
            grad_x.addcmul_(grad_x_drop, mask, value=1.0 / keep)  # dropout's backward, accumulated in place
        if sampled is not None:
            grad_x.view(-1).index_add_(0, dropped, sampled.values(), alpha=-1.0 / keep)
        return grad_x, None, None, grad_b, grad_A, grad_B, grad_g, None, None, None, None


class DoRALinear(nn.Module):
    """A drop-in replacement for nn.Linear with a DoRA adapter.

    Owns weight, bias, lora_A, lora_B and magnitude directly (no wrapped base layer), so DeepSpeed ZeRO-3
    gathers all of them in this module's own forward hook.

    Args:
        rank, alpha: LoRA rank r and alpha; the scale is alpha / r (alpha / sqrt(r) with `rslora`).
        dropout: dropout probability on the adapter input (active in training mode only).
        dropout_mode: "exact" (official DoRA / PEFT): y = W0 x + (g-1) W0 drop(x) + g s B A drop(x) + b, which
            costs a second base product in forward and in backward while dropout is active (a dense GEMM, or on
            CPU at small dropout a sparse product over the dropped entries, see SPARSE_DROPOUT); "lora-branch":
            y = g (W0 x + s B A drop(x)) + b, one GEMM. The two agree when dropout is 0 or in eval mode.
        magnitude_only: no A, B; only m is trained (the paper's tuning-granularity setting).
        detach_norm: treat ||W0 + sBA|| as a constant in backward (paper section 4.3; default). False
            back-propagates through the norm into A and B.
        inplace_safe: the next op modifies this layer's output in place (nn.ReLU(inplace=True)). A layer without
            bias saves its own output for the magnitude gradient, which such an op would change (autograd then
            raises); with this option the output is a separate tensor (one output-sized tensor more), as it is
            anyway while some |g| = |m| / ||W0 + sBA|| is below 1/16 (a zero magnitude, say: see _SMALL_SCALE).

    The norm cache. With the detached norm, ||W0 + sBA|| (and ||W0||^2, g - 1 for inference, and in training
    whether some |g| < 1/16) is cached and recomputed when any of weight, lora_A, lora_B (and magnitude, for the
    last two) is a different tensor object or has a new version counter (any in-place edit, optimizer.step(),
    load_state_dict, assign=True or not, torch.func.functional_call, `layer.lora_B = nn.Parameter(...)`), after
    every optimizer step in the process, and after `.to()` / `.cuda()` / `.half()` (which swap storage through
    `.data`). A write through `.data` outside an optimizer step is seen by nothing: after `p.data.copy_(...)` or
    `p.data = ...` on weight, lora_A, lora_B or magnitude, call `invalidate_norm_cache()` (or
    `dora.invalidate_norm_caches(model)`). Under torch.compile the norm is computed inside the graph on every forward (no cache, no graph
    break: a cache check is Python state that a graph cannot test without breaking).

    Under autocast, fp32 weights are cast to the autocast dtype on every forward, the base weight included (an
    out x in copy, which backward keeps, as nn.Linear under autocast does for a frozen weight): keep the frozen
    weights in bf16 to avoid it.
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
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"DoRALinear({in_features} -> {out_features}) created under torch.inference_mode(): its parameters "
                f"would be inference tensors, which can never be trained (nor have their norm cached); create it "
                f"(apply_dora, load_adapter, import_peft) outside inference_mode, and run only forwards under it")
        if not magnitude_only:
            rank, alpha = _validated_rank(rank), _validated_alpha(alpha)
        self._set_options(in_features, out_features, rank, alpha, dropout, dropout_mode, magnitude_only, detach_norm,
                          rslora, inplace_safe)
        self._make_weights(bias, device, dtype, adapter_dtype)

    def _make_weights(self, bias: bool, device, dtype, adapter_dtype) -> None:
        """The frozen W0 (and bias), then the adapter (`_make_adapter`, fp32 for a half-precision layer unless
        `adapter_dtype` says otherwise), initialised unless on the meta device."""
        factory = {"device": device, "dtype": dtype}
        if adapter_dtype is None:
            adapter_dtype = dtype if dtype in (None, torch.float32, torch.float64) else torch.float32
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory), requires_grad=False) if bias else None
        self._make_adapter(device, adapter_dtype)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def _set_options(self, in_features, out_features, rank, alpha, dropout, dropout_mode, magnitude_only, detach_norm,
                     rslora, inplace_safe) -> None:
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
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

    def _make_adapter(self, device, dtype) -> None:
        """lora_A, lora_B (none when magnitude-only) and the magnitude, uninitialised; the norm caches."""
        adapter = {"device": device, "dtype": dtype}
        if self.magnitude_only:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        else:
            self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **adapter))
            self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, **adapter))
        self.magnitude = nn.Parameter(torch.empty(self.out_features, **adapter))
        self._init_state()

    def _init_state(self) -> None:
        """Unmerged, and the norm caches empty."""
        self.merged = False
        self._merge_norm: Optional[torch.Tensor] = None  # the norm at merge time; exact unmerge needs it
        self.norm_computations = 0  # how many times the row norm was computed (observability and tests)
        self._w2_cache, self._norm_cache, self._gm1_cache = _NormCache(), _NormCache(), _NormCache()
        self._small_scale_cache = _NormCache()  # whether some |g| < _SMALL_SCALE, a Python bool

    # ----------------------------------------------------------------------------------------- creation
    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, **options) -> "DoRALinear":
        """Wrap an existing nn.Linear: its weight and bias Parameters are taken over as they are (no copy), and
        so is its training / eval mode."""
        if not isinstance(linear, nn.Linear):
            hint = (": it is already adapted, and wrapping it would drop its adapter (lora_A, lora_B, magnitude)"
                    if isinstance(linear, DoRALinear) else "")
            raise TypeError(f"from_linear takes an nn.Linear, got a {type(linear).__name__}{hint}")
        w = linear.weight
        if w.is_inference():
            raise RuntimeError(
                "the Linear's weight is an inference tensor (made under torch.inference_mode()), which has no "
                "version counter for the norm cache to follow: build the model outside inference_mode, or clone the "
                "weight outside it first (linear.weight = nn.Parameter(linear.weight.clone()))")
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
        return module.train(linear.training)

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
        self.invalidate_norm_cache()
        self.magnitude.copy_(self._weight_sq_norm().sqrt())

    def extra_repr(self) -> str:
        kind = "magnitude_only" if self.magnitude_only else f"rank={self.rank}, alpha={self.alpha:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"bias={self.bias is not None}, dropout={self.dropout:g} ({self.dropout_mode}), "
                f"detach_norm={self.detach_norm}, merged={self.merged}")

    # ----------------------------------------------------------------------------------------- norm and caches
    def invalidate_norm_cache(self) -> None:
        """Forget the cached norms. Needed only after writing weight, lora_A, lora_B or magnitude through
        `.data` outside an optimizer step (see the class docstring)."""
        for cache in (self._w2_cache, self._norm_cache, self._gm1_cache, self._small_scale_cache):
            cache.clear()

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() may replace a parameter's storage through `.data`: same tensor object, same
        # version counter, so no key would see it (.to(bf16).to(fp32) changes the values but not the dtype).
        self.invalidate_norm_cache()
        return super()._apply(fn, recurse)

    def _cache_stamp(self) -> tuple:
        # Inference mode is part of the stamp: a tensor made under it cannot be saved for a later backward.
        return _optimizer_steps, torch.is_inference_mode_enabled()

    def _adapter_factors(self) -> tuple:
        """The trained tensors the norm depends on besides W0 (cache sources; the non-detached norm's inputs)."""
        return () if self.lora_A is None else (self.lora_A, self.lora_B)

    def _low_rank(self) -> tuple:
        """(A, B, s) of the update s*B@A, (None, None, s) for a magnitude-only layer. A variant whose B is a function
        of trained vectors (dora/vera.py: B = diag(b) B0 diag(d), s = 1) returns it here, differentiable in them, and
        the norm, forward, merge and analysis take it unchanged."""
        return self.lora_A, self.lora_B, self.scaling

    def adapter_parameters(self) -> dict:
        """The adapter's trained tensors by name (what an adapter file holds for this module)."""
        return {n: getattr(self, n) for n in ("lora_A", "lora_B", "magnitude") if getattr(self, n) is not None}

    # What the norm needs of W0, and all it needs: ||W0||^2 per row and W0 A^T. A subclass whose base is reachable
    # only through its own forward (dora/quantized.py) gives these two another way.
    def _base_sq_norm(self) -> torch.Tensor:
        return squared_row_norm(self.weight)

    def _base_cross(self, lora_A: torch.Tensor) -> torch.Tensor:
        return self.weight @ lora_A.to(self.weight.dtype).t()

    def dense_weight(self) -> torch.Tensor:
        """W0 as a dense (out, in) tensor, for readers such as the weight-decomposition analysis."""
        return self.weight

    def _weight_sq_norm(self) -> torch.Tensor:
        w = self.weight
        if torch.compiler.is_compiling():
            return self._base_sq_norm()
        stamp = self._cache_stamp()
        w2 = self._w2_cache.get((w,), stamp)
        if w2 is None:
            with torch.no_grad():
                w2 = self._w2_cache.put(self._base_sq_norm(), (w,), stamp)
        return w2

    def _row_norm(self, detach: bool = False) -> torch.Tensor:
        lora_A, lora_B, scaling = self._low_rank()
        if detach and lora_A is not None:
            lora_A, lora_B = lora_A.detach(), lora_B.detach()
        cross = None if lora_A is None else self._base_cross(lora_A)
        return row_norm_from_parts(self._weight_sq_norm(), cross, lora_A, lora_B, scaling,
                                   _accumulation_dtype(self.weight))

    def weight_norm(self, differentiable: bool = False) -> torch.Tensor:
        """||W0 + s*B@A||_row in fp32. Cached unless `differentiable` (the non-detached variant)."""
        if differentiable:
            self.norm_computations += 1
            return self._row_norm()
        if torch.compiler.is_compiling():
            return self._row_norm(detach=True)
        sources = (self.weight, *self._adapter_factors())
        stamp = self._cache_stamp()
        norm = self._norm_cache.get(sources, stamp)
        if norm is None:
            with torch.no_grad():
                norm = self._row_norm()
            self._norm_cache.put(norm, sources, stamp)
            self.norm_computations += 1
        return norm

    def _needs_norm_graph(self) -> bool:
        return (not self.detach_norm and not self.magnitude_only and torch.is_grad_enabled()
                and any(p.requires_grad for p in self._adapter_factors()))

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        device_type = x.device.type
        if device_type == "meta" or self.weight.is_meta:
            # (before: "unknown device type for autocast", or a device mismatch naming neither tensor)
            which = " and ".join(n for n, t in (("x", x), ("weight", self.weight)) if t.is_meta)
            raise ValueError(
                f"DoRALinear({self.in_features} -> {self.out_features}): {which} on the meta device, which holds "
                f"shapes but no values; materialise the layer first (module.to_empty(device=...), then load or "
                f"reset_parameters()) and give it a real input")
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
        lora_A, lora_B, scaling = self._low_rank()
        lora_A = None if lora_A is None else lora_A.to(dtype)
        lora_B = None if lora_B is None else lora_B.to(dtype)
        dropping = self.training and self.dropout > 0.0
        keep = 1.0 - self.dropout
        # The keep mask is drawn as F.dropout draws it on CPU (one Bernoulli per element, same random stream);
        # kept as bool, it is a quarter of the float mask F.dropout keeps there. It is drawn in x's logical order
        # (empty, not empty_like, which would follow a transposed x's strides): the same seed drops the same
        # entries whatever x's memory layout.
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep) if dropping else None
        exact_dropout = dropping and self.dropout_mode == "exact"

        trainable = (self.magnitude, *self._adapter_factors(), self.bias)
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p is not None and p.requires_grad
                                                                    for p in trainable)):
            gm1 = self._cached_gm1(dtype)
            if exact_dropout:
                return _exact_dropout_output(x, mask, keep, weight, bias, lora_A, lora_B, gm1, scaling)[0]
            x_drop = None if mask is None else _dropped(x, mask, keep)
            return _scaled_output(x, x_drop, weight, bias, lora_A, lora_B, gm1, scaling)[0]
        g = self._scale()
        separate = self.inplace_safe or (bias is None and not exact_dropout and self._has_small_scale(g))
        return _DoRAScaledLinear.apply(x, mask, weight, bias, lora_A, lora_B, g, scaling, keep, exact_dropout,
                                       separate)

    def _scale(self) -> torch.Tensor:
        """g = m / ||W0 + sBA||_row in fp32, differentiable in m (and in A, B without detach_norm)."""
        norm = self.weight_norm(differentiable=self._needs_norm_graph())
        return self.magnitude.to(norm.dtype) / norm

    def _has_small_scale(self, g: torch.Tensor) -> bool:
        """Whether some |g_i| < _SMALL_SCALE. Cached on g's sources like g - 1: read (on a GPU, one device-to-host
        copy) once per optimizer step, not per micro-step. Under torch.compile True, without reading g: the
        compiled graph decides itself what it keeps for backward."""
        if torch.compiler.is_compiling():
            return True
        sources = (self.weight, *self._adapter_factors(), self.magnitude)
        stamp = self._cache_stamp()
        small = self._small_scale_cache.get(sources, stamp)
        if small is None:
            small = self._small_scale_cache.put(bool((g.detach().abs() < _SMALL_SCALE).any()), sources, stamp)
        return small

    def _cached_gm1(self, dtype: torch.dtype) -> torch.Tensor:
        """Inference: g - 1 in the compute dtype, cached on the norm's sources and the magnitude."""
        if torch.compiler.is_compiling():
            norm = self.weight_norm()
            return (self.magnitude.to(norm.dtype) / norm - 1.0).to(dtype)
        sources = (self.weight, *self._adapter_factors(), self.magnitude)
        stamp = (*self._cache_stamp(), dtype)
        gm1 = self._gm1_cache.get(sources, stamp)
        if gm1 is None:
            norm = self.weight_norm()
            gm1 = self._gm1_cache.put((self.magnitude.to(norm.dtype) / norm - 1.0).to(dtype), sources, stamp)
        return gm1

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
        lora_A, lora_B, scaling = self._low_rank()
        if lora_A is not None:
            merged.addmm_(lora_B.to(merged.dtype), lora_A.to(merged.dtype), alpha=scaling)
        merged.mul_(g.to(merged.dtype)[:, None])
        w.copy_(merged)
        self._merge_norm = norm.clone()
        self.merged = True
        self.invalidate_norm_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        g = self.magnitude.to(self._merge_norm.dtype) / self._merge_norm
        w = self.weight
        base = w.to(_accumulation_dtype(w), copy=True)
        base.div_(g.to(base.dtype)[:, None])
        lora_A, lora_B, scaling = self._low_rank()
        if lora_A is not None:
            base.addmm_(lora_B.to(base.dtype), lora_A.to(base.dtype), alpha=-scaling)
        w.copy_(base)
        self._merge_norm = None
        self.merged = False
        self.invalidate_norm_cache()

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (merges first), in this layer's training / eval mode."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear.train(self.training)
