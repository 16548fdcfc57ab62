"""PEFT interop on models whose module names share suffixes: what export_peft writes selects exactly our
modules, PEFT reads it the same, and import_peft reads PEFT's settings (rsLoRA, dropout, base_layer keys)."""
import json
import re

import pytest
import torch
import torch.nn as nn

from dora import apply_dora, dora_modules, export_peft, import_peft, train_fully_parameters
from dora_helpers import TinyNet, perturb_adapter


class Nested(nn.Module):
    """Module names that are suffixes of one another: "0", "1.0", "1.1.0"; "norm", "1.norm", "1.1.norm"."""

    def __init__(self, d: int = 8, depth: int = 2):
        super().__init__()
        self.add_module("0", nn.Linear(d, d))
        self.norm = nn.LayerNorm(d)
        if depth:
            self.add_module("1", Nested(d, depth - 1))

    def forward(self, x):
        h = torch.tanh(self.norm(getattr(self, "0")(x)))
        return getattr(self, "1")(h) if hasattr(self, "1") else h


class SuffixNet(Nested):
    """Adapted "0", "1.0", "1.1.0" (each a dot-suffix of the next); "tail.0" not adapted; "norm" (a suffix of
    "1.norm" and "1.1.norm") and "head" trained fully."""

    def __init__(self, d: int = 8):
        super().__init__(d)
        self.tail = nn.Sequential(nn.Linear(d, d))
        self.head = nn.Sequential(nn.Linear(d, d))

    def forward(self, x):
        return self.head(self.tail(super().forward(x)))


RULES = [
    {"match": r"0", "rank": 4, "alpha": 16},         # scale 4
    {"match": r"1\.0", "rank": 4, "alpha": 8},       # scale 2
    {"match": r"1\.1\.0", "rank": 2, "alpha": 4},    # another rank, scale 2
]


def adapted(train_fully=(r"head\..*",), seed=0):
    torch.manual_seed(seed)
    model = SuffixNet()
    apply_dora(model, RULES, train_fully, verbose=False)
    perturb_adapter(model)
    with torch.no_grad():
        for p in train_fully_parameters(model).values():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def base(seed=0):
    torch.manual_seed(seed)
    return SuffixNet().eval()


def peft_lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def test_export_selects_exactly_our_modules_and_scales_in_peft(tmp_path):
    from peft import PeftModel
    ours = adapted()
    export_peft(ours, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    layers = peft_lora_layers(peft_model)
    assert sorted(layers) == sorted(dora_modules(ours))  # not "tail.0", although it ends with ".0"
    for name, layer in layers.items():
        assert layer.scaling["default"] == pytest.approx(dora_modules(ours)[name].scaling), name
        assert layer.r["default"] == dora_modules(ours)[name].rank, name
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), ours(x), rtol=1e-5, atol=1e-5)


def test_export_then_import_round_trip(tmp_path):
    ours = adapted()
    export_peft(ours, tmp_path / "peft")
    back = import_peft(base(), tmp_path / "peft")
    assert sorted(dora_modules(back)) == sorted(dora_modules(ours))
    for name, layer in dora_modules(back).items():
        assert layer.scaling == pytest.approx(dora_modules(ours)[name].scaling), name
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=1e-6, atol=1e-6)


def test_modules_to_save_only_where_peft_selects_the_module_alone(tmp_path):
    from peft import PeftModel
    ours = adapted(train_fully=(r"norm\..*", r"head\..*"))
    export_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]  # PEFT would wrap "1.norm" and "1.1.norm" for "norm"
    peft_model = PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), ours(x), rtol=1e-5, atol=1e-5)
    back = import_peft(base(), tmp_path / "peft")
    assert torch.equal(back.norm.weight, ours.norm.weight) and back.norm.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=1e-6, atol=1e-6)


def test_import_peft_reads_rslora(tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    peft_model = get_peft_model(TinyNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up"],
                                                      use_dora=True, use_rslora=True))
    with torch.no_grad():  # as after training: B and m moved
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    ours = import_peft(TinyNet(), tmp_path / "peft")
    assert dora_modules(ours)["layers.0.up"].scaling == pytest.approx(8 / 2)
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), peft_model.eval()(x), rtol=1e-5, atol=1e-5)


