"""The DoRA layer against a dense float64 reference, PEFT's DoRA, and its own gradient checks."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import dora.layer as layer_module
from dora import DoRALinear, apply_dora, factored_row_norm, squared_row_norm
from dora.layer import _DoRAScaledLinear
from dora_helpers import dense_dora

SHAPES = [(16, 24, 4), (64, 32, 8), (40, 40, 1)]  # (in, out, rank)


def make_layer(d_in, d_out, rank, dtype=torch.float64, bias=True, **options):
    linear = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    layer = DoRALinear.from_linear(linear, rank=rank, alpha=2.0 * rank, **options)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
        layer.magnitude.mul_(1 + 0.3 * torch.rand_like(layer.magnitude))
        if bias:
            layer.bias.requires_grad_(True)
    return layer


def grads(y, tensors, gy):
    return torch.autograd.grad(y, tensors, gy)


class _SparseCalls:
    """Counts the sparse exact-dropout form's work: forward passes that computed W0 x~ from the dropped entries,
    and the sampled products computed in backward (one per weight-row chunk, one more for the adapter)."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.forward = self.sampled = 0
        monkeypatch.setattr(layer_module, "_sparse_dropped_products",
                            self._counting("forward", layer_module._sparse_dropped_products))
        monkeypatch.setattr(torch.sparse, "sampled_addmm", self._counting("sampled", torch.sparse.sampled_addmm))

    def _counting(self, name, fn):
        def counted(*args, **kwargs):
            setattr(self, name, getattr(self, name) + 1)
            return fn(*args, **kwargs)
        return counted

    def force(self, form, chunk_elements=None):
        """Set dora.layer.SPARSE_DROPOUT (and the chunk size), and reset the counts."""
        self.monkeypatch.setattr(layer_module, "SPARSE_DROPOUT", form)
        if chunk_elements is not None:
            self.monkeypatch.setattr(layer_module, "_SPARSE_CHUNK_ELEMENTS", chunk_elements)
        self.forward = self.sampled = 0

    @property
    def counts(self):
        return self.forward, self.sampled


@pytest.fixture
def sparse_calls(monkeypatch):
    return _SparseCalls(monkeypatch)


@pytest.mark.parametrize("d_in,d_out,rank", SHAPES)
def test_factored_norm_equals_dense_norm(d_in, d_out, rank):
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    A = torch.randn(rank, d_in, dtype=torch.float64)
    B = torch.randn(d_out, rank, dtype=torch.float64)
    dense = (W + 0.7 * B @ A).norm(dim=1)
    torch.testing.assert_close(factored_row_norm(W, A, B, 0.7), dense, rtol=1e-12, atol=0)
    # fp32 weights: the factored sum in fp32 is within float rounding of the dense fp32 norm
    dense32 = (W.float() + 0.7 * B.float() @ A.float()).norm(dim=1)
    torch.testing.assert_close(factored_row_norm(W.float(), A.float(), B.float(), 0.7), dense32,
                               rtol=2e-6, atol=0)


def test_squared_row_norm_low_precision_is_computed_in_fp32_chunks(monkeypatch):
    import dora.layer as layer_module
    monkeypatch.setattr(layer_module, "_CHUNK_ELEMENTS", 64)  # force several chunks
    W = torch.randn(50, 16).bfloat16()
    expected = W.double().pow(2).sum(1).float()
    torch.testing.assert_close(squared_row_norm(W), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("d_in,d_out,rank", SHAPES)
@pytest.mark.parametrize("detach_norm", [True, False])
def test_outputs_and_gradients_match_dense_reference(d_in, d_out, rank, detach_norm):
    layer = make_layer(d_in, d_out, rank, detach_norm=detach_norm)
    x = torch.randn(3, 5, d_in, dtype=torch.float64, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.magnitude, layer.bias]
    y = layer(x)
    gy = torch.randn_like(y)
    ref = dense_dora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling,
                     detach_norm=detach_norm)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(y, params, gy), grads(ref, params, gy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_detached_and_full_gradients_differ_exactly_where_the_paper_says():
    # Detaching the norm changes the gradients of A and B (the norm depends on them), never m's or x's.
    layer = make_layer(16, 12, 4)
    x = torch.randn(6, 16, dtype=torch.float64)
    out = {}
    for detach in (True, False):
        layer.detach_norm = detach
        y = layer(x)
        out[detach] = grads(y, [layer.lora_A, layer.lora_B, layer.magnitude], torch.ones_like(y))
    assert not torch.allclose(out[True][0], out[False][0])
    assert not torch.allclose(out[True][1], out[False][1])
    torch.testing.assert_close(out[True][2], out[False][2])


def test_gradcheck_non_detached_layer():
    # Full gradient through the factored norm (detach_norm=False) against finite differences.
    layer = make_layer(7, 5, 3, detach_norm=False)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    names = ["lora_A", "lora_B", "magnitude", "bias"]

    def f(x, *tensors):
        layer.invalidate_norm_cache()  # gradcheck perturbs through .data, which no version counter sees
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    inputs = [x] + [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("form", ["no-dropout", "lora-branch", "exact", "exact-magnitude-only", "exact-sparse",
                                  "exact-sparse-magnitude-only"])
def test_gradcheck_scaled_linear_function(form, sparse_calls):
    # The custom autograd Function with g an input (what the detached variant computes): all of its analytic
    # gradients against finite differences, with bias and adapter, without dropout and with a fixed dropout mask
    # in either mode, the exact one in its dense and its sparse form (in chunks of one weight row).
    sparse_calls.force("always" if "sparse" in form else "never", chunk_elements=1)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = None if form == "no-dropout" else torch.rand(2, 5, 6) > 0.3
    W = torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    g = (1 + 0.5 * torch.rand(4, dtype=torch.float64)).requires_grad_(True)
    adapter = [] if form == "exact-magnitude-only" else [A, B]

    def f(x, b, g, A=None, B=None):
        return _DoRAScaledLinear.apply(x, mask, W, b, A, B, g, 0.5, 0.7, form.startswith("exact"), False)
    assert torch.autograd.gradcheck(f, [x, b, g] + adapter)
    assert (sparse_calls.forward > 0 and sparse_calls.sampled > 0) == ("sparse" in form)


def test_magnitude_only_layer():
    linear = nn.Linear(10, 6).double()
    layer = DoRALinear.from_linear(copy.deepcopy(linear), magnitude_only=True)
    assert layer.lora_A is None and layer.lora_B is None
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-12, atol=1e-12)  # identity at init
    with torch.no_grad():
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
    layer.bias.requires_grad_(False)
    y = layer(x)
    ref = dense_dora(x, layer.weight, layer.bias, None, None, layer.magnitude, 0.0)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    (gm,) = torch.autograd.grad(y.sum(), [layer.magnitude])
    (gm_ref,) = torch.autograd.grad(ref.sum(), [layer.magnitude])
    torch.testing.assert_close(gm, gm_ref)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["magnitude"]


def test_identity_at_initialisation():
    linear = nn.Linear(20, 30)
    layer = DoRALinear.from_linear(copy.deepcopy(linear), rank=4, alpha=8)
    x = torch.randn(7, 20)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.magnitude, linear.weight.norm(dim=1).detach())


