"""The norm cache never serves a stale norm: every way of giving a layer new tensors is compared with a freshly
built layer (no cache) holding the same tensors. Also torch.compile, where the norm is computed in the graph."""
import copy

import torch
import torch.nn as nn

from dora import DoRALinear, apply_dora, dora_modules, invalidate_norm_caches
from dora_helpers import fresh_copy, perturb_adapter


def adapted_model(seed=0, d=16, trained=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d, bias=False))
    apply_dora(model, [{"match": r"\d", "rank": 4, "alpha": 8}], verbose=False)
    if trained:
        perturb_adapter(model)
    return model


def assert_matches_fresh(layer, x):
    """The layer's output (in its mode, with and without grad) equals that of a fresh copy of its tensors."""
    want = fresh_copy(layer)(x)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)


def checkpoint_of(model, seed):
    """A state dict with other adapter values, as a different checkpoint of the same run holds."""
    other = adapted_model(seed=0)
    torch.manual_seed(seed)
    perturb_adapter(other, scale=0.5)
    return {k: v.detach().clone() for k, v in other.state_dict().items()}


def test_load_state_dict_with_assign_twice_checkpoint_sweep():
    model = adapted_model()
    x = torch.randn(5, 16)
    model(x)  # fills the caches
    for seed in (1, 2):  # two checkpoints in a row, loaded by assignment (new tensor objects, versions alike)
        model.load_state_dict(checkpoint_of(model, seed), assign=True)
        for layer in model:
            assert_matches_fresh(layer, x)


def test_deepcopy_after_forward_then_load_into_the_copy():
    model = adapted_model(trained=False)  # as apply_dora leaves it
    x = torch.randn(5, 16)
    model(x)
    clone = copy.deepcopy(model)
    clone.load_state_dict(checkpoint_of(model, 3))
    for layer in list(clone) + list(model):
        assert_matches_fresh(layer, x)


def test_functional_call_twice_with_fresh_tensors():
    layer = adapted_model()[0]
    x = torch.randn(5, 16)
    layer(x)
    for seed in (1, 2):
        torch.manual_seed(seed)
        params = {n: (p.detach() + 0.3 * torch.randn_like(p)).requires_grad_(p.requires_grad)
                  for n, p in layer.named_parameters()}
        got = torch.func.functional_call(layer, params, (x,))
        reference = fresh_copy(layer)
        with torch.no_grad():
            for n, p in params.items():
                getattr(reference, n).copy_(p)
        torch.testing.assert_close(got, reference(x), rtol=1e-6, atol=1e-6)


def test_reassigned_parameter():
    layer = adapted_model(trained=False)[1]
    x = torch.randn(5, 16)
    layer(x)
    layer.lora_B = nn.Parameter(nn.init.normal_(torch.empty_like(layer.lora_B)))
    assert_matches_fresh(layer, x)
    layer.eval()
    layer(x)
    layer.magnitude = nn.Parameter(2 * layer.magnitude.detach())  # the eval cache of g - 1 follows it
    assert_matches_fresh(layer, x)


def test_dtype_round_trip_without_a_forward_in_between():
    model = adapted_model()
    x = torch.randn(5, 16)
    model(x)
    model.to(torch.bfloat16).to(torch.float32)  # same tensors and versions, values rounded to bf16
    for layer in model:
        assert_matches_fresh(layer, x)


def test_in_place_edit_of_the_base_weight():
    # ||W0||^2 is cached as well: an in-place edit of W0 bumps its version, which that cache must see
    layer = adapted_model()[0]
    x = torch.randn(5, 16)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(0.5)
    assert_matches_fresh(layer, x)


def test_base_weight_written_through_data_is_seen_after_an_optimizer_step():
    # DeepSpeed writes through .data (no version bump): every cache entry, ||W0||^2 included, lasts one step
    layer = adapted_model()[0]
    x = torch.randn(5, 16)
    opt = torch.optim.SGD([layer.magnitude], lr=0.0)
    layer(x)
    layer.weight.data.mul_(0.5)
    opt.step()
    assert_matches_fresh(layer, x)


def test_writes_through_data_need_invalidate_norm_caches():
    model = adapted_model()
    x = torch.randn(5, 16)
    model(x)
    model.eval()
    with torch.no_grad():
        model(x)  # caches g - 1 too
    for layer in model:
        layer.lora_B.data.mul_(2)
        layer.magnitude.data.mul_(1.5)
    invalidate_norm_caches(model)
    for layer in model:
        assert_matches_fresh(layer, x)


def test_copies_and_pickles_carry_no_cache(tmp_path):
    layer = adapted_model()[0]
    x = torch.randn(5, 16)
    layer(x)
    torch.save(layer, tmp_path / "layer.pt")  # the cache holds weak references: it must not be pickled
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert loaded._norm_cache.value is None and copy.deepcopy(layer)._norm_cache.value is None
    torch.testing.assert_close(loaded(x), layer(x))


def test_compiled_train_step_has_no_graph_break_and_matches_eager():
    import torch._dynamo as dynamo

    def loss_fn(model, x):
        return model(x).pow(2).mean()

    x = torch.randn(6, 16)
    for options in ({}, {"dropout": 0.1}, {"dropout": 0.1, "dropout_mode": "lora-branch"},
                    {"magnitude_only": True}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16, bias=False))
        apply_dora(model, [{"match": r"\d", "rank": 4, "alpha": 8, **options}], verbose=False)
        perturb_adapter(model)
        dynamo.reset()
        explained = dynamo.explain(loss_fn)(model, x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        if options.get("dropout"):
            continue  # random masks: the graph and the no-break check are what matters here
        eager = copy.deepcopy(model)
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        loss = compiled(model, x)
        loss.backward()
        want = loss_fn(eager, x)
        want.backward()
        torch.testing.assert_close(loss, want)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, msg=name)
        model.eval()
        eager.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(model, x), loss_fn(eager, x))
    dynamo.reset()


def test_compiled_layer_in_a_fresh_module_matches_a_layer_built_directly():
    # DoRALinear built directly (not from an nn.Linear), compiled: outputs as the eager layer's
    torch.manual_seed(0)
    layer = DoRALinear(16, 8, rank=4, alpha=8)
    perturb_adapter(nn.Sequential(layer))
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), fresh_copy(layer)(x))
    torch._dynamo.reset()


def test_model_level_invalidation_reaches_every_layer():
    model = adapted_model()
    model(torch.randn(2, 16))
    invalidate_norm_caches(model)
    assert all(m._norm_cache.value is None for m in dora_modules(model).values())


def test_eval_scale_cache_is_kept_per_compute_dtype():
    # g - 1 is cached in the compute dtype: a bf16 autocast forward caches it rounded to bf16, which an fp32
    # forward after it must not reuse (it would be off by ~2e-4 relative: bf16's rounding of g - 1).
    layer = adapted_model()[0].eval()
    x = torch.randn(5, 16)
    want = fresh_copy(layer).eval()(x)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # and back: the bf16 entry is not the fp32 one either
            torch.testing.assert_close(layer(x).float(), want, rtol=0, atol=0.05 * want.abs().max().item())
