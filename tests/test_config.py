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


def test_a_misspelled_section_or_key_names_the_closest_valid_one(tmp_path):
    from recipes.config import section
    from recipes.trainer import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\ntrain: {output_dir: o}\n")
    sections = ("model", "dora", "data", "train")
    with pytest.raises(ConfigError, match=r"c.yaml \(with its overrides\): unknown section 'trian' \(did you mean "
                                          r"'train'\?\); known: data, dora, model, train"):
        load_config(path, ["trian.lr=1e-4"], sections=sections)
    assert load_config(path, ["train.lr=1e-4"], sections=sections)["train"]["lr"] == 1e-4
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' \(did you mean 'lr'\?\)"):
        TrainConfig.from_dict({"output_dir": "o", "lrr": 1e-4})
    with pytest.raises(ConfigError, match=r"config section 'data': unknown keys 'image_fodler' \(did you mean "
                                          r"'image_folder'\?\), 'zzz'; known"):
        section({"data": {"image_fodler": "x", "zzz": 1}}, "data", ["data_path", "image_folder"])


@pytest.mark.parametrize("recipe", ["llava", "vlm", "vlbart"])
def test_every_recipe_refuses_a_misspelled_section_before_building_anything(recipe, tmp_path):
    import importlib

    main = importlib.import_module(f"recipes.{recipe}.train").main
    path = tmp_path / "c.yaml"
    path.write_text("train: {output_dir: o}\n")
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        main([str(path), "trian.lr=1e-4"])


def test_vlbart_task_keys_predict_and_score_options_are_checked():
    from recipes.vlbart.tasks import TaskConfig

    with pytest.raises(ConfigError, match=r"tasks.vqa: unknown key 'batch_sise' \(did you mean 'batch_size'\?\)"):
        TaskConfig.from_dict("vqa", {"batch_sise": 8})
    with pytest.raises(ConfigError, match=r"tasks.caption.predict: unknown key 'num_beam' \(did you mean "
                                          r"'num_beams'\?\)"):
        TaskConfig.from_dict("caption", {"predict": {"mode": "generate", "num_beam": 5}})
    with pytest.raises(ConfigError, match=r"tasks.caption.score: unknown key 'metoer' \(did you mean 'meteor'\?\)"):
        TaskConfig.from_dict("caption", {"score": {"task": "coco_caption", "gt": "x", "metoer": False}})
    TaskConfig.from_dict("caption", {"predict": {"mode": "generate", "num_beams": 5, "max_length": 20},
                                     "score": {"task": "coco_caption", "gt": "x", "meteor": False}})


def test_a_dora_rule_with_a_misspelled_key_names_the_closest():
    from dora.targeting import DoRARule, TargetingError

    with pytest.raises(TargetingError, match=r"unknown keys 'rnak' \(did you mean 'rank'\?\)"):
        DoRARule.from_dict({"match": "x", "rnak": 8})