def test_zero_rows_give_no_nan():
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight[2].zero_()  # a pruned output row
    layer = DoRALinear.from_linear(linear, rank=2, alpha=4)
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    for t in (y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad):
        assert torch.isfinite(t).all()
    assert layer.magnitude.grad[2] == 0
    layer.eval()
    with torch.no_grad():
        assert torch.isfinite(layer(x)).all()


def test_small_magnitude_change_survives_bf16():
    # g = 1.003 is not representable in bf16 (neighbours 1.0 and 1.0078): a bf16 g would round to 1.0 and
    # the change would vanish. g - 1 = 0.003, computed in fp32, keeps its value in bf16 to 0.2%: the outputs round
    # up or down element by element, so on average they carry the 0.3% change.
    linear = nn.Linear(256, 128, bias=False).bfloat16()
    layer = DoRALinear.from_linear(linear, rank=4, alpha=8)
    x = torch.randn(64, 256).bfloat16()
    with torch.no_grad():
        base = layer(x).float()
        layer.magnitude.mul_(1.003)
        scaled = layer(x).float()
    assert torch.tensor(1.003).bfloat16().item() == 1.0
    ratio = (scaled / base)[base.abs() > 1e-2]
    torch.testing.assert_close(ratio.mean(), torch.tensor(1.003), rtol=0, atol=5e-4)


def test_rslora_scaling():
    layer = DoRALinear.from_linear(nn.Linear(8, 8), rank=16, alpha=8, rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_modes(p):
    torch.manual_seed(1)
    layer = make_layer(12, 10, 3, dtype=torch.float32, dropout=p)
    x = torch.randn(4, 12)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    layer.train()
    torch.manual_seed(5)
    y_exact = layer(x)
    layer.dropout_mode = "lora-branch"
    torch.manual_seed(5)
    y_branch = layer(x)
    if p == 0:
        torch.testing.assert_close(y_exact, y_eval, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y_branch, y_eval, rtol=1e-6, atol=1e-6)
    else:
        # Same dropout mask, different formulas: exact = W0 x + (g-1) W0 x~ + g sBA x~, branch = g (W0 x + sBA x~)
        assert not torch.allclose(y_exact, y_branch)
        torch.manual_seed(5)
        mask_x = torch.nn.functional.dropout(x, p, training=True)
        W, b, A, B, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
        g = layer.magnitude / (W + s * B @ A).norm(dim=1)
        exact = x @ W.t() + b + (g - 1) * (mask_x @ W.t()) + g * s * (mask_x @ A.t() @ B.t())
        branch = g * (x @ W.t() + s * (mask_x @ A.t() @ B.t())) + b
        torch.testing.assert_close(y_exact, exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_branch, branch, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- PEFT parity
def _peft_pair(d_in, d_out, rank, dtype, bias=True, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(dtype)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["0"], use_dora=True, lora_dropout=dropout))
    ours = copy.deepcopy(base)
    apply_dora(ours, [{"match": "0", "rank": rank, "alpha": 2 * rank, "dropout": dropout}], verbose=False)
    p = peft_model.base_model.model[0]
    with torch.no_grad():
        p.lora_B["default"].weight.normal_(0, 0.1)
        p.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.rand(d_out))
        o = ours[0]
        o.lora_A.copy_(p.lora_A["default"].weight)
        o.lora_B.copy_(p.lora_B["default"].weight)
        o.magnitude.copy_(p.lora_magnitude_vector["default"].weight)
        o.invalidate_norm_cache()
    return peft_model, ours


def _peft_params(peft_model):
    p = peft_model.base_model.model[0]
    return [p.lora_A["default"].weight, p.lora_B["default"].weight, p.lora_magnitude_vector["default"].weight]


def _our_params(ours):
    o = ours[0]
    return [o.lora_A, o.lora_B, o.magnitude]


