"""DVoRA (DoRA's magnitude / direction split with VeRA's update) and plain VeRA, the rule option `variant: vera`:
the shared projections, float64 parity with the formula written out densely, both dropout forms, merge / unmerge,
save / load (projections saved or regenerated, checked), torch.compile, PEFT VeraConfig interop, rule errors."""
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dora import AdapterError, TargetingError, apply_dora, dora_modules, export_peft, import_peft, load_adapter
from dora import merge_dora, save_adapter, unmerge_dora
from dora.adapter import CONFIG_NAME, WEIGHTS_NAME
from dora.vera import VeRALinear, vera_projection_groups
from dora_helpers import TinyNet

RANK, SEED = 6, 11
TARGET = r"layers\.\d+\.(q_proj|v_proj|up|down)|head"  # in / out from 5 to 24: the projections are sliced


def vera_rule(**options):
    return {"match": TARGET, "rank": RANK, "variant": "vera", "projection_seed": SEED, **options}


def model_with(dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    apply_dora(model, [vera_rule(**options)], verbose=False)
    return model


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dora_modules(model).values():
            m.vera_lambda_b.copy_(torch.randn(m.vera_lambda_b.shape, generator=g, dtype=m.vera_lambda_b.dtype))
            m.vera_lambda_d.add_(torch.rand(m.vera_lambda_d.shape, generator=g, dtype=m.vera_lambda_d.dtype))
            if m.magnitude is not None:
                m.magnitude.mul_(1 + 0.3 * torch.rand(m.magnitude.shape, generator=g, dtype=m.magnitude.dtype))
            m.invalidate_norm_cache()
    return model


def reference_projections(rank, max_in, max_out, seed):
    """VeRA's projections from scratch: one CPU generator, A (rank, in) then B (out, rank), each uniform in
    +-sqrt(6 / fan_in) (Kaiming-uniform, gain sqrt(2))."""
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(rank, max_in).uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=g)
    B = torch.empty(max_out, rank).uniform_(-math.sqrt(6 / rank), math.sqrt(6 / rank), generator=g)
    return A, B


def dense_vera(x, layer, A, B, mask=None, keep=1.0, mode="exact"):
    """y for W' = m (W0 + diag(b) B diag(d) A) / ||.||_row (DVoRA) or W0 + diag(b) B diag(d) A (VeRA), written out
    with the out x in matrix; dropout (mask / keep) on the adapter's input as the layer's modes define it."""
    W = layer.weight
    bias = 0.0 if layer.bias is None else layer.bias
    delta = (torch.diag(layer.vera_lambda_b) @ B[: W.shape[0]].to(W) @ torch.diag(layer.vera_lambda_d)
             @ A[:, : W.shape[1]].to(W))
    x_drop = x if mask is None else x * mask / keep
    if layer.magnitude is None:
        return x @ W.t() + x_drop @ delta.t() + bias
    norm = (W + delta).norm(dim=1)
    g = layer.magnitude / (norm.detach() if layer.detach_norm else norm)
    if mask is None or mode == "lora-branch":
        y = g * (x @ W.t() + x_drop @ delta.t())
    else:  # W0 x + (g - 1) W0 x~ + g delta x~
        y = x @ W.t() + (g - 1) * (x_drop @ W.t()) + g * (x_drop @ delta.t())
    return y + bias


def test_projections_are_veras_shared_and_sliced():
    model = model_with(torch.float32)
    layers = dora_modules(model)
    groups = vera_projection_groups(model)
    assert list(groups) == [f"vera_projections.r{RANK}.seed{SEED}"]
    group = groups[f"vera_projections.r{RANK}.seed{SEED}"]
    assert all(m.vera_projections is group for m in layers.values())  # one pair for every layer
    max_in = max(m.in_features for m in layers.values())
    max_out = max(m.out_features for m in layers.values())
    A, B = reference_projections(RANK, max_in, max_out, SEED)
    assert torch.equal(group.A, A) and torch.equal(group.B, B)
    head = layers["head"]  # 16 -> 5: the leading rows of B
    sliced_A, sliced_B = head.projection_slices()
    assert torch.equal(sliced_A, A[:, :16]) and torch.equal(sliced_B, B[:5])
    # not in the state dict (the adapter file carries them), trained parts are b, d, m only
    assert not any("vera_projections" in k for k in model.state_dict())
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {
        "vera_lambda_b", "vera_lambda_d", "magnitude"}


