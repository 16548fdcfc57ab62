"""Small models and reference implementations shared by the DoRA tests."""
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.q_proj(x) * torch.sigmoid(self.v_proj(x))
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(h))))


class TinyNet(nn.Module):
    def __init__(self, d_in: int = 12, d: int = 16, hidden: int = 24, layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.layers = nn.ModuleList(Block(d, hidden) for _ in range(layers))
        self.projector = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.projector(h))


def dense_dora(x, W, b, A, B, m, s, detach_norm=True):
    """The DoRA formula written out densely (materialises W0 + sBA): the reference in float64."""
    V = W + s * B @ A if A is not None else W
    norm = V.norm(dim=1)
    if detach_norm:
        norm = norm.detach()
    y = (m / norm) * (x @ V.t())
    return y if b is None else y + b


def perturb_adapter(model, scale: float = 0.3):
    """Make B and m non-trivial so that tests exercise the whole formula, not the identity at init."""
    from dora import dora_modules
    with torch.no_grad():
        for module in dora_modules(model).values():
            if module.lora_B is not None:
                module.lora_B.normal_(0, scale)
            module.magnitude.mul_(1 + scale * torch.rand_like(module.magnitude))
            module.invalidate_norm_cache()


def fresh_copy(layer):
    """A new DoRALinear with the same settings and a copy of the layer's current tensors: it has never run, so
    it has no cached norm. The reference that a layer with a (possibly stale) cache must agree with."""
    from dora import DoRALinear
    fresh = DoRALinear(layer.in_features, layer.out_features, max(layer.rank, 1), layer.alpha,
                       bias=layer.bias is not None, dropout=layer.dropout, dropout_mode=layer.dropout_mode,
                       magnitude_only=layer.magnitude_only, detach_norm=layer.detach_norm, rslora=layer.rslora,
                       device="meta")
    for name, p in layer.named_parameters():
        setattr(fresh, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    return fresh.train(layer.training)


def assert_analysis_reads_the_run(base, run, model) -> None:
    """`dora.analysis` on a recipe run's adapters (ours and the PEFT export) against the base the recipe started
    from gives, per module, the deltas of `model`'s own DoRA layers (the run's adapter loaded, unmerged), which
    know their W0: the names were mapped to the right base weights (the LLM's layers.0, not the vision tower's)."""
    import math

    from dora.analysis import analyse, model_decomposition_deltas

    expected = model_decomposition_deltas(model)
    for checkpoint in ("adapter", "adapter_peft"):
        rows = analyse(base, [run / checkpoint])
        assert rows and {r.module for r in rows} <= set(expected), (checkpoint, [r.module for r in rows][:3])
        for r in rows:
            want = expected[r.module]
            assert math.isclose(r.delta_m, want.magnitude, rel_tol=1e-5, abs_tol=1e-9), (checkpoint, r)
            assert math.isclose(r.delta_d, want.direction, rel_tol=1e-4, abs_tol=1e-12), (checkpoint, r)
