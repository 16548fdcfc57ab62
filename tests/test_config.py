"""Recipe configs: YAML files and key=value overrides."""
import pytest

from recipes.config import ConfigError, apply_overrides, load_config


def test_exponent_numbers_are_floats_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  eps: 1.0E-6\n  name: 1e-3x\n  quoted: '2e-4'\n")
    config = load_config(path, ["train.lr=2e-4", "train.steps=10", "train.warmup=-3e-2"])
    assert config["train"] == {"lr": 2e-4, "eps": 1e-6, "name": "1e-3x", "quoted": "2e-4", "steps": 10,
                               "warmup": -0.03}
    assert isinstance(config["train"]["steps"], int)


def test_override_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="'train' in config is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])