def test_init_is_the_base_model_with_d_initial():
    torch.manual_seed(0)
    base = TinyNet().double()
    model = model_with(d_initial=0.25)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.equal(model(x), base(x))  # b = 0: W' == W0, and the magnitude is ||W0||
    for m in dora_modules(model).values():
        assert torch.all(m.vera_lambda_b == 0) and torch.all(m.vera_lambda_d == 0.25)
        assert torch.allclose(m.magnitude, m.weight.norm(dim=1))
    report = apply_dora(TinyNet(), [vera_rule()], verbose=False)
    per_module = [(m_out + RANK + m_out) for m_out in (16, 16, 24, 16) * 2 + (5,)]  # b, d, m
    assert report.trainable == sum(per_module) and report.rows[0].kind == "dvora"


@pytest.mark.parametrize("magnitude,detach_norm", [(True, True), (True, False), (False, True)])
def test_float64_parity_with_the_dense_formula(magnitude, detach_norm):
    model = perturb(model_with(magnitude=magnitude, detach_norm=detach_norm))
    A, B = reference_projections(RANK, 24, 24, SEED)
    for name, layer in dora_modules(model).items():
        x = torch.randn(4, 3, layer.in_features, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        x_ref = x.detach().clone().requires_grad_(True)
        ref = dense_vera(x_ref, layer, A.double(), B.double())
        assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12), name
        grad = torch.randn_like(y)
        params = [x] + list(layer.adapter_parameters().values())
        got = torch.autograd.grad(y, params, grad)
        want = torch.autograd.grad(ref, [x_ref] + params[1:], grad)
        for n, a, b in zip(["x", *layer.adapter_parameters()], got, want):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (name, n)


@pytest.mark.parametrize("mode", ["exact", "lora-branch"])
@pytest.mark.parametrize("magnitude", [True, False])
def test_dropout_modes_follow_their_formulas(mode, magnitude):
    model = perturb(model_with(dropout=0.3, dropout_mode=mode, magnitude=magnitude)).train()
    A, B = reference_projections(RANK, 24, 24, SEED)
    layer = dora_modules(model)["layers.0.up"]
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.7)
    assert 0 < mask.sum() < mask.numel()
    ref = dense_vera(x, layer, A.double(), B.double(), mask, 0.7, mode)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), list(layer.adapter_parameters().values()))
    want = torch.autograd.grad(ref.square().sum(), list(layer.adapter_parameters().values()))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(grads, want))


