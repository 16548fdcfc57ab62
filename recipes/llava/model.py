"""LLaVA-1.5 models for the recipe: a transformers LLaVA checkpoint, or the paper's starting point assembled
from its parts (an LLM, a CLIP vision tower and LLaVA's stage-1 projector file).

Which path is taken is said by the config (`model.llava` or `model.llm` + `model.vision_tower` +
`model.projector`), never guessed from folder names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from data.conversation import IMAGE_TOKEN
from recipes.quantization import bitsandbytes_config, load_device

log = logging.getLogger(__name__)

# LLaVA's mm_projector.bin (mlp2x_gelu: Linear, GELU, Linear) -> transformers' LlavaMultiModalProjector
PROJECTOR_KEYS = {
    "model.mm_projector.0.weight": "linear_1.weight", "model.mm_projector.0.bias": "linear_1.bias",
    "model.mm_projector.2.weight": "linear_2.weight", "model.mm_projector.2.bias": "linear_2.bias",
}


class ModelConfigError(ValueError):
    """A model section of a config that names no loadable model, or a projector file that does not fit."""


@dataclass(frozen=True)
class LlavaModelConfig:
    llava: Optional[str] = None  # a transformers-format LLaVA checkpoint (dir or hub id)
    llm: Optional[str] = None  # or: an LLM (e.g. lmsys/vicuna-7b-v1.5) ...
    vision_tower: Optional[str] = None  # ... a CLIP vision tower (openai/clip-vit-large-patch14-336) ...
    projector: Optional[str] = None  # ... and LLaVA's stage-1 mm_projector.bin (None: freshly initialised)
    vision_feature_layer: int = -2
    dtype: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    quantization: Optional[dict] = None  # {bits: 4, type: nf4, double_quant, compute_dtype}: QDoRA (recipes/quantization.py)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[name]


def map_projector_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA's projector keys (with or without the 'model.' prefix) -> transformers' names."""
    out = {}
    for key, value in state.items():
        name = key if key.startswith("model.") else f"model.{key}"
        if name not in PROJECTOR_KEYS:
            raise ModelConfigError(f"unexpected projector key {key!r}; expected {sorted(PROJECTOR_KEYS)}")
        out[PROJECTOR_KEYS[name]] = value
    missing = set(PROJECTOR_KEYS.values()) - set(out)
    if missing:
        raise ModelConfigError(f"projector file lacks {sorted(missing)}")
    return out


def load_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(f"projector file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return map_projector_state(state)


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # LLaVA pads vicuna with unk; fall back to eos for tokenizers without one
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_llava(config: LlavaModelConfig):
    """Returns (model, tokenizer, image_processor)."""
    dtype = resolve_dtype(config.dtype)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    quantization = bitsandbytes_config(config.quantization, dtype)
    quantized = {"quantization_config": quantization, **load_device()} if quantization else {}
    if config.llava:
        if config.llm or config.vision_tower or config.projector:
            raise ModelConfigError("give either model.llava or model.llm + model.vision_tower (+ projector)")
        model = LlavaForConditionalGeneration.from_pretrained(config.llava, dtype=dtype, **extra, **quantized)
        tokenizer = load_tokenizer(config.llava)
        image_processor = AutoImageProcessor.from_pretrained(config.llava)
        if model.config.image_token_id != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN):
            raise ModelConfigError(f"{config.llava}: the tokenizer's {IMAGE_TOKEN} id differs from the model's "
                                   f"image_token_id {model.config.image_token_id}")
    elif config.llm and config.vision_tower:
        model, tokenizer, image_processor = _assemble(config, dtype, extra, quantized)
    else:
        raise ModelConfigError("the model section needs model.llava, or model.llm and model.vision_tower")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer, image_processor


def _assemble(config: LlavaModelConfig, dtype, extra, quantized):
    tokenizer = load_tokenizer(config.llm)
    llm = AutoModelForCausalLM.from_pretrained(config.llm, dtype=dtype, **extra, **quantized)
    tower = CLIPVisionModel.from_pretrained(config.vision_tower, dtype=dtype)
    image_processor = AutoImageProcessor.from_pretrained(config.vision_tower)
    vision = tower.config
    llava_config = LlavaConfig(
        vision_config=vision.to_dict() | {"model_type": vision.model_type},
        # (a quantized LLM's config holds its quantization_config: the LLaVA config is not the quantized one)
        text_config={k: v for k, v in llm.config.to_dict().items() if k != "quantization_config"}
        | {"model_type": llm.config.model_type},
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default",  # drop CLS: 576 tokens for 336px / 14
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    # Take the loaded modules over as they are (no copy of the 7B weights).
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = tower
    projector = model.model.multi_modal_projector
    projector.to_empty(device="cpu")
    if config.projector:
        projector.load_state_dict(load_projector_file(config.projector))
    else:
        log.warning("no stage-1 projector given: the projector starts from a random initialisation")
        for layer in (projector.linear_1, projector.linear_2):
            layer.reset_parameters()
    projector.to(dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.text_config.vocab_size = model.get_input_embeddings().num_embeddings
    model.generation_config = llm.generation_config
    return model, tokenizer, image_processor
