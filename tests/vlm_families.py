"""Tiny random checkpoints of other VLM families, saved as the hub ships them (model + processor with its chat
template), for the generic recipe's tests: LLaVA-NeXT, Qwen2-VL, Idefics3 and Gemma 3.

The tokenizer is a byte-level BPE trained here on the test's sentences plus each family's special tokens; the
chat template is a small one of our own that places each family's image placeholder where the real templates do
(inside the user turn), so that the recipe meets what it meets on real checkpoints: content lists with
{"type": "image"} items, a processor that expands the placeholder, extra inputs per family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

FAMILIES = ("llava_next", "qwen2_vl", "idefics3", "gemma3")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
ROLES = ["<|user|>", "<|assistant|>", "<|end|>"]
PLACEHOLDER = {"llava_next": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "idefics3": "<image>", "gemma3": "<start_of_image>"}
FAMILY_TOKENS = {"llava_next": ["<image>"], "qwen2_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                         "<|video_pad|>"],
                 "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                 + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
                 "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]}


def chat_template(family: str) -> str:
    image = PLACEHOLDER[family]
    # Gemma 3's template writes the BOS itself and its tokenizer adds one too (as Llama 3's and Mllama's do)
    return ("{{ bos_token }}" if family == "gemma3" else "") + ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image + "{% else %}"
            "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _tokenizer(family: str, texts: Iterable[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<bos>", "<unk>"] + ROLES + FAMILY_TOKENS[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    extra = {}
    if family == "gemma3":
        from tokenizers import processors
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[
            ("<bos>", tok.token_to_id("<bos>"))])  # Gemma3Processor reads these names from its tokenizer
        extra = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
                     extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                           "image_token": "<image_soft_token>"})
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<|end|>",
                                   unk_token="<unk>", additional_special_tokens=ROLES + FAMILY_TOKENS[family],
                                   **extra)


def build_family(family: str, out: str | Path, texts: Iterable[str], seed: int = 0) -> Path:
    """A random `family` model and its processor saved to `out` (loadable with AutoModelForImageTextToText and
    AutoProcessor)."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = Path(out)
    tokenizer = _tokenizer(family, texts)
    ids = lambda t: tokenizer.convert_tokens_to_ids(t)  # noqa: E731
    common = dict(vocab_size=len(tokenizer), pad_token_id=ids("<pad>"), bos_token_id=ids("<bos>"),
                  eos_token_id=ids("<|end|>"))
    if family == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor
        config = LlavaNextConfig(text_config={"model_type": "llama", **TEXT, **common},
                                 vision_config={"model_type": "clip_vision_model", **VISION, "image_size": 32,
                                                "patch_size": 8},
                                 image_token_index=ids("<image>"), image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
                                 vision_feature_layer=-1)
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                  image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                       vision_feature_select_strategy="default", chat_template=chat_template(family),
                                       num_additional_image_tokens=1)
    elif family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
        config = Qwen2VLConfig(text_config={**TEXT, **common, "rope_scaling": {"type": "mrope",
                                                                                "mrope_section": [2, 2, 4]}},
                               vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                                              "patch_size": 14, "spatial_merge_size": 2},
                               image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                               vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                               **common)
        image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     video_processor=Qwen2VLVideoProcessor(), chat_template=chat_template(family))
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor
        config = Idefics3Config(text_config={"model_type": "llama", **TEXT, **common},
                                vision_config={**VISION, "image_size": 32, "patch_size": 8}, scale_factor=2,
                                image_token_id=ids("<image>"), **common)
        image_processor = Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                 do_image_splitting=False)
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=chat_template(family))
    elif family == "gemma3":
        from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor
        config = Gemma3Config(text_config={**TEXT, **common, "head_dim": 16, "sliding_window": 64},
                              vision_config={**VISION, "image_size": 32, "patch_size": 8}, mm_tokens_per_image=4,
                              boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                              image_token_index=ids("<image_soft_token>"), **common)
        image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                    chat_template=chat_template(family))
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
