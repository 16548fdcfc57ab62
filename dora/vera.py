"""VeRA's update inside the DoRA layer: DVoRA (the DoRA paper's DoRA + VeRA variant) and plain VeRA.

VeRA (Kopiczko et al., 2024) replaces LoRA's trained B A by frozen random projections shared by every adapted layer
and two trained vectors per layer:
    delta W = diag(b) B diag(d) A       A (r, in), B (out, r): frozen, one pair for all layers; b (out), d (r): trained
DVoRA puts that update in DoRA's direction:
    W' = m * (W0 + diag(b) B diag(d) A) / ||W0 + diag(b) B diag(d) A||_row
which is DoRA's formula with s = 1 and B_eff = b[:, None] * B * d[None, :] (out, r). So the layer is a DoRALinear
whose `_low_rank()` returns (A, B_eff, 1): the factored norm, the one-node forward/backward (both dropout forms),
the detached norm and its cache, merge / unmerge and the analysis take it unchanged; autograd carries B_eff's
gradient (out, r) back to b and d. Since A and W0 are both frozen, the norm's one big product W0 A^T (out, r) is
computed once and kept. Without a magnitude (`magnitude=False`) the layer is plain VeRA, W' = W0 + delta W, the
baseline, and what PEFT's VeraConfig adapters hold (dora.adapter.export_peft / import_peft).

The projections are drawn once from `projection_seed` on a CPU generator, A then B, Kaiming-uniform with gain
sqrt(2) (bound sqrt(6 / fan_in)), as PEFT's VeRA draws them, sized to the largest in / out of the layers that share
them; each layer uses A[:, :in] and B[:out, :]. At init b = 0 (so W' == W0) and d = d_initial (0.1).
"""
from __future__ import annotations

import hashlib
import math
import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import DoRALinear, _dropped, _NormCache, _validated_rank


def _validated_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"projection_seed must be an integer, got {seed!r} ({type(seed).__name__})")
    return int(seed)


