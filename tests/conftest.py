import os
import tempfile

import pytest


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# datasets' Arrow cache of the tests' data files, out of the user's ~/.cache (children inherit it)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), f"dora-tests-datasets-{os.getuid()}"))


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def llava_assets(tmp_path_factory):
    """A small demo dataset and tiny LLaVA parts (tokenizer + LLM, CLIP tower, stage-1 projector file)."""
    from data.demo_shapes import write_demo_dataset
    from recipes.llava.demo_models import corpus_from_llava_json, dialogues_from_llava_json, make_demo_checkpoints

    root = tmp_path_factory.mktemp("llava")
    data = write_demo_dataset(root / "data", n_train_images=16, n_eval_images=4, seed=1)
    checkpoints = make_demo_checkpoints(root / "checkpoints", corpus_from_llava_json(data["train"]),
                                        dialogues_from_llava_json(data["train"]), lm_steps=5, hidden=64)
    return {"root": root, **data, **checkpoints}


@pytest.fixture(scope="session")
def llava_dir(llava_assets, tmp_path_factory):
    """The tiny LLaVA of llava_assets assembled and saved as one checkpoint (eval generate's --model)."""
    import torch

    from recipes.llava.model import LlavaModelConfig, build_llava

    torch.manual_seed(0)
    model, tokenizer, image_processor = build_llava(LlavaModelConfig(
        llm=str(llava_assets["llm"]), vision_tower=str(llava_assets["vision"]),
        projector=str(llava_assets["projector"]), dtype="fp32"))
    out = tmp_path_factory.mktemp("llava_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out
