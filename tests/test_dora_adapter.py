"""Our adapter format: what load_adapter refuses, and the two files written as a pair."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dora import AdapterError, apply_dora, dora_modules, load_adapter, save_adapter
from dora_helpers import TinyNet, perturb_adapter

RULES = [{"match": r"layers\.\d+\.(q|v)_proj", "rank": 4, "alpha": 8}, {"match": r"layers\.\d+\.down",
                                                                         "magnitude_only": True}]


def adapted(seed=0, rules=RULES):
    torch.manual_seed(seed)
    model = TinyNet()
    apply_dora(model, rules, [r"projector\..*"], verbose=False)
    perturb_adapter(model)
    return model


def test_load_refuses_another_scaling(tmp_path):
    save_adapter(adapted(), tmp_path / "a")  # alpha 8, rank 4: scaling 2
    other = TinyNet()
    apply_dora(other, [dict(RULES[0], alpha=32), RULES[1]], [r"projector\..*"], verbose=False)
    with pytest.raises(AdapterError, match="scaling 8.0 in the model but 2.0 in the adapter"):
        load_adapter(other, tmp_path / "a")


def test_load_refuses_a_tensor_of_another_shape_even_if_it_broadcasts(tmp_path):
    save_adapter(adapted(), tmp_path / "a")
    file = str(tmp_path / "a" / "dora_adapter.safetensors")
    tensors = load_file(file)
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors["layers.0.q_proj.magnitude"] = torch.ones(1)  # would broadcast into the (16,) magnitude
    save_file(tensors, file, metadata=metadata)
    with pytest.raises(AdapterError, match=r"'layers.0.q_proj.magnitude' has shape \(1,\)"):
        load_adapter(TinyNet(), tmp_path / "a")


def test_a_crash_between_the_two_renames_is_refused_on_load(tmp_path, monkeypatch):
    import dora.adapter as adapter_module
    save_adapter(adapted(seed=0), tmp_path / "a")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(src, dst)
    monkeypatch.setattr(adapter_module.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        save_adapter(adapted(seed=1), tmp_path / "a")  # the new tensors are in place, the old config too
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dora_adapter.safetensors", "dora_config.json"]
    with pytest.raises(AdapterError, match="come from different saves"):
        load_adapter(TinyNet(), tmp_path / "a")


def test_adapters_of_format_version_1_still_load(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / "dora_config.json"
    config = json.loads(config_file.read_text())
    assert config["format_version"] == 2 and config["save_id"]
    del config["save_id"]  # what version 1 wrote: no save id in either file
    config["format_version"] = 1
    config_file.write_text(json.dumps(config))
    file = str(tmp_path / "a" / "dora_adapter.safetensors")
    save_file(load_file(file), file, metadata={"format": "pt"})
    torch.manual_seed(0)
    fresh = load_adapter(TinyNet(), tmp_path / "a")
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert sorted(dora_modules(fresh)) == sorted(dora_modules(model))


def test_a_merged_model_neither_exports_nor_loads(tmp_path):
    # A merged layer's weight already holds g (W0 + sBA): an exported or loaded adapter would be applied twice.
    from dora import export_peft, merge_dora
    model = adapted()
    save_adapter(model, tmp_path / "a")
    merge_dora(model)
    x = torch.randn(3, 12)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(AdapterError, match=r"module 'layers.0.q_proj' is merged; unmerge before exporting"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(AdapterError, match=r"module 'layers.0.q_proj' is merged; unmerge the model before loading"):
        load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_an_adapter_of_a_newer_format_version_is_refused(tmp_path):
    from dora import read_adapter_config
    save_adapter(adapted(), tmp_path / "a")
    config_file = tmp_path / "a" / "dora_config.json"
    config = json.loads(config_file.read_text())
    config["format_version"] = 3
    config_file.write_text(json.dumps(config))
    for read in (read_adapter_config, lambda path: load_adapter(TinyNet(), path)):
        with pytest.raises(AdapterError, match=r"format_version 3 is newer than this library's 2"):
            read(tmp_path / "a")
