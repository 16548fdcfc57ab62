"""Targeting rules, merge/unmerge, adapters in our format and in PEFT's."""
import copy
import json
import re

import pytest
import torch
import torch.nn as nn

from dora import (
    AdapterError,
    DoRALinear,
    TargetingError,
    apply_dora,
    dora_modules,
    export_peft,
    import_peft,
    load_adapter,
    merge_dora,
    save_adapter,
    unload_dora,
    unmerge_dora,
)
from dora_helpers import TinyNet, perturb_adapter

RULES = [
    {"match": r"layers\.\d+\.(q|v)_proj", "rank": 4, "alpha": 8},
    {"match": r"layers\.\d+\.up", "rank": 2, "alpha": 8, "rslora": True},
    {"match": r"layers\.\d+\.down", "magnitude_only": True},
]
TRAIN_FULLY = [r"projector\..*", r"layers\.\d+\.norm\..*", r"layers\.\d+\.q_proj\.bias"]


def adapted(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    apply_dora(model, RULES, TRAIN_FULLY, verbose=False)
    perturb_adapter(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("projector") or ".norm." in n or n.endswith("q_proj.bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------------ rules
def test_rules_select_modules_and_freeze_everything_else(capsys):
    model = TinyNet()
    total = sum(p.numel() for p in model.parameters())
    report = apply_dora(model, RULES, TRAIN_FULLY)
    printed = capsys.readouterr().out
    assert "total" in printed and r"layers\.\d+\.(q|v)_proj" in printed
    modules = dora_modules(model)
    assert sorted(modules) == sorted(f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "up", "down"))
    assert modules["layers.0.q_proj"].rank == 4 and modules["layers.0.up"].scaling == pytest.approx(8 / 2 ** 0.5)
    assert modules["layers.1.down"].magnitude_only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for i in range(2):
        for n in ("q_proj", "v_proj", "up"):
            expected |= {f"layers.{i}.{n}.lora_A", f"layers.{i}.{n}.lora_B", f"layers.{i}.{n}.magnitude"}
        expected |= {f"layers.{i}.down.magnitude", f"layers.{i}.norm.weight", f"layers.{i}.norm.bias",
                     f"layers.{i}.q_proj.bias"}
    expected |= {n for n, _ in model.named_parameters() if n.startswith("projector.")}
    assert trainable == expected
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total == total + sum(p.numel() for m in modules.values()
                                       for p in (m.lora_A, m.lora_B, m.magnitude) if p is not None)
    assert [len(r.matched) for r in report.rows[:3]] == [4, 2, 2]
    q = modules["layers.0.q_proj"]
    assert report.rows[0].trainable == 4 * (q.lora_A.numel() + q.lora_B.numel() + q.magnitude.numel())


def test_first_matching_rule_wins():
    model = TinyNet()
    apply_dora(model, [{"match": r"layers\.0\.q_proj", "rank": 2}, {"match": r".*_proj", "rank": 6}],
               verbose=False)
    modules = dora_modules(model)
    assert modules["layers.0.q_proj"].rank == 2 and modules["layers.1.q_proj"].rank == 6


@pytest.mark.parametrize("rules,train_fully,message", [
    ([{"match": r"nothing\.here", "rank": 2}], [], r"rule 0 \(match='nothing\\\\.here'\) matched no module"),
    ([{"match": r"layers\.0\.norm", "rank": 2}], [], r"matches 'layers.0.norm', a LayerNorm"),
    ([{"match": r"layers", "rank": 2}], [], r"matches 'layers', a ModuleList"),
    ([{"match": r"head", "rnak": 2}], [], r"unknown keys 'rnak' \(did you mean 'rank'\?\)"),
    ([{"match": r"head", "rank": 0}], [], r"rank must be >= 1"),
    ([{"match": r"head", "rank": 8.5}], [], r"rule 'head': rank must be an integer, got 8.5 \(float\)"),
    ([{"match": r"head", "rank": "8"}], [], r"rule 'head': rank must be an integer, got '8' \(str\)"),
    ([{"match": r"head", "rank": True}], [], r"rule 'head': rank must be an integer, got True \(bool\)"),
    ([{"match": r"head", "alpha": 0}], [], r"rule 'head': alpha must be a finite number > 0, got 0: .*never get a"),
    ([{"match": r"head", "alpha": float("nan")}], [], r"rule 'head': alpha must be a finite number > 0, got nan"),
    ([{"match": r"head(", "rank": 2}], [], r"invalid regular expression"),
    ([{"match": r"head", "rank": 2}], [r"no\.such\.param"], r"train_fully pattern 'no\\\\.such\\\\.param' matched no"),
    ([{"match": r"head", "rank": 2}], [r"head\.weight"], r"frozen base weight"),
    ([{"match": r"head", "rank": 2, "dropout": 1.5}], [], r"dropout must be in \[0, 1\)"),
    ([{"match": r"head", "rank": 2}], [r".*\.magnitude"], r"matches DoRA adapter parameter\(s\) \['head.magnitude'\]"),
])
def test_rule_errors_name_the_rule(rules, train_fully, message):
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetingError, match=message):
        apply_dora(model, rules, train_fully, verbose=False)
    assert not dora_modules(model)  # an error leaves the model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_apply_twice_is_an_error():
    model = TinyNet()
    apply_dora(model, RULES, verbose=False)
    with pytest.raises(TargetingError, match="called twice"):
        apply_dora(model, RULES, verbose=False)


# ------------------------------------------------------------------------------------------------ merge
def test_merge_unmerge_round_trip_and_unload():
    model = adapted()
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        y = model(x)
        weights = {n: m.weight.clone() for n, m in dora_modules(model).items()}
        merge_dora(model)
        assert all(m.merged for m in dora_modules(model).values())
        y_merged = model(x)
        unmerge_dora(model)
        y_unmerged = model(x)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y_merged, y) <= 1e-5
    assert rel(y_unmerged, y) <= 1e-5
    for n, m in dora_modules(model).items():
        torch.testing.assert_close(m.weight, weights[n], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        plain = unload_dora(copy.deepcopy(model))
        assert not dora_modules(plain)
        assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(("_proj", "up", "down")))
        assert rel(plain(x), y) <= 1e-5


