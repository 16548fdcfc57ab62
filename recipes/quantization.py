"""`model.quantization`: the language model's Linear layers loaded in 4 or 8 bits (bitsandbytes), DoRA on top
(QDoRA, dora/quantized.py). Shared by the LLaVA and generic VLM recipes.

    model:
      quantization: {bits: 4, type: nf4, double_quant: true, compute_dtype: bf16}   # QLoRA's setting

bits 4 (type nf4 | fp4, double_quant) or 8 (LLM.int8); compute_dtype the dtype the 4-bit kernel computes in (auto:
the model's dtype). The vision tower, the projector and the output head stay in the model's dtype, as LLaVA's
QLoRA runs leave them. ZeRO-3 cannot partition 4-bit weights: such a run is refused with the stage to use.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import ConfigError, unknown_keys

KEYS = ("bits", "type", "double_quant", "compute_dtype")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# never quantized (llm_int8_skip_modules: a module whose name holds one of these): every family's vision tower and
# connector as transformers names them (LLaVA's, Gemma 3's, PaliGemma's vision_tower; Qwen2-VL's visual; Idefics3's,
# SmolVLM's, Mllama's vision_model; their connector / projector), and the output head
_KEEP_NAMES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "connector", "lm_head")
# transformers 4 skips a module whose name contains a pattern; transformers 5 matches a pattern from the start of the
# name (as a regex) or as its suffix: each name in both forms
KEEP = [*_KEEP_NAMES, *(rf".*\b{name}" for name in _KEEP_NAMES)]


def bitsandbytes_config(section: Optional[dict], model_dtype: torch.dtype, keep: list[str] = KEEP):
    """transformers' BitsAndBytesConfig for `model.quantization` (None: no quantization)."""
    if not section:
        return None
    if not isinstance(section, dict):
        raise ConfigError("model.quantization must be a mapping, e.g. {bits: 4, type: nf4}")
    if set(section) - set(KEYS):
        raise unknown_keys("model.quantization", set(section) - set(KEYS), KEYS)
    bits = section.get("bits", 4)
    if bits not in (4, 8):
        raise ConfigError(f"model.quantization.bits must be 4 or 8, not {bits!r}")
    kind = section.get("type", "nf4")
    if kind not in ("nf4", "fp4"):
        raise ConfigError(f"model.quantization.type must be nf4 or fp4, not {kind!r}")
    compute = section.get("compute_dtype", "auto")
    if compute != "auto" and compute not in DTYPES:
        raise ConfigError(f"model.quantization.compute_dtype must be auto or one of {sorted(DTYPES)}, not {compute!r}")
    try:
        import bitsandbytes  # noqa: F401  (transformers names the package less clearly)
    except ImportError:
        raise ConfigError("model.quantization needs bitsandbytes (pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                              bnb_4bit_use_double_quant=bool(section.get("double_quant", True)),
                              bnb_4bit_compute_dtype=model_dtype if compute == "auto" else DTYPES[compute],
                              llm_int8_skip_modules=keep)


def load_device() -> dict:
    """Where bitsandbytes quantizes the weights as they load: this process's GPU, or the CPU."""
    import os
    if torch.cuda.is_available():
        return {"device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
    return {"device_map": "cpu"}


def check_zero_stage(section: Optional[dict], deepspeed_json: str) -> None:
    """Before anything is built: a quantized run under a DeepSpeed config of ZeRO stage 3 is refused."""
    from .trainer import read_deepspeed_json
    stage = read_deepspeed_json(deepspeed_json).get("zero_optimization", {}).get("stage", 0)
    if section and stage == 3:
        raise ConfigError("model.quantization: DeepSpeed ZeRO-3 cannot partition 4-bit / 8-bit weights; train with "
                          "ZeRO-2 (train.deepspeed: launch/zero2.json), which partitions the adapter's optimizer "
                          "state and gradients")
