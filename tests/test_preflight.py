"""Before any model is built: model paths and hub ids, data files, image folders and the output folder are checked,
each mistake one ConfigError naming its key (no hub retries, no model loaded first)."""
import time
from pathlib import Path

import pytest

from recipes import preflight
from recipes.config import ConfigError


def _fake_cache(root: Path, repo: str) -> None:
    """A hub id as huggingface_hub caches it: refs/main -> snapshots/<rev>/config.json."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")


def test_hub_ids_are_found_in_the_cache_or_refused_at_once_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_cache(tmp_path / "hub", "lmsys/vicuna-7b-v1.5")
    preflight.check_model("model.llm", "lmsys/vicuna-7b-v1.5")
    preflight.check_model("model.llm", str(tmp_path))  # a local folder
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"model.llm: lmsys/vicuna-7b-v15 is not a local path and not in the local "
                                          r"Hugging Face cache \(offline"):
        preflight.check_model("model.llm", "lmsys/vicuna-7b-v15")
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConfigError, match="model.llm: no_such_run/checkpoints/llm not found"):
        preflight.check_model("model.llm", "no_such_run/checkpoints/llm")


def test_online_one_question_to_the_hub_says_what_is_wrong(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def unreachable(name, timeout):
        calls.append((name, timeout))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(ConfigError, match=r"model.path: org/model is not in the local Hugging Face cache and the hub "
                                          r"cannot be reached \(ConnectionError\)"):
        preflight.check_model("model.path", "org/model")
    assert calls == [("org/model", preflight.HUB_TIMEOUT_S)]

    class Response:  # what RepositoryNotFoundError is built with
        status_code, headers, url, request = 404, {}, "https://huggingface.co/api/models/org/typo", None

    def missing(name, timeout):
        raise RepositoryNotFoundError("404", response=Response())

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(ConfigError, match="model.path: org/typo is not on the hub"):
        preflight.check_model("model.path", "org/typo")


def test_files_folders_and_the_output_folder(tmp_path):
    (tmp_path / "data.json").write_text("[]")
    preflight.check_file("data.data_path", str(tmp_path / "data.json"))
    with pytest.raises(ConfigError, match=r"data.data_path: .*nope.json not found"):
        preflight.check_file("data.data_path", str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"data.image_folder: folder .*data.json not found \(a file\)"):
        preflight.check_folder("data.image_folder", str(tmp_path / "data.json"))
    preflight.check_output("train.output_dir", str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    with pytest.raises(ConfigError, match=r"train.output_dir: cannot write in .*data.json/run"):
        preflight.check_output("train.output_dir", str(tmp_path / "data.json" / "run"))


@pytest.mark.parametrize("recipe", ["llava", "vlm"])
def test_a_wrong_data_path_is_reported_before_the_model_is_built(recipe, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module(f"recipes.{recipe}.train")
    builder = "build_llava" if recipe == "llava" else "build_model"
    monkeypatch.setattr(module, builder, lambda *a, **k: pytest.fail("the model was built before the data check"))
    model = {"llava": f"model: {{llava: {tmp_path}}}", "vlm": f"model: {{path: {tmp_path}}}"}[recipe]
    config = tmp_path / "c.yaml"
    config.write_text(f"{model}\ndata: {{data_path: {tmp_path / 'missing.json'}}}\n"
                      f"train: {{output_dir: {tmp_path / 'out'}}}\n")
    with pytest.raises(ConfigError, match=r"data.data_path: .*missing.json not found"):
        module.main([str(config)])