# ------------------------------------------------------------------------------------------------ adapters
def test_save_load_reproduces_outputs_exactly(tmp_path):
    model = adapted()
    x = torch.randn(4, 12)
    save_adapter(model, tmp_path / "adapter", metadata={"base": "TinyNet"})
    config = json.loads((tmp_path / "adapter" / "dora_config.json").read_text())
    assert config["spec"]["rules"][1]["rslora"] is True
    assert "layers.0.q_proj.bias" in config["train_fully_parameters"]
    torch.manual_seed(0)
    fresh = TinyNet()  # same base weights (seed 0), no adapter yet
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    for n, m in dora_modules(fresh).items():
        assert torch.equal(m.magnitude, dora_modules(model)[n].magnitude)  # magnitudes are never lost


def test_load_into_already_adapted_model_and_mismatch_errors(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    target = TinyNet()
    apply_dora(target, RULES, TRAIN_FULLY, verbose=False)
    load_adapter(target, tmp_path / "a")
    x = torch.randn(2, 12)
    with torch.no_grad():
        assert torch.equal(target(x), model(x))
    other = TinyNet()
    apply_dora(other, [{"match": r"layers\.\d+\.(q|v)_proj", "rank": 3}], verbose=False)
    with pytest.raises(AdapterError, match="DoRA modules differ"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(TinyNet(), tmp_path / "missing")


def test_load_rejects_truncated_tensor_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    model = adapted()
    save_adapter(model, tmp_path / "a")
    file = str(tmp_path / "a" / "dora_adapter.safetensors")
    tensors = load_file(file)
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()  # the save id that pairs it with dora_config.json
    del tensors["layers.1.up.magnitude"]
    save_file(tensors, file, metadata=metadata)
    with pytest.raises(AdapterError, match=r"missing tensors \['layers.1.up.magnitude'\]"):
        load_adapter(TinyNet(), tmp_path / "a")


def test_export_to_peft_gives_the_same_outputs(tmp_path):
    from peft import PeftModel
    model = adapted()
    export_peft(model, tmp_path / "peft")
    torch.manual_seed(0)
    base = TinyNet()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and "projector" in config["modules_to_save"]


def test_import_peft_trained_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    peft_model = get_peft_model(TinyNet(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up"], use_dora=True, modules_to_save=["projector"],
        rank_pattern={"up": 2}, alpha_pattern={"up": 6}))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # train a little so that A, B, m and the projector all move
        peft_model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    ours = import_peft(TinyNet(), tmp_path / "peft")
    assert dora_modules(ours)["layers.0.up"].rank == 2
    assert dora_modules(ours)["layers.0.up"].scaling == pytest.approx(3.0)
    x = torch.randn(5, 12)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)
    # and back: our export of the imported adapter loads in PEFT with the same outputs
    export_peft(ours, tmp_path / "again")
    from peft import PeftModel
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(TinyNet(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_import_peft_rejects_plain_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterError, match="not a DoRA adapter"):
        import_peft(TinyNet(), tmp_path / "lora")


def test_adapter_writes_are_atomic(tmp_path, monkeypatch):
    import dora.adapter as adapter_module
    model = adapted()
    save_adapter(model, tmp_path / "a")
    good = (tmp_path / "a" / "dora_adapter.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(adapter_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapted(seed=1), tmp_path / "a")
    assert (tmp_path / "a" / "dora_adapter.safetensors").read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dora_adapter.safetensors", "dora_config.json"]


def test_dora_linear_is_a_drop_in_for_nn_linear():
    layer = DoRALinear(6, 4, rank=2, alpha=4)
    assert layer.weight.shape == (4, 6) and layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (4, 2)
    assert "rank=2" in repr(layer)


def test_multihead_attention_out_proj_is_refused():
    # nn.MultiheadAttention reads out_proj.weight itself: an adapter there would silently do nothing
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    with pytest.raises(TargetingError, match="nn.MultiheadAttention"):
        apply_dora(model, [{"match": r"attn\.out_proj", "rank": 2}], verbose=False)


def test_a_linear_subclass_with_its_own_forward_is_refused():
    # Llama 4's MoE router subclasses nn.Linear and returns (scores, logits): a DoRA layer would break it
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.sigmoid(), logits

    class Plain(nn.Linear):  # a subclass that keeps nn.Linear's forward is fine
        pass

    model = nn.Sequential()
    model.add_module("router", Router(8, 4))
    model.add_module("plain", Plain(8, 8))
    with pytest.raises(TargetingError, match="'router', a Router: an nn.Linear subclass with its own forward"):
        apply_dora(model, [{"match": "router|plain", "rank": 2}], verbose=False)
    assert apply_dora(model, [{"match": "plain", "rank": 2}], verbose=False).rows[0].matched == ["plain"]


def test_export_peft_takes_tensors_from_a_state_dict(tmp_path):
    from safetensors.torch import load_file

    from dora import adapter_state_dict
    model = adapted()
    state = {k: v.detach().clone() + 1.0 for k, v in adapter_state_dict(model).items()}  # e.g. fp32 masters
    export_peft(model, tmp_path / "peft", state_dict=state)
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(tensors["base_model.model.layers.0.q_proj.lora_magnitude_vector"],
                       state["layers.0.q_proj.magnitude"])
    assert torch.equal(tensors["base_model.model.projector.0.weight"], state["projector.0.weight"])


def test_rule_options_reach_the_layers():
    model = TinyNet().double()
    apply_dora(model, [{"match": r"layers\.0\.q_proj", "rank": 3, "alpha": 6, "detach_norm": False,
                        "dropout": 0.1, "dropout_mode": "lora-branch", "inplace_safe": True}], verbose=False)
    layer = dora_modules(model)["layers.0.q_proj"]
    assert (layer.detach_norm, layer.dropout, layer.dropout_mode, layer.inplace_safe) == (
        False, 0.1, "lora-branch", True)
    # and the layer computes what it says: the gradient through the norm (not the detached one)
    from dora_helpers import dense_dora
    layer.eval()  # no dropout
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(4, 16, dtype=torch.float64)
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling)
    (got,) = torch.autograd.grad(layer(x).pow(2).sum(), [layer.lora_A])
    (want,) = torch.autograd.grad(dense_dora(x, *args, detach_norm=False).pow(2).sum(), [layer.lora_A])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("how", ["apply_dora", "load_adapter"])
def test_new_layers_take_the_mode_of_the_model(tmp_path, how):
    rules = [{"match": r"layers\.\d+\.(q|v)_proj", "rank": 4, "dropout": 0.5}]
    model = TinyNet().eval()
    if how == "apply_dora":
        apply_dora(model, rules, verbose=False)
    else:
        source = TinyNet()
        apply_dora(source, rules, verbose=False)
        save_adapter(source, tmp_path / "a")
        load_adapter(model, tmp_path / "a")
    assert not any(m.training for m in dora_modules(model).values())
    perturb_adapter(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout in eval mode
    model.train()
    assert all(m.training for m in dora_modules(model).values())


def test_unloaded_layers_are_plain_trainable_linears_in_the_models_mode():
    model = adapted().eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        y = model(x)
    unload_dora(model)
    linears = [model.layers[i].q_proj for i in range(2)] + [model.layers[i].down for i in range(2)]
    assert all(type(m) is nn.Linear and not m.training for m in linears)
    assert all(p.requires_grad for m in linears for p in m.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ PEFT models
@pytest.mark.parametrize("match,module,owner", [
    (r".*\.layers\.0\.q_proj", "base_model.model.layers.0.q_proj", None),  # PEFT's layer itself
    (r".*q_proj\.base_layer", "base_model.model.layers.0.q_proj.base_layer", "base_model.model.layers.0.q_proj"),
    (r".*q_proj\.lora_A\.default", "base_model.model.layers.0.q_proj.lora_A.default",
     "base_model.model.layers.0.q_proj"),
    (r".*_proj(\.base_layer)?", "base_model.model.layers.0.q_proj", None),
])
def test_apply_dora_refuses_the_layers_of_a_peft_adapter(match, module, owner):
    # DoRA on a get_peft_model() model used to stack a second adapter on PEFT's (a rule for base_layer or lora_A
    # was taken as any nn.Linear), or to call PEFT's own layer "a Linear" that rules cannot select.
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["q_proj"]))
    where = "a PEFT adapter layer \\(Linear\\)" if owner is None else rf"part of PEFT's adapter layer {owner!r}"
    with pytest.raises(TargetingError, match=rf"rule 0 \(match={re.escape(repr(match))}\) matches {module!r}, "
                                             rf"{where}: .*stack"):
        apply_dora(peft_model, [{"match": match, "rank": 2}], verbose=False)
    assert not dora_modules(peft_model)
    # the same model unwrapped (merge_and_unload) is an ordinary model again
    apply_dora(peft_model.merge_and_unload(), [{"match": r".*_proj", "rank": 2}], verbose=False)


def test_unload_removes_the_spec_so_nothing_saves_a_stale_adapter(tmp_path):
    # The spec left on an unloaded model would let save_adapter write its train_fully parameters under rules
    # whose modules are gone: an adapter that loads into fresh, untrained DoRA layers.
    model = adapted()
    unload_dora(model)
    assert not hasattr(model, "dora_spec")
    with pytest.raises(TargetingError, match="has no DoRA spec"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    apply_dora(model, RULES, TRAIN_FULLY, verbose=False)  # it can be adapted afresh
    assert len(dora_modules(model)) == 8