def _validated_d_initial(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value == 0:
        raise ValueError(f"d_initial must be a finite non-zero number, got {value!r}: d scales every rank direction "
                         f"of the update, and at d = 0 b never gets a gradient")
    return float(value)


def draw_projections(rank: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared A (rank, in_features) and B (out_features, rank), fp32 on CPU, from `seed` alone."""
    generator = torch.Generator(device="cpu").manual_seed(_validated_seed(seed))
    A = torch.empty(rank, in_features)
    B = torch.empty(out_features, rank)
    for t in (A, B):  # in this order: the same draws as PEFT's VeRA from the same projection_prng_key
        nn.init.kaiming_uniform_(t, a=0.0, mode="fan_in", nonlinearity="leaky_relu", generator=generator)
    return A, B


def projection_digest(t: torch.Tensor) -> str:
    """sha256 of a projection's fp32 bytes: a record that regenerating it from the seed gave the same matrix."""
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class VeRAProjections(nn.Module):
    """The frozen A (rank, in_features) and B (out_features, rank) that every VeRA layer of a group shares, as
    buffers of this one module, a child of each of those layers (moved and cast once with the model). The buffers
    are not persistent: adapter files carry them (save_projection) or record their digest (dora/adapter.py)."""

    def __init__(self, rank: int, in_features: int, out_features: int, seed: int = 0, device=None):
        super().__init__()
        self.rank, self.seed = _validated_rank(rank), _validated_seed(seed)
        A, B = draw_projections(self.rank, in_features, out_features, self.seed)
        self.register_buffer("A", A.to(device), persistent=False)
        self.register_buffer("B", B.to(device), persistent=False)

    @property
    def key(self) -> str:
        """The name an adapter file gives this group: rank and seed (one group per pair in a model)."""
        return f"vera_projections.r{self.rank}.seed{self.seed}"

    def extra_repr(self) -> str:
        return f"rank={self.rank}, seed={self.seed}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"


class VeRALinear(DoRALinear):
    """DVoRA (default) or, with `magnitude=False`, plain VeRA, as a drop-in nn.Linear replacement.

    Trained: vera_lambda_b (out), vera_lambda_d (rank) and, for DVoRA, the magnitude (out). `projections` is the
    VeRAProjections group to share (default: a new one sized to this layer, from `projection_seed`). `alpha` is
    not used: VeRA has no scale (d plays its part). Options as DoRALinear's; plain VeRA applies dropout to the
    adapter's input only, so its two dropout modes are the same."""

    variant = "vera"

    def __init__(self, in_features: int, out_features: int, rank: int = 256, alpha: Optional[float] = None, *,
                 bias: bool = True, dropout: float = 0.0, dropout_mode: str = "exact", detach_norm: bool = True,
                 inplace_safe: bool = False, magnitude: bool = True, d_initial: float = 0.1, projection_seed: int = 0,
                 save_projection: bool = True, projections: Optional[VeRAProjections] = None, device=None,
                 dtype=None, adapter_dtype=None):
        nn.Module.__init__(self)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"VeRALinear({in_features} -> {out_features}) created under torch.inference_mode(): "
                               f"create it outside, and run only forwards under it")
        rank = _validated_rank(rank)
        self._set_options(in_features, out_features, rank, float(rank), dropout, dropout_mode, False, detach_norm,
                          False, inplace_safe)
        self.scaling = 1.0
        self.has_magnitude = bool(magnitude)
        self.d_initial = _validated_d_initial(d_initial)
        self.save_projection = bool(save_projection)
        if projections is None:
            projections = VeRAProjections(rank, in_features, out_features, projection_seed,
                                          device=None if device == "meta" else device)
        if projections.rank != rank:
            raise ValueError(f"VeRALinear rank {rank} but its projections have rank {projections.rank}")
        if projections.A.shape[1] < in_features or projections.B.shape[0] < out_features:
            raise ValueError(f"VeRALinear({in_features} -> {out_features}): the shared projections "
                             f"{projections.extra_repr()} are smaller than the layer")
        self.vera_projections = projections
        self.projection_seed = projections.seed
        self._make_weights(bias, device, dtype, adapter_dtype)

    def _make_adapter(self, device, dtype) -> None:
        adapter = {"device": device, "dtype": dtype}
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.vera_lambda_b = nn.Parameter(torch.empty(self.out_features, **adapter))
        self.vera_lambda_d = nn.Parameter(torch.empty(self.rank, **adapter))
        if self.has_magnitude:
            self.magnitude = nn.Parameter(torch.empty(self.out_features, **adapter))
        else:
            self.register_parameter("magnitude", None)
        self._init_state()
        self._cross_cache = _NormCache()  # W0 A^T: both frozen (see _base_cross)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 256, alpha: Optional[float] = None,
                    **options) -> "VeRALinear":
        """Wrap an nn.Linear (its weight and bias taken over, no copy, and its training / eval mode)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got a {type(linear).__name__}")
        w = linear.weight
        if w.is_inference():
            raise RuntimeError("the Linear's weight is an inference tensor (made under torch.inference_mode()): "
                               "build the model outside inference_mode")
        module = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None, device="meta",
                     dtype=w.dtype, **options)
        module.weight = w.requires_grad_(False)
        if linear.bias is not None:
            module.bias = linear.bias.requires_grad_(False)
        for name in module.adapter_parameters():
            setattr(module, name, nn.Parameter(torch.empty_like(getattr(module, name), device=w.device)))
        module.vera_projections.to(w.device)
        module.reset_adapter()
        return module.train(linear.training)

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """b = 0 (W' == W0), d = d_initial, m = ||W0||_row (DVoRA)."""
        if self.merged:
            raise RuntimeError("unmerge before resetting the adapter")
        self.vera_lambda_b.zero_()
        self.vera_lambda_d.fill_(self.d_initial)
        self.invalidate_norm_cache()
        if self.magnitude is not None:
            self.magnitude.copy_(self._weight_sq_norm().sqrt())

    def extra_repr(self) -> str:
        kind = "DVoRA" if self.has_magnitude else "VeRA (no magnitude)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, rank={self.rank}, "
                f"seed={self.projection_seed}, d_initial={self.d_initial:g}, bias={self.bias is not None}, "
                f"dropout={self.dropout:g} ({self.dropout_mode}), detach_norm={self.detach_norm}, merged={self.merged}")

    def adapter_parameters(self) -> dict:
        names = ("vera_lambda_b", "vera_lambda_d") + (("magnitude",) if self.has_magnitude else ())
        return {n: getattr(self, n) for n in names}

    # ----------------------------------------------------------------------------------------- the update
    def projection_slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A (rank, in) and B (out, rank): the leading part of the shared projections."""
        p = self.vera_projections
        return p.A[:, : self.in_features], p.B[: self.out_features]

    def _adapter_factors(self) -> tuple:
        return (self.vera_lambda_b, self.vera_lambda_d, self.vera_projections.A, self.vera_projections.B)

    def _low_rank(self) -> tuple:
        A, B = self.projection_slices()
        b, d = self.vera_lambda_b, self.vera_lambda_d
        return A, (b[:, None] * B.to(b.dtype)) * d, 1.0  # B_eff = diag(b) B diag(d): (out, rank), no out x in

    def delta_weight(self) -> torch.Tensor:
        """diag(b) B diag(d) A as a dense (out, in) tensor in fp32 (fp64 for fp64 adapters): for tests and export."""
        A, B_eff, _ = self._low_rank()
        acc = torch.float64 if B_eff.dtype == torch.float64 else torch.float32
        return B_eff.to(acc) @ A.to(acc)

    def _base_cross(self, lora_A: torch.Tensor) -> torch.Tensor:
        # W0 A^T with W0 and A both frozen: kept until either changes (a merge, a load, .to()); not optimizer steps.
        if torch.compiler.is_compiling() or lora_A.requires_grad:
            return super()._base_cross(lora_A)
        sources = (self.weight, self.vera_projections.A)
        stamp = (torch.is_inference_mode_enabled(), lora_A.dtype)
        cross = self._cross_cache.get(sources, stamp)
        if cross is None:
            with torch.no_grad():
                cross = self._cross_cache.put(super()._base_cross(lora_A), sources, stamp)
        return cross

    def invalidate_norm_cache(self) -> None:
        super().invalidate_norm_cache()
        self._cross_cache.clear()

    # ----------------------------------------------------------------------------------------- forward, merge
    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.has_magnitude:
            return super()._forward(x, dtype)
        # plain VeRA: y = W0 x + b + B_eff A drop(x)
        if self.weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("VeRALinear keeps its base weight frozen; its `weight` must not require grad")
        A, B_eff, _ = self._low_rank()
        y = F.linear(x, self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        if self.training and self.dropout > 0.0:
            keep = 1.0 - self.dropout
            x = _dropped(x, torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep), keep)
        return y + F.linear(F.linear(x, A.to(dtype)), B_eff.to(dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if self.has_magnitude:
            return super().merge()
        if self.merged:
            return
        w = self.weight
        w.copy_(w.to(self.delta_weight().dtype) + self.delta_weight())
        self.merged = True
        self.invalidate_norm_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.has_magnitude:
            return super().unmerge()
        if not self.merged:
            return
        w = self.weight
        w.copy_(w.to(self.delta_weight().dtype) - self.delta_weight())
        self.merged = False
        self.invalidate_norm_cache()


def vera_projection_groups(model: nn.Module) -> dict[str, VeRAProjections]:
    """Every VeRAProjections group of a model's VeRA layers, by its key (rank and seed)."""
    groups = {}
    for module in model.modules():
        if isinstance(module, VeRALinear):
            p = module.vera_projections
            other = groups.setdefault(p.key, p)
            if other is not p:
                raise ValueError(f"two projection groups named {p.key} in one model")
    return groups