@pytest.mark.parametrize("magnitude", [True, False])
def test_merge_and_unmerge_are_exact(magnitude):
    model = perturb(model_with(magnitude=magnitude)).eval()
    weights = {n: m.weight.detach().clone() for n, m in dora_modules(model).items()}
    x = torch.randn(6, 12, dtype=torch.float64)
    before = model(x)
    merge_dora(model)
    assert all(m.merged for m in dora_modules(model).values())
    assert torch.allclose(model(x), before, rtol=1e-12, atol=1e-12)
    unmerge_dora(model)
    for n, m in dora_modules(model).items():
        assert torch.allclose(m.weight, weights[n], rtol=1e-13, atol=1e-14), n
    assert torch.allclose(model(x), before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load_round_trip(tmp_path, save_projection):
    model = perturb(model_with(torch.float32, save_projection=save_projection)).eval()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    key = f"vera_projections.r{RANK}.seed{SEED}"
    assert config["projections"][key]["saved"] is save_projection
    assert (f"{key}.A" in load_file(tmp_path / WEIGHTS_NAME)) is save_projection
    torch.manual_seed(5)  # another init of the base's own layers is overwritten below; the adapter comes from the file
    fresh = TinyNet()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not any(p in k for p in ("vera_lambda", "magnitude"))}, strict=False)
    load_adapter(fresh, tmp_path)
    x = torch.randn(4, 12)
    assert torch.equal(fresh.eval()(x), model(x))
    assert all(isinstance(m, VeRALinear) and m.has_magnitude for m in dora_modules(fresh).values())


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("trained_in, loaded_in", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_load_into_a_model_cast_after_apply(tmp_path, save_projection, trained_in, loaded_in):
    """apply_dora, cast (the projections, buffers, are cast with the model), train, save; the same steps on a fresh
    model then load: accepted, and the same outputs as the trained model cast alike."""
    torch.manual_seed(0)
    model = TinyNet()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_dora(model, [vera_rule(save_projection=save_projection)], verbose=False)
    model = perturb(model.to(trained_in)).eval()
    save_adapter(model, tmp_path)
    fresh = TinyNet()
    fresh.load_state_dict(base)
    apply_dora(fresh, [vera_rule(save_projection=save_projection)], verbose=False)
    load_adapter(fresh.to(loaded_in), tmp_path)
    x = torch.randn(4, 12)
    assert torch.equal(fresh.eval()(x.to(loaded_in)), model.to(loaded_in)(x.to(loaded_in)))


def _rewrite_weights(path, edit):
    file = path / WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata=metadata)


def test_load_refuses_projections_that_do_not_match_the_seed(tmp_path):
    model = perturb(model_with(torch.float32))
    key = f"vera_projections.r{RANK}.seed{SEED}"
    save_adapter(model, tmp_path / "edited")
    _rewrite_weights(tmp_path / "edited", lambda t: t[f"{key}.A"].mul_(1.001))
    with pytest.raises(AdapterError, match=rf"{key}\.A in the checkpoint does not match .*projection_seed {SEED}"):
        load_adapter(TinyNet(), tmp_path / "edited")
    # regenerated (not saved): the recorded digest must be what the seed draws here
    save_adapter(perturb(model_with(torch.float32, save_projection=False)), tmp_path / "digest")
    config = json.loads((tmp_path / "digest" / CONFIG_NAME).read_text())
    config["projections"][key]["sha256_B"] = "0" * 64
    (tmp_path / "digest" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"regenerated from projection_seed 11 differ"):
        load_adapter(TinyNet(), tmp_path / "digest")
    # the adapted model's own projections changed after apply_dora: not the ones the adapter was trained with
    save_adapter(model, tmp_path / "good")
    changed = model_with(torch.float32)
    with torch.no_grad():
        next(iter(vera_projection_groups(changed).values())).B.mul_(1.001)
    with pytest.raises(AdapterError, match=rf"the model's projections {key}\.B are not what projection_seed"):
        load_adapter(changed, tmp_path / "good")


def test_compiles_without_graph_breaks():
    import torch._dynamo as dynamo
    dynamo.reset()
    layer = perturb(model_with(torch.float32, detach_norm=False)).layers[0].up.train()
    explained = dynamo.explain(lambda x: layer(x).sum())(torch.randn(8, 16, requires_grad=True))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def _peft_logits(model_dir_base, adapter_dir, x):
    from peft import PeftModel
    return PeftModel.from_pretrained(model_dir_base, str(adapter_dir)).eval()(x)