def test_dropout_is_exported_and_imported(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    apply_dora(model, [{"match": r".*_proj", "rank": 2, "dropout": 0.05}], verbose=False)
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    torch.manual_seed(0)
    back = import_peft(TinyNet(), tmp_path / "peft")
    assert {m.dropout for m in dora_modules(back).values()} == {0.05}


def test_differing_dropouts_export_the_most_common_with_a_warning(tmp_path):
    model = TinyNet()
    apply_dora(model, [{"match": r".*q_proj", "rank": 2, "dropout": 0.1},
                       {"match": r".*(v_proj|up)", "rank": 2, "dropout": 0.05}], verbose=False)
    with pytest.warns(UserWarning, match="one lora_dropout"):
        export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_dropout"] == 0.05


def test_import_maps_base_layer_keys_to_the_adapted_layers_own_parameters(tmp_path):
    # A trained bias of an adapted module is written as {module}.base_layer.bias (PEFT's name for it)
    torch.manual_seed(0)
    model = TinyNet()
    apply_dora(model, [{"match": r".*_proj", "rank": 2}], [r".*q_proj\.bias"], verbose=False)
    perturb_adapter(model)
    with torch.no_grad():
        model.layers[0].q_proj.bias.add_(1.0)
    export_peft(model, tmp_path / "peft")
    torch.manual_seed(0)
    back = import_peft(TinyNet(), tmp_path / "peft")
    assert torch.equal(back.layers[0].q_proj.bias, model.layers[0].q_proj.bias)
    assert back.layers[0].q_proj.bias.requires_grad
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-6, atol=1e-6)


def test_import_refuses_tensors_the_model_does_not_have(tmp_path):
    from safetensors.torch import load_file, save_file
    from dora import AdapterError
    ours = adapted()
    export_peft(ours, tmp_path / "peft")
    file = str(tmp_path / "peft" / "adapter_model.safetensors")
    tensors = load_file(file)
    tensors["base_model.model.nowhere.weight"] = torch.zeros(2)
    save_file(tensors, file)
    with pytest.raises(AdapterError, match=r"nowhere\.weight"):
        import_peft(base(), tmp_path / "peft")


def test_imported_layers_take_the_mode_of_the_model(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    apply_dora(model, [{"match": r".*_proj", "rank": 2, "dropout": 0.5}], verbose=False)
    perturb_adapter(model)
    export_peft(model, tmp_path / "peft")
    torch.manual_seed(0)
    back = import_peft(TinyNet().eval(), tmp_path / "peft")
    assert not any(m.training for m in dora_modules(back).values())
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(back(x), back(x), rtol=0, atol=0)


@pytest.mark.parametrize("part", ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"])
def test_import_refuses_a_module_lacking_one_of_its_tensors_and_leaves_the_model_alone(tmp_path, part):
    from safetensors.torch import load_file, save_file
    from dora import AdapterError
    export_peft(adapted(), tmp_path / "peft")
    file = str(tmp_path / "peft" / "adapter_model.safetensors")
    tensors = load_file(file)
    del tensors[f"base_model.model.1.0.{part}"]
    save_file(tensors, file)
    model = base()
    with pytest.raises(AdapterError, match=r"modules \['1.0'\] lack one of lora_A, lora_B, lora_magnitude_vector"):
        import_peft(model, tmp_path / "peft")
    assert not dora_modules(model)  # refused before adapting anything


class RegexNames(nn.Module):
    """Module names that are regular expressions of other names: "layers.1.q" (adapted) matches "layers_1_q" (not
    adapted) as a pattern; "q[0]" and "k+v" (adapted) match neither themselves nor each other."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.layers = nn.ModuleDict({"1": nn.ModuleDict({"q": nn.Linear(d, d)})})
        self.layers_1_q = nn.Linear(d, d)
        self.add_module("q[0]", nn.Linear(d, d))
        self.add_module("k+v", nn.Linear(d, d))

    def forward(self, x):
        h = torch.tanh(self.layers["1"]["q"](x))
        h = torch.tanh(getattr(self, "q[0]")(h)) + getattr(self, "k+v")(h)
        return self.layers_1_q(h)


def test_export_names_modules_whose_names_are_regex_metacharacters_exactly(tmp_path):
    from peft import PeftModel
    torch.manual_seed(0)
    ours = RegexNames()
    apply_dora(ours, [{"match": r"layers\.1\.q|q\[0\]|k\+v", "rank": 2, "alpha": 4}], verbose=False)
    perturb_adapter(ours)
    export_peft(ours, tmp_path / "peft")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    names = [n for n, _ in RegexNames().named_modules() if n]
    assert [n for n in names if re.fullmatch(pattern, n)] == ["layers.1.q", "q[0]", "k+v"]
    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(RegexNames(), tmp_path / "peft").eval()
    assert sorted(peft_lora_layers(peft_model)) == sorted(dora_modules(ours))
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), ours.eval()(x), rtol=1e-5, atol=1e-5)