@pytest.mark.parametrize("d_in,d_out,rank", SHAPES + [(128, 96, 16)])
def test_matches_peft_fp32(d_in, d_out, rank):
    peft_model, ours = _peft_pair(d_in, d_out, rank, torch.float32)
    x = torch.randn(4, 9, d_in)
    xp, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yp, yo = peft_model(xp), ours(xo)
    torch.testing.assert_close(yo, yp, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(yp)
    for got, want in zip(grads(yo, [xo] + _our_params(ours), gy), grads(yp, [xp] + _peft_params(peft_model), gy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d_in,d_out,rank", [(64, 32, 8), (128, 96, 16)])
def test_matches_peft_and_reference_bf16(d_in, d_out, rank):
    # PEFT computes the norm in bf16, we in fp32: compare both with the float64 formula on the same
    # bf16 weights, and require ours to be at least as accurate as PEFT, and close to it.
    peft_model, ours = _peft_pair(d_in, d_out, rank, torch.bfloat16)
    peft_model = peft_model.to(torch.bfloat16)
    ours = ours.to(torch.bfloat16)
    x = torch.randn(4, 9, d_in).bfloat16()
    o = ours[0]
    ref = dense_dora(x.double(), o.weight.double(), o.bias.double(), o.lora_A.double(), o.lora_B.double(),
                     o.magnitude.double(), o.scaling)
    with torch.no_grad():
        yp, yo = peft_model(x).double(), ours(x).double()
    err_ours, err_peft = (yo - ref).abs().max().item(), (yp - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err_ours <= max(1.5 * err_peft, 1e-3 * scale), (err_ours, err_peft)
    torch.testing.assert_close(yo, yp, rtol=0, atol=3e-2 * scale)
    # gradients, same comparison
    xo = x.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    gy = torch.randn(4, 9, d_out).bfloat16()
    go = grads(ours(xo), [xo] + _our_params(ours), gy)
    gp = grads(peft_model(xp), [xp] + _peft_params(peft_model), gy)
    for a, b in zip(go, gp):
        a, b = a.double(), b.double()
        assert (a - b).abs().max() <= 5e-2 * b.abs().max() + 1e-3


def test_matches_peft_with_dropout_exact_mode():
    torch.manual_seed(0)
    peft_model, ours = _peft_pair(24, 16, 4, torch.float32, dropout=0.25)
    peft_model.train()
    ours.train()
    x = torch.randn(5, 24)
    torch.manual_seed(3)
    yp = peft_model(x)
    torch.manual_seed(3)
    yo = ours(x)
    torch.testing.assert_close(yo, yp, rtol=1e-5, atol=1e-5)
    gp = grads(yp, _peft_params(peft_model), torch.ones_like(yp))
    go = grads(yo, _our_params(ours), torch.ones_like(yo))
    for a, b in zip(go, gp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- norm cache
def test_norm_cache_reused_within_a_step_and_refreshed_after_optimizer_step():
    layer = make_layer(16, 12, 4, dtype=torch.float32)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B, layer.magnitude], lr=0.1)
    x = torch.randn(8, 16)
    before = layer.norm_computations
    for _ in range(3):  # three gradient-accumulation micro-steps
        layer(x).pow(2).mean().backward()
    assert layer.norm_computations == before + 1
    opt.step()
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    assert layer.norm_computations == before + 2
    W, A, B, s = layer.weight, layer.lora_A, layer.lora_B, layer.scaling
    torch.testing.assert_close(layer.weight_norm(), (W + s * B @ A).norm(dim=1).detach(), rtol=1e-5, atol=1e-6)


class _DataSGD(torch.optim.Optimizer):
    """Writes through `.data`, which bumps no version counter (as DeepSpeed does with its weight copies)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def test_norm_cache_refreshed_after_an_optimizer_step_that_writes_through_data():
    layer = make_layer(16, 12, 4, dtype=torch.float32)
    opt = _DataSGD([layer.lora_A, layer.lora_B, layer.magnitude], lr=0.5)
    x = torch.randn(8, 16)
    layer(x).pow(2).mean().backward()
    versions = (layer.lora_A._version, layer.lora_B._version)
    opt.step()
    assert (layer.lora_A._version, layer.lora_B._version) == versions  # nothing a version key could see
    W, A, B, s = layer.weight, layer.lora_A, layer.lora_B, layer.scaling
    torch.testing.assert_close(layer.weight_norm(), (W + s * B @ A).norm(dim=1).detach(), rtol=1e-5, atol=1e-6)


def test_norm_cache_refreshed_after_in_place_edit_and_reused_by_checkpoint_recompute():
    from torch.utils.checkpoint import checkpoint
    layer = make_layer(16, 12, 4, dtype=torch.float32)
    x = torch.randn(8, 16, requires_grad=True)
    n0 = layer.norm_computations
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert layer.norm_computations == n0 + 1  # the recomputation in backward reused the cached norm
    with torch.no_grad():
        layer.lora_B.add_(1.0)  # in-place edit bumps the version counter
    layer(x)
    assert layer.norm_computations == n0 + 2
    W, A, B, s = layer.weight, layer.lora_A, layer.lora_B, layer.scaling
    torch.testing.assert_close(layer.weight_norm(), (W + s * B @ A).norm(dim=1).detach(), rtol=1e-5, atol=1e-6)


def test_eval_mode_caches_scale():
    layer = make_layer(16, 12, 4, dtype=torch.float32).eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        y1 = layer(x)
        n = layer.norm_computations
        y2 = layer(x)
    assert layer.norm_computations == n
    torch.testing.assert_close(y1, y2)
    with torch.no_grad():
        layer.magnitude.mul_(2)  # the cached scale must follow the magnitude
        y3 = layer(x)
    b = layer.bias
    torch.testing.assert_close(y3 - b, 2 * (y1 - b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- memory
def _largest_single_allocation(step) -> int:
    step()  # warm-up: the first step fills caches (||W0||^2, optimizer state)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max(e.self_cpu_memory_usage for e in prof.events())


def _train_step(model, x):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return step


def test_training_step_allocates_no_out_by_in_temporary():
    from peft import LoraConfig, get_peft_model
    d_in, d_out, tokens = 512, 256, 8
    weight_bytes = d_in * d_out * 4
    x = torch.randn(tokens, d_in)
    ours = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    apply_dora(ours, [{"match": "0", "rank": 8, "alpha": 16}], verbose=False)
    largest_ours = _largest_single_allocation(_train_step(ours, x))
    assert largest_ours < weight_bytes / 8, largest_ours
    # The check can fail: PEFT's DoRA materialises W0 + sBA (and an in x in identity) every step.
    peft_model = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out, bias=False)),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["0"], use_dora=True))
    largest_peft = _largest_single_allocation(_train_step(peft_model, x))
    assert largest_peft >= weight_bytes


def test_autocast_bf16_forward_and_backward():
    layer = make_layer(32, 16, 4, dtype=torch.float32)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    with torch.no_grad():
        ref = layer(x)
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=5e-2 * ref.abs().max().item())


def test_frozen_base_weight_is_enforced():
    layer = make_layer(8, 8, 2, dtype=torch.float32)
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        layer(torch.randn(2, 8))


def test_decomposition_analysis_from_factors_equals_dense():
    from dora.analysis import decomposition_delta, dora_decomposition_delta
    layer = make_layer(20, 12, 4)
    W, A, B, s, m = layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.magnitude
    V = W + s * B @ A
    adapted = (m / V.norm(dim=1))[:, None] * V
    dense = decomposition_delta(adapted.detach(), W)
    factored = dora_decomposition_delta(layer)
    assert dense.magnitude > 0 and dense.direction > 0
    assert factored.magnitude == pytest.approx(dense.magnitude, rel=1e-9)
    assert factored.direction == pytest.approx(dense.direction, rel=1e-9)
    untouched = DoRALinear.from_linear(nn.Linear(20, 12).double(), rank=4, alpha=8)
    zero = dora_decomposition_delta(untouched)
    assert zero.magnitude == pytest.approx(0, abs=1e-12) and zero.direction == pytest.approx(0, abs=1e-12)


def _dense_grads(layer, x, gy, detach=True):
    ref = dense_dora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling,
                     detach_norm=detach)
    return ref, grads(ref, [x, layer.lora_A, layer.lora_B, layer.magnitude, layer.bias], gy)


@pytest.mark.parametrize("shape", [(16,), (2, 3, 4, 16)])
def test_any_number_of_leading_dimensions(shape):
    layer = make_layer(16, 12, 4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    ref, want = _dense_grads(layer, x, gy)
    torch.testing.assert_close(y, ref)
    for got, w in zip(grads(y, [x, layer.lora_A, layer.lora_B, layer.magnitude, layer.bias], gy), want):
        torch.testing.assert_close(got, w)


def test_output_used_transposed():
    # attention-like use: the output's gradient arrives non-contiguous
    layer = make_layer(16, 12, 4, bias=False)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 5, 12, dtype=torch.float64)
    k = layer(x)
    loss = (q @ k.transpose(-2, -1)).softmax(-1).pow(2).sum()
    got = torch.autograd.grad(loss, [x, layer.lora_A, layer.lora_B, layer.magnitude])
    ref_k = dense_dora(x, layer.weight, None, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling)
    ref_loss = (q @ ref_k.transpose(-2, -1)).softmax(-1).pow(2).sum()
    want = torch.autograd.grad(ref_loss, [x, layer.lora_A, layer.lora_B, layer.magnitude])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_in_place_consumers_of_the_output():
    x = torch.randn(4, 16, dtype=torch.float64)
    # a bias-free layer saves its own output: an in-place op on it is caught by autograd, not silently wrong
    plain = make_layer(16, 12, 4, bias=False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.relu_(plain(x)).sum().backward()
    # inplace_safe keeps a separate copy; a layer with bias always returns a separate tensor
    for layer in (make_layer(16, 12, 4, bias=False, inplace_safe=True), make_layer(16, 12, 4)):
        gy = torch.ones(4, 12, dtype=torch.float64)
        y = layer(x)
        got = grads(torch.relu_(y), [layer.lora_A, layer.lora_B, layer.magnitude], gy)
        ref = torch.relu(dense_dora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                    layer.scaling))
        want = grads(ref, [layer.lora_A, layer.lora_B, layer.magnitude], gy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_magnitude_gradient_stays_accurate_with_a_large_bias_in_bf16():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64).bfloat16()
    with torch.no_grad():
        linear.bias.normal_(0, 10.0)  # |b| >> |W x|: y - b would have lost u's digits
    layer = DoRALinear.from_linear(linear, rank=4, alpha=8)
    x = torch.randn(512, 256).bfloat16()
    gy = torch.randn(512, 64).bfloat16()
    (got,) = torch.autograd.grad(layer(x), [layer.magnitude], gy)
    w, b = layer.weight.double(), layer.bias.double()
    m = layer.magnitude.detach().double().requires_grad_(True)
    ref = (m / w.norm(dim=1)) * (x.double() @ w.t()) + b
    (want,) = torch.autograd.grad(ref, [m], gy.double())
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_training_after_inference_mode():
    layer = make_layer(16, 12, 4, dtype=torch.float32)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()  # the norm cached under inference mode is not reused by autograd
    assert torch.isfinite(layer.magnitude.grad).all()


# ----------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("mode", ["exact", "lora-branch"])
def test_no_dropout_in_eval_mode(mode):
    layer = make_layer(16, 12, 4, dropout=0.5, dropout_mode=mode).eval()
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    ref = dense_dora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling)
    torch.testing.assert_close(layer(x), ref)  # the autograd path
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)  # the cached-scale path


@pytest.mark.parametrize("magnitude_only", [False, True])
def test_exact_dropout_output_and_gradients_match_the_formula(magnitude_only):
    # y = W0 x + (g-1) W0 x~ + g s B A x~ + b with x~ = dropout(x), written out in float64 with the same mask
    if magnitude_only:
        layer = DoRALinear.from_linear(nn.Linear(16, 12).double(), magnitude_only=True, dropout=0.3)
        with torch.no_grad():
            layer.magnitude.mul_(1 + 0.3 * torch.rand(12, dtype=torch.float64))
        layer.bias.requires_grad_(True)
    else:
        layer = make_layer(16, 12, 4, dropout=0.3)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    params = [x, layer.magnitude, layer.bias] + ([] if magnitude_only else [layer.lora_A, layer.lora_B])
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    x_drop = torch.nn.functional.dropout(x, 0.3, training=True)
    W, b, m = layer.weight, layer.bias, layer.magnitude
    V = W if magnitude_only else W + layer.scaling * layer.lora_B @ layer.lora_A
    g = m / V.norm(dim=1).detach()
    ref = x @ W.t() + (g - 1) * (x_drop @ W.t()) + b
    if not magnitude_only:
        ref = ref + g * layer.scaling * (x_drop @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    for got, want in zip(grads(y, params, gy), grads(ref, params, gy)):
        torch.testing.assert_close(got, want)


def _exact_dropout_run(layer, x, gy, params):
    torch.manual_seed(7)
    y = layer(x)
    return (y, *grads(y, params, gy))


@pytest.mark.parametrize("shape", [(7, 40), (3, 5, 40)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("magnitude_only", [False, True])
def test_sparse_exact_dropout_equals_dense_form(shape, bias, x_grad, magnitude_only, sparse_calls):
    # Same seed, same mask: the sparse form (W0 x~ = (W0 x - W0 r) / keep, a sampled product in backward) gives the
    # dense form's output and gradients up to rounding, in float64; with chunks of 3 weight rows (4 chunks).
    if magnitude_only:
        layer = DoRALinear.from_linear(nn.Linear(40, 12, bias=bias).double(), magnitude_only=True, dropout=0.3)
        with torch.no_grad():
            layer.magnitude.mul_(1 + 0.3 * torch.rand(12, dtype=torch.float64))
        if bias:
            layer.bias.requires_grad_(True)
    else:
        layer = make_layer(40, 12, 4, bias=bias, dropout=0.3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=x_grad)
    gy = torch.randn(*shape[:-1], 12, dtype=torch.float64)
    params = ([x] if x_grad else []) + [layer.magnitude] + ([layer.bias] if bias else [])
    params += [] if magnitude_only else [layer.lora_A, layer.lora_B]
    sparse_calls.force("never")
    dense = _exact_dropout_run(layer, x, gy, params)
    assert sparse_calls.counts == (0, 0)
    sparse_calls.force("always", chunk_elements=3 * 40)
    sparse = _exact_dropout_run(layer, x, gy, params)
    assert sparse_calls.counts == (1, (4 + (not magnitude_only)) if x_grad else 0)
    for got, want in zip(sparse, dense):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the no-grad path (training mode, no graph) takes the same form
        torch.manual_seed(7)
        torch.testing.assert_close(layer(x), dense[0], rtol=1e-12, atol=1e-12)
    assert sparse_calls.forward == 2


def test_sparse_exact_dropout_equals_dense_form_in_fp32(sparse_calls):
    # fp32 at the paper's p = 0.05 and a wider layer: the two forms differ by float rounding only
    layer = make_layer(256, 192, 8, dtype=torch.float32, dropout=0.05)
    x = torch.randn(4, 32, 256, requires_grad=True)
    gy = torch.randn(4, 32, 192)
    params = [x, layer.lora_A, layer.lora_B, layer.magnitude, layer.bias]
    sparse_calls.force("never")
    dense = _exact_dropout_run(layer, x, gy, params)
    sparse_calls.force("always")
    sparse = _exact_dropout_run(layer, x, gy, params)
    assert sparse_calls.counts == (1, 2)
    for got, want in zip(sparse, dense):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_sparse_exact_dropout_is_chosen_where_it_pays(sparse_calls, monkeypatch):
    from dora.layer import SPARSE_DROPOUT_MAX_P, SPARSE_DROPOUT_MIN_ROWS, SPARSE_DROPOUT_MIN_WEIGHT, _sparse_dropout
    assert layer_module.SPARSE_DROPOUT == "auto"
    x, w = torch.randn(2, SPARSE_DROPOUT_MIN_ROWS // 2, 256), torch.empty(SPARSE_DROPOUT_MIN_WEIGHT // 256, 256)
    assert _sparse_dropout(x, w, 1 - 0.05) and _sparse_dropout(x.double(), w, 1 - 0.05)
    assert _sparse_dropout(x, w, 1 - SPARSE_DROPOUT_MAX_P)
    assert not _sparse_dropout(x, w, 1 - 1.5 * SPARSE_DROPOUT_MAX_P)
    assert not _sparse_dropout(x[:, 1:], w, 1 - 0.05)  # too few rows
    assert not _sparse_dropout(x, w[1:], 1 - 0.05)  # too small a layer
    assert not _sparse_dropout(x.bfloat16(), w, 1 - 0.05)  # no bf16 CSR kernels on CPU
    assert not _sparse_dropout(x.to("meta"), w, 1 - 0.05)  # not CPU: dense
    monkeypatch.setattr(layer_module, "SPARSE_DROPOUT", "always")  # honoured where supported
    assert _sparse_dropout(x[:, :2], w[:2], 0.5) and not _sparse_dropout(x.bfloat16(), w, 0.5)
    assert not _sparse_dropout(x.to("meta"), w, 0.5)
    monkeypatch.setattr(layer_module, "SPARSE_DROPOUT", "never")
    assert not _sparse_dropout(x, w, 1 - 0.05)
    monkeypatch.setattr(layer_module, "SPARSE_DROPOUT", "sparse")
    with pytest.raises(ValueError, match="SPARSE_DROPOUT must be one of"):
        _sparse_dropout(x, w, 1 - 0.05)
    # through a layer: sparse at p = 0.05, dense above the threshold, with few rows or a narrow layer
    for p, rows, width, counts in [(0.05, SPARSE_DROPOUT_MIN_ROWS, 256, (1, 2)),
                                   (1.5 * SPARSE_DROPOUT_MAX_P, 1024, 256, (0, 0)),
                                   (0.05, SPARSE_DROPOUT_MIN_ROWS - 1, 256, (0, 0)), (0.05, 1024, 96, (0, 0))]:
        sparse_calls.force("auto")
        layer = make_layer(width, 256, 4, dtype=torch.float32, dropout=p)
        layer(torch.randn(rows, width, requires_grad=True)).sum().backward()
        assert sparse_calls.counts == counts


def test_sparse_exact_dropout_stays_out_of_compiled_graphs(sparse_calls):
    # The number of dropped entries is data-dependent (nonzero): under torch.compile the dense form keeps one graph,
    # even where the sparse one is forced.
    import torch._dynamo as dynamo
    sparse_calls.force("always")
    layer = make_layer(16, 12, 4, dtype=torch.float32, dropout=0.05)
    dynamo.reset()
    explained = dynamo.explain(lambda x: layer(x).sum())(torch.randn(8, 16, requires_grad=True))
    dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_training_with_sparse_exact_dropout_follows_the_dense_form(sparse_calls):
    # A few AdamW steps of a small network in float64 with dropout 0.05 on its adapted layers (one of them
    # magnitude-only): the same losses in both forms (same seeds, so the same masks).
    from dora_helpers import TinyNet
    rules = [{"match": r"layers\.\d+\.(q_proj|v_proj|up|down)", "rank": 4, "alpha": 8, "dropout": 0.05},
             {"match": "embed", "magnitude_only": True, "dropout": 0.05}]
    x, target = torch.randn(8, 6, 12, dtype=torch.float64), torch.randn(8, 6, 5, dtype=torch.float64)
    losses = {}
    for form in ("never", "always"):
        sparse_calls.force(form)
        torch.manual_seed(0)
        model = TinyNet().double()
        apply_dora(model, rules, verbose=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(1)
        losses[form] = []
        for _ in range(4):
            loss = (model(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[form].append(loss.item())
        # 9 adapted layers; the input needs no gradient in the embedding, so 8 sampled products per step
        assert sparse_calls.counts == ((4 * 9, 4 * 8 * 2) if form == "always" else (0, 0))
    assert losses["always"] == pytest.approx(losses["never"], rel=1e-10)
    assert losses["always"][-1] < losses["always"][0]


@pytest.mark.parametrize("mode", ["exact", "lora-branch"])
def test_dropout_training_step_saves_at_most_one_output_sized_tensor_more_than_lora(mode):
    # What autograd keeps between forward and backward for one layer (input requiring grad, as inside a
    # network): PEFT LoRA keeps the dropout mask and dropped input, and x~ A^T. Ours may add one output-sized
    # tensor (the magnitude gradient's h or u) and (out,) vectors, and nothing of size out x in.
    from peft import LoraConfig, get_peft_model
    d_in, d_out, tokens = 64, 96, 32

    def saved_bytes(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t
        x = torch.randn(tokens, d_in, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    torch.manual_seed(0)
    lora = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out, bias=False)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.1))
    ours = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    apply_dora(ours, [{"match": "0", "rank": 4, "alpha": 8, "dropout": 0.1, "dropout_mode": mode}], verbose=False)
    extra = saved_bytes(ours) - saved_bytes(lora)
    assert extra <= (tokens + 4) * d_out * 4, extra  # and a few (out,) vectors: g, g - 1


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_small_magnitude_change_survives_bf16_in_training(dropout):
    # The autograd path (the layer trains) applies g - 1 as the no-grad path does, also in the exact dropout
    # form: rounding g = 1.003 to bf16 first would give 1.0 and lose the change.
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False).bfloat16()
    layer = DoRALinear.from_linear(linear, rank=4, alpha=8, dropout=dropout)
    x = torch.randn(64, 256).bfloat16()
    torch.manual_seed(1)
    base = layer(x).double()
    with torch.no_grad():
        layer.magnitude.mul_(1.003)
    torch.manual_seed(1)
    scaled = layer(x)
    assert scaled.requires_grad
    # the change is 0.003 * W0 x (no dropout) or 0.003 * W0 dropout(x) (exact form)
    torch.manual_seed(1)
    x_drop = torch.nn.functional.dropout(x.double(), dropout, training=True) if dropout else x.double()
    direction = x_drop @ layer.weight.double().t()
    change = ((scaled.double() - base) * direction).sum() / direction.pow(2).sum()
    assert change.item() == pytest.approx(0.003, abs=6e-4)  # bf16 output rounding; the mutant gives 0


# ----------------------------------------------------------------------------------------------- misc
def test_a_layer_built_directly_is_initialised_like_nn_linear():
    torch.manual_seed(3)
    linear = nn.Linear(24, 10)
    torch.manual_seed(3)
    layer = DoRALinear(24, 10, rank=4, alpha=8)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.lora_B, torch.zeros(10, 4)) and layer.lora_A.abs().max() > 0
    torch.testing.assert_close(layer.magnitude, linear.weight.detach().norm(dim=1))
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), linear(x))


def test_double_backward_is_refused_clearly():
    layer = make_layer(8, 6, 2)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)


def test_decomposition_analysis_keeps_small_updates_in_fp32_layers():
    # delta_D of a small update is ~1e-7: a norm computed in fp32 (relative error 1e-7) would swamp it
    from dora.analysis import decomposition_delta, model_decomposition_deltas
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    apply_dora(model, [{"match": "0", "rank": 8, "alpha": 16}], verbose=False)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 1e-4)
        layer.magnitude.mul_(1.01)
    W, A, B, m = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B, layer.magnitude))
    V = W + layer.scaling * B @ A
    want = decomposition_delta((m / V.norm(dim=1))[:, None] * V, W)
    got = model_decomposition_deltas(model)["0"]
    assert got.direction == pytest.approx(want.direction, rel=1e-6)
    assert got.magnitude == pytest.approx(want.magnitude, rel=1e-9)


# ----------------------------------------------------------------------------------------------- input layouts
# Non-contiguous inputs as models produce them, each of shape (2, 6, 16): a sequence-first tensor transposed, a
# conv feature map flattened to tokens, and LLaVA's hidden_states[:, 1:] (the CLS token dropped) with batch 2.
NON_CONTIGUOUS = {
    "transpose(0, 1)": (lambda: torch.randn(6, 2, 16, dtype=torch.float64), lambda t: t.transpose(0, 1)),
    "flatten(2).transpose(1, 2)": (lambda: torch.randn(2, 16, 2, 3, dtype=torch.float64),
                                   lambda t: t.flatten(2).transpose(1, 2)),
    "[:, 1:]": (lambda: torch.randn(2, 7, 16, dtype=torch.float64), lambda t: t[:, 1:]),
}
DROPOUT_FORMS = {  # (layer options, SPARSE_DROPOUT)
    "none": ({}, "never"),
    "lora-branch": ({"dropout": 0.3, "dropout_mode": "lora-branch"}, "never"),
    "exact dense": ({"dropout": 0.3}, "never"),
    "exact sparse": ({"dropout": 0.3}, "always"),
}


def _formula_by_hand(layer, x, seed):
    """The layer's output written out in float64 from its tensors and the dropout mask of `seed` (drawn as
    F.dropout draws it, over x's logical shape): the DoRA formula in each dropout form."""
    W, b, A, B, m, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling
    b = 0.0 if b is None else b
    V = W + s * B @ A
    norm = V.norm(dim=1)
    g = m / (norm.detach() if layer.detach_norm else norm)
    if not layer.dropout:
        return g * (x @ V.t()) + b
    torch.manual_seed(seed)
    x_drop = torch.nn.functional.dropout(x.contiguous(), layer.dropout, training=True)
    adapter = s * (x_drop @ A.t() @ B.t())
    if layer.dropout_mode == "lora-branch":
        return g * (x @ W.t() + adapter) + b
    return x @ W.t() + (g - 1) * (x_drop @ W.t()) + g * adapter + b


@pytest.mark.parametrize("layout", NON_CONTIGUOUS)
@pytest.mark.parametrize("form", DROPOUT_FORMS)
def test_non_contiguous_inputs_train_like_contiguous_ones(layout, form, sparse_calls):
    # nn.Linear takes these layouts; backward used to fail with "view size is not compatible with input tensor's
    # size and stride" (a view of x for lora_A's gradient). Same gradients as the contiguous input's, with the
    # same mask, and as the formula written out.
    options, sparse = DROPOUT_FORMS[form]
    sparse_calls.force(sparse)
    layer = make_layer(16, 12, 4, **options)
    make, arrange = NON_CONTIGUOUS[layout]
    leaf = make().requires_grad_(True)
    x = arrange(leaf)
    assert x.shape == (2, 6, 16) and not x.is_contiguous()
    x_c = x.detach().contiguous().requires_grad_(True)
    params = [layer.lora_A, layer.lora_B, layer.magnitude, layer.bias]
    gy = torch.randn(2, 6, 12, dtype=torch.float64)
    runs = []
    for inp in (x, x_c):
        torch.manual_seed(11)
        y = layer(inp)
        runs.append((y, *grads(y, [inp] + params, gy)))
    assert sparse_calls.forward == (2 if sparse == "always" else 0)
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    ref = _formula_by_hand(layer, x, seed=11)
    torch.testing.assert_close(runs[0][0], ref)
    for got, want in zip(runs[0][1:], grads(ref, [x] + params, gy)):
        torch.testing.assert_close(got, want)


class _CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a tensor into new memory (clone, copy_, contiguous's _to_copy)."""

    COPIES = ("aten.clone", "aten.copy_", "aten._to_copy")

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.COPIES):
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", DROPOUT_FORMS)
def test_backward_copies_a_contiguous_input_never_and_a_transposed_one_once(form, sparse_calls):
    # The fix for non-contiguous inputs flattens x for lora_A's gradient with reshape: a view (no copy) when x is
    # contiguous, as the view was before; one copy of a transposed x, which no view can flatten.
    options, sparse = DROPOUT_FORMS[form]
    sparse_calls.force(sparse)
    layer = make_layer(16, 12, 4, bias=False, **options)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    for x, copies in [(torch.randn(2, 6, 16, dtype=torch.float64), 0),
                      (torch.randn(6, 2, 16, dtype=torch.float64).transpose(0, 1), 1)]:
        x.requires_grad_(True)
        y = layer(x)
        with _CopyCounter() as counter:
            grads(y, [x] + params, torch.ones_like(y))
        assert len(counter.copies) == copies, counter.copies


# ----------------------------------------------------------------------------------------------- magnitude gradient
# Magnitudes as multiples of their row's norm ||W0 + sBA||, i.e. g = m / norm: exactly 0 (twice, once as -0.0),
# so small that g - 1 rounds to -1 in float64, small, and ordinary values of either sign.
G_VALUES = [0.0, -0.0, 1e-20, 1e-9, 1e-3, 0.05, 0.3, -0.5, 1.0, 1.3, 0.0, 2.0]


@pytest.mark.parametrize("form", DROPOUT_FORMS)
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_magnitude_gradient_at_zero_and_small_magnitudes_equals_the_formula(form, detach_norm, bias, sparse_calls):
    # dL/dm where m_i == 0 used to be 0: dL/dg was recovered from the scaled output u = g (W0 + sBA) x as u / g,
    # and u holds nothing of (W0 + sBA) x where g == 0 (nor, in float64, where g < 1e-16, g - 1 rounding to -1).
    options, sparse = DROPOUT_FORMS[form]
    sparse_calls.force(sparse)
    layer = make_layer(16, 12, 4, bias=bias, detach_norm=detach_norm, **options)
    with torch.no_grad():
        layer.magnitude.copy_(torch.tensor(G_VALUES, dtype=torch.float64) * layer.weight_norm())
    assert (layer.magnitude == 0).sum() == 3
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.magnitude] + ([layer.bias] if bias else [])
    gy = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.manual_seed(11)
    y = layer(x)
    ref = _formula_by_hand(layer, x, seed=11)
    torch.testing.assert_close(y, ref)
    got, want = grads(y, params, gy), grads(ref, params, gy)
    assert (want[3][layer.magnitude == 0].abs() > 1e-3).all()  # the reference's gradient there is not 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bias_free_layer_keeps_its_output_only_while_no_magnitude_is_small():
    # A bias-free layer returns and keeps u = g v (no extra memory; an in-place op on it is caught by autograd)
    # while every |g| >= 1/16, re-checked when the magnitude changes: with a zero magnitude it keeps v instead.
    layer = make_layer(16, 12, 4, bias=False)
    x = torch.randn(4, 16, dtype=torch.float64)
    gy = torch.randn(4, 12, dtype=torch.float64)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(layer(x).mul_(2), params, gy)
    for row, value in [(3, 0.0), (3, 1e-9), (3, 1.0)]:
        with torch.no_grad():
            layer.magnitude[row] = value * layer.weight_norm()[row]  # in place: a new version, seen by the check
        y, ref = layer(x), _formula_by_hand(layer, x, seed=0)
        for a, b in zip(grads(y, params, gy), grads(ref, params, gy)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # g back near 1: u kept again
        grads(layer(x).mul_(2), params, gy)


# ----------------------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("alpha", [0, 0.0, -2.0, float("nan"), float("inf")])
def test_alpha_must_be_a_positive_number(alpha):
    # at alpha 0 the adapter's update s B A is 0 whatever A and B are: neither gets a gradient, it never learns
    with pytest.raises(ValueError, match=rf"alpha must be a finite number > 0, got {alpha!r}"):
        DoRALinear(8, 6, rank=2, alpha=alpha)
    with pytest.raises(ValueError, match=rf"alpha must be a finite number > 0, got {alpha!r}"):
        DoRALinear.from_linear(nn.Linear(8, 6), rank=2, alpha=alpha)
    with pytest.raises(TypeError, match=r"alpha must be a finite number > 0, got '16' \(str\)"):
        DoRALinear(8, 6, rank=2, alpha="16")


@pytest.mark.parametrize("rank", [8.5, 8.0, "8", True, None])
def test_rank_must_be_an_integer(rank):
    with pytest.raises(TypeError, match=rf"rank must be an integer, got {re.escape(repr(rank))} "
                                        rf"\({type(rank).__name__}\)"):
        DoRALinear(8, 6, rank=rank, alpha=16)
    with pytest.raises(TypeError, match="rank must be an integer"):
        DoRALinear.from_linear(nn.Linear(8, 6), rank=rank)
    assert DoRALinear(8, 6, rank=np.int64(3)).rank == 3  # integers of other kinds are integers


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_must_be_at_least_one(rank):
    with pytest.raises(ValueError, match=rf"rank must be >= 1, got {rank}"):
        DoRALinear(8, 6, rank=rank)


def test_a_forward_on_the_meta_device_is_refused_clearly():
    # Before: "unknown device type for autocast" (meta input) or "Tensor on device meta is not on the expected
    # device cpu" (meta layer, real input).
    meta = DoRALinear(8, 6, rank=2, device="meta")
    for layer, x, which in [(meta, torch.randn(3, 8, device="meta"), "x and weight"),
                            (meta, torch.randn(3, 8), "weight"),
                            (DoRALinear(8, 6, rank=2), torch.randn(3, 8, device="meta"), "x")]:
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(
                    ValueError, match=rf"DoRALinear\(8 -> 6\): {which} on the meta device"):
                layer(x)
    meta.to_empty(device="cpu").reset_parameters()  # materialised: it runs
    assert meta(torch.randn(3, 8)).shape == (3, 6)


def test_a_layer_made_under_inference_mode_is_refused_at_construction():
    # Its parameters would be inference tensors: never trainable (and before, any forward failed with "Inference
    # tensors do not track version counter").
    linear = nn.Linear(8, 6)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"DoRALinear\(8 -> 6\) created under torch.inference_mode\(\)"):
            DoRALinear(8, 6, rank=2)
        with pytest.raises(RuntimeError, match=r"created under torch.inference_mode\(\)"):
            DoRALinear.from_linear(linear, rank=2)
        frozen = nn.Linear(8, 6)
    with pytest.raises(RuntimeError, match=r"the Linear's weight is an inference tensor"):
        DoRALinear.from_linear(frozen, rank=2)
    layer = DoRALinear.from_linear(linear, rank=2)  # outside inference mode: trains, and runs under it
    layer(torch.randn(3, 8)).sum().backward()
    with torch.inference_mode():
        layer(torch.randn(3, 8))


def test_from_linear_refuses_a_dora_layer_and_other_modules():
    layer = DoRALinear(8, 6, rank=2)
    with pytest.raises(TypeError, match=r"from_linear takes an nn.Linear, got a DoRALinear: .*already adapted"):
        DoRALinear.from_linear(layer, rank=4)
    with pytest.raises(TypeError, match=r"from_linear takes an nn.Linear, got a Conv1d"):
        DoRALinear.from_linear(nn.Conv1d(8, 6, 1))