def test_plain_vera_exports_to_and_imports_from_peft(tmp_path):
    pytest.importorskip("peft")
    from peft import VeraConfig, get_peft_model
    x = torch.randn(4, 12)
    ours = perturb(model_with(torch.float32, magnitude=False, dropout=0.1)).eval()
    export_peft(ours, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["projection_prng_key"]) == ("VERA", RANK, SEED)
    torch.manual_seed(0)
    peft_logits = _peft_logits(TinyNet(), tmp_path / "export", x)
    assert torch.allclose(peft_logits, ours(x), rtol=1e-5, atol=1e-6)
    # PEFT's own VeRA adapter, its projections not saved: regenerated from projection_prng_key here
    torch.manual_seed(0)
    theirs = get_peft_model(TinyNet(), VeraConfig(r=RANK, target_modules=TARGET, projection_prng_key=SEED,
                                                  save_projection=False, d_initial=0.2))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "vera_lambda" in n:
                p.normal_()
    theirs.save_pretrained(str(tmp_path / "peft"))
    torch.manual_seed(0)
    imported = import_peft(TinyNet(), tmp_path / "peft").eval()
    assert all(not m.has_magnitude and m.d_initial == 0.2 for m in dora_modules(imported).values())
    assert torch.allclose(imported(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)


def test_dvora_has_no_peft_format(tmp_path):
    with pytest.raises(AdapterError, match="DVoRA .* which PEFT has no format for"):
        export_peft(model_with(torch.float32), tmp_path)


@pytest.mark.parametrize("rule,message", [
    ({"variant": "vera", "magnitude_only": True}, "magnitude_only rules take no variant"),
    ({"variant": "vera", "d_initial": 0.0}, "d_initial must be a finite non-zero"),
    ({"variant": "vera", "projection_seed": 1.5}, "projection_seed must be an integer"),
    ({"variant": "vera", "rslora": True}, "VeRA has no scale"),
    ({"variant": "vra"}, "variant must be one of"),
    ({"magnitude": False}, "magnitude: false .* is for variant vera"),
    ({"d_initial": 0.2}, r"\['d_initial'\] apply to variant vera only"),
])
def test_rule_errors_name_what_is_wrong(rule, message):
    with pytest.raises(TargetingError, match=message):
        apply_dora(TinyNet(), [{"match": TARGET, "rank": 4, **rule}], verbose=False)


def test_analysis_reads_dvora_and_vera_adapters(tmp_path):
    from dora.analysis import analyse, model_decomposition_deltas
    torch.manual_seed(0)
    base = TinyNet()
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_dir / "model.safetensors"))
    for magnitude, save_projection in ((True, True), (False, False)):
        model = perturb(model_with(torch.float32, magnitude=magnitude, save_projection=save_projection))
        run = tmp_path / f"m{magnitude}"
        save_adapter(model, run)
        expected = model_decomposition_deltas(model)
        rows = analyse(base_dir, [run], modules=TARGET)
        assert {r.module for r in rows} == set(expected)
        for r in rows:
            want = expected[r.module]
            assert r.delta_m == pytest.approx(want.magnitude, rel=1e-4, abs=1e-9), r.module
            assert r.delta_d == pytest.approx(want.direction, rel=1e-3, abs=1e-9), r.module
        if not magnitude:  # no magnitude: W's own row norm moves with the update
            assert any(r.delta_m > 1e-3 for r in rows)


def test_nn_module_contract():
    layer = VeRALinear(10, 7, rank=4, projection_seed=3)
    assert isinstance(layer, nn.Module) and layer(torch.randn(2, 10)).shape == (2, 7)
    with pytest.raises(ValueError, match="smaller than the layer"):
        VeRALinear(20, 7, rank=4, projections=layer.vera_projections)


def test_peft_export_problem_names_dvora_and_mixtures():
    from dora.adapter import peft_export_problem
    assert "PEFT has no DVoRA" in peft_export_problem(model_with(torch.float32))
    assert peft_export_problem(model_with(torch.float32, magnitude=False)) is None
    mixed = TinyNet()
    apply_dora(mixed, [{"match": r"head", "rank": 4, "variant": "vera", "magnitude": False},
                       {"match": r"layers\.0\.up", "rank": 2}], verbose=False)
    assert "one adapter type" in peft_export_problem(mixed)
