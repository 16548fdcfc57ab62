"""Tiny random checkpoints of VLM families, saved as the hub ships them (model + processor with its chat template),
for the generic recipe's tests.

Each family has the real checkpoint's processor class, a tokenizer of the real one's kind (a sentencepiece
Llama-style model with byte fallback and split digits for LLaVA-1.5 / LLaVA-NeXT, whose vicuna and mistral
tokenizers are of that kind; byte-level BPE for the Qwen2, Llama 3, SmolLM and Mistral tekken families), and a chat
template of our own that renders the same text as the real checkpoint's template on the conversations the recipe
makes (user turns with images and text, assistant turns with text: multi-turn, multi-image, text-only, a system turn
first), quirks included.
`TEMPLATE_SOURCES` names the real template each one was compared with; tests/vlm_template_renderings.py holds
what those render, tests/test_vlm_chat.py checks ours against it.

The tokenizers are trained here on the test's sentences plus each family's special tokens.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

from recipes.vlm.demo import LLAVA_15_TEMPLATE

# The families the recipe test trains end to end (tests/test_vlm_recipe.py), and all those with a real template
FAMILIES = ("llava_next", "qwen2_vl", "idefics3", "gemma3", "mllama", "llava_onevision")
TEMPLATE_FAMILIES = ("llava", "llava_next", "llava_next_mistral", "llava_next_mistral_bs", "llava_onevision",
                     "qwen2_vl", "idefics3", "smolvlm", "gemma3", "mllama", "mistral3", "pixtral")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)

# --- chat templates: ours, each rendering what the named real template renders (see the module docstring) ---------
# llava-1.5-hf: "USER: <image>\n{q} ASSISTANT: {a} USER: ..." - a space after every message, no end marker, and the
# generation prompt "ASSISTANT:" without the space that follows it inside a conversation (the generic recipe's demo
# ships it: one copy)
LLAVA_15 = LLAVA_15_TEMPLATE


def _mistral(end: str) -> str:
    """llava-v1.6-mistral-hf: "[INST] <image>\\n{q} [/INST] {a}{end} [INST] ..." and no generation prompt."""
    return ("{% for m in messages %}"
            "{% if m.role == 'system' %}{{ '<<SYS>>\\n' ~ m.content[0].text ~ '\\n<</SYS>>\\n\\n' }}"
            "{% elif m.role == 'user' %}{{ '[INST] ' }}"
            "{% for c in m.content if c.type == 'image' %}{{ '<image>\\n' }}{% endfor %}"
            "{% for c in m.content if c.type == 'text' %}{{ c.text }}{% endfor %}{{ ' [/INST]' }}"
            "{% elif m.role == 'assistant' %}{{ ' ' ~ m.content[0].text ~ '" + end + " ' }}"
            "{% else %}{{ raise_exception('user and assistant turns only') }}{% endif %}"
            "{% endfor %}")


# the hub revision that ends an answer with the four characters <\s>, and the later one with the EOS "</s>"
LLAVA_NEXT_MISTRAL_BS = _mistral("<\\\\s>")
LLAVA_NEXT_MISTRAL = _mistral("</s>")
# llava-onevision-hf: "<|im_start|>user <image>\n{q}<|im_end|><|im_start|>assistant \n{a}<|im_end|>" - a space after
# the role and no newline between turns, but the generation prompt "<|im_start|>assistant\n"
LLAVA_ONEVISION = ("{% for m in messages %}{{ '<|im_start|>' ~ m.role ~ ' ' }}"
                   "{% for c in m.content if c.type == 'image' %}{{ '<image>' }}{% endfor %}"
                   "{% for c in m.content if c.type == 'video' %}{{ '<video>' }}{% endfor %}"
                   "{% for c in m.content if c.type == 'text' %}{{ '\\n' ~ c.text }}{% endfor %}"
                   "{{ '<|im_end|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Qwen2-VL-Instruct and Qwen2.5-VL-Instruct (the same template): a default system turn
QWEN2_VL = ("{% for m in messages %}"
            "{% if loop.first and m.role != 'system' %}"
            "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
            "{{ '<|im_start|>' ~ m.role ~ '\\n' }}"
            "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
            "{% if c.type == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
            "{% elif c.type == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
            "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _idefics3(start: str) -> str:
    """Idefics3-8B-Llama3 and SmolVLM-Instruct: "User:<image>{q}<end_of_utterance>\\nAssistant: {a}..." - no space
    after the colon when the turn opens with an image."""
    return ("{{ '" + start + "' }}{% for m in messages %}{{ m.role | capitalize }}"
            "{{ ':' if m.content[0].type == 'image' else ': ' }}"
            "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}"
            "{% elif c.type == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
            "{{ '<end_of_utterance>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


IDEFICS3 = _idefics3("<|begin_of_text|>")
SMOLVLM = _idefics3("<|im_start|>")
# gemma-3-it: the BOS written by the template, "model" for the assistant, texts trimmed, a system turn folded into
# the first user turn
GEMMA3 = ("{{ bos_token }}"
          "{% if messages[0].role == 'system' %}"
          "{% set first = messages[0].content if messages[0].content is string else messages[0].content[0].text %}"
          "{% set prefix, turns = first ~ '\\n\\n', messages[1:] %}"
          "{% else %}{% set prefix, turns = '', messages %}{% endif %}"
          "{% for m in turns %}"
          "{{ '<start_of_turn>' ~ ('model' if m.role == 'assistant' else m.role) ~ '\\n' ~ (prefix if loop.first "
          "else '') }}"
          "{% if m.content is string %}{{ m.content | trim }}{% else %}{% for c in m.content %}"
          "{% if c.type == 'image' %}{{ '<start_of_image>' }}{% elif c.type == 'text' %}{{ c.text | trim }}"
          "{% endif %}{% endfor %}{% endif %}"
          "{{ '<end_of_turn>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
# Llama-3.2-11B-Vision-Instruct: the BOS written by the template, and a dated system turn in conversations without
# images or with a system message (today's date unless `date_string` is given); the system message's content as
# the template writes it (`| trim`: a string, or a list's Python repr); the earlier revision raises on a system
# message with images instead
MLLAMA = ("{{ bos_token }}"
          "{% set ns = namespace(images=false) %}"
          "{% for m in messages if m.content is not string %}{% for c in m.content if c.type == 'image' %}"
          "{% set ns.images = true %}{% endfor %}{% endfor %}"
          "{% if messages[0].role == 'system' %}{% set system, turns = messages[0].content | trim, messages[1:] %}"
          "{% else %}{% set system, turns = '', messages %}{% endif %}"
          "{% if messages[0].role == 'system' or not ns.images %}"
          "{% if date_string is not defined %}"
          "{% set date_string = strftime_now('%d %b %Y') if strftime_now is defined else '26 Jul 2024' %}"
          "{% endif %}"
          "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: ' "
          "~ date_string ~ '\\n\\n' ~ system ~ '<|eot_id|>' }}"
          "{% endif %}"
          "{% for m in turns %}{{ '<|start_header_id|>' ~ m.role ~ '<|end_header_id|>\\n\\n' }}"
          "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
          "{% if c.type == 'image' %}{{ '<|image|>' }}{% elif c.type == 'text' %}{{ c.text }}{% endif %}"
          "{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# Mistral-Small-3.1-24B-Instruct-2503 (Mistral3): the BOS written by the template, a system prompt always (its
# default one with today's date, "%Y-%m-%d", unless the first message is a system turn, whose content[0].text it
# takes), "[INST]{q}[/INST]{a}</s>" with images as "[IMG]" in place and no generation prompt
MISTRAL3_DEFAULT_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in "
    "Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is {today}.\n\nWhen you're not "
    "sure about some information, you say that you don't have the information and don't make up anything.\nIf the "
    "user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the "
    "question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. "
    "\"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => "
    "\"Where do you travel from?\")")
MISTRAL3 = ("{{ bos_token }}{% if messages[0].role == 'system' %}"
            "{% set system, turns = messages[0].content[0].text, messages[1:] %}"
            "{% else %}{% set system, turns = " + repr(MISTRAL3_DEFAULT_SYSTEM).replace("{today}", "' ~ "
            "strftime_now('%Y-%m-%d') ~ '") + ", messages %}{% endif %}"
            "{{ '[SYSTEM_PROMPT]' ~ system ~ '[/SYSTEM_PROMPT]' }}{% for m in turns %}"
            "{% if m.role == 'user' %}{{ '[INST]' }}{% for c in m.content %}"
            "{{ '[IMG]' if c.type == 'image' else c.text }}{% endfor %}{{ '[/INST]' }}"
            "{% elif m.role == 'assistant' %}{{ m.content[0].text ~ eos_token }}"
            "{% else %}{{ raise_exception('Only user, system and assistant roles are supported!') }}{% endif %}"
            "{% endfor %}")

# pixtral-12b (mistral-community/pixtral-12b, as transformers' convert_pixtral_weights_to_hf.py writes it): the BOS
# written by the template, "[INST]{q}[/INST]{a}</s>" with images as "[IMG]" in place, no generation prompt, and a
# system message written only into the last user turn ("[INST]{system}\n\n{q}[/INST]"), so never in a conversation
# that ends with an answer
PIXTRAL = ("{% if messages[0].role == 'system' %}{% set system, turns = messages[0].content, messages[1:] %}"
           "{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}{% for m in turns %}"
           "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('After the optional system message, conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{% endif %}"
           "{% if m.role == 'user' %}{{ '[INST]' + system + '\n\n' if loop.last and system is defined else '[INST]' }}"
           "{% endif %}{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
           "{% if c.type == 'text' %}{{ c.content if 'content' in c else c.text }}"
           "{% elif c.type == 'image' %}{{ '[IMG]' }}{% else %}{{ raise_exception('Unrecognized content type!') }}"
           "{% endif %}{% endfor %}{% endif %}"
           "{% if m.role == 'user' %}{{ '[/INST]' }}{% elif m.role == 'assistant' %}{{ eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
           "initial optional system message!') }}{% endif %}{% endfor %}")

TEMPLATES = {"llava": LLAVA_15, "llava_next": LLAVA_15, "llava_next_mistral": LLAVA_NEXT_MISTRAL,
             "llava_next_mistral_bs": LLAVA_NEXT_MISTRAL_BS, "llava_onevision": LLAVA_ONEVISION, "qwen2_vl": QWEN2_VL,
             "idefics3": IDEFICS3, "smolvlm": SMOLVLM, "gemma3": GEMMA3, "mllama": MLLAMA, "mistral3": MISTRAL3,
             "pixtral": PIXTRAL}
# The real template each of ours renders the same text as (tests/test_vlm_chat.py; docs/vlm.md)
TEMPLATE_SOURCES = {
    "llava": "llava-hf/llava-1.5-7b-hf chat_template.json",
    "llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf chat_template.json (the llava-1.5-hf template)",
    "llava_next_mistral": "llava-hf/llava-v1.6-mistral-7b-hf chat_template.json, revision ending answers with </s>",
    "llava_next_mistral_bs": "llava-hf/llava-v1.6-mistral-7b-hf chat_template.json, revision ending answers with <\\s>",
    "llava_onevision": "llava-hf/llava-onevision-qwen2-*-ov-hf chat_template.json",
    "qwen2_vl": "Qwen/Qwen2-VL-*-Instruct and Qwen/Qwen2.5-VL-*-Instruct chat_template.json",
    "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3 chat_template.json",
    "smolvlm": "HuggingFaceTB/SmolVLM-Instruct chat_template.json",
    "gemma3": "google/gemma-3-*-it chat template (both revisions)",
    "mllama": "meta-llama/Llama-3.2-11B-Vision-Instruct chat_template.json (both revisions)",
    "mistral3": "mistralai/Mistral-Small-3.1-24B-Instruct-2503 chat template (transformers "
                "tests/models/mistral3/test_processing_mistral3.py, its processor's)",
    "pixtral": "mistral-community/pixtral-12b chat template as transformers' "
               "src/transformers/models/pixtral/convert_pixtral_weights_to_hf.py writes it",
}

# --- tokenizers ----------------------------------------------------------------------------------------------------
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
IDEFICS3_SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                 "<end_of_image>", "<image_soft_token>"]
# family: (special tokens, bos, eos, pad, whether the tokenizer adds the BOS itself)
BPE_TOKENIZERS = {
    "qwen2_vl": (QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", False),
    "llava_onevision": (QWEN_SPECIAL + ["<image>", "<video>"], None, "<|im_end|>", "<|endoftext|>", False),
    "idefics3": (LLAMA3_SPECIAL + IDEFICS3_SPECIAL, "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", True),
    "smolvlm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + IDEFICS3_SPECIAL, "<|im_start|>",
                "<end_of_utterance>", "<|im_end|>", False),
    "gemma3": (GEMMA_SPECIAL, "<bos>", "<eos>", "<pad>", True),
    "mllama": (LLAMA3_SPECIAL + ["<|image|>"], "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", True),
    # Mistral 3's tekken tokenizer is a byte-level BPE (tiktoken's kind) that adds the BOS
    "mistral3": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
                  "[/SYSTEM_PROMPT]", "<pad>"], "<s>", "</s>", "<pad>", True),
    "pixtral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>"], "<s>",
                "</s>", "<pad>", True),
    # PaliGemma's processor adds <image> and its location and segmentation tokens itself, and writes BOS and EOS
    "paligemma": (["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>", "<eos>", "<pad>", False),
}


def _bpe_tokenizer(family: str, texts: Iterable[str], vocab_size: int = 400):
    """Byte-level BPE, as Qwen2's, Llama 3's, SmolLM's; Gemma's is sentencepiece, but BPE is enough for its labels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos, pad, adds_bos = BPE_TOKENIZERS[family]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    if adds_bos:  # Llama 3 and Gemma add the BOS, which their templates write too
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
            (bos, tok.token_to_id(bos))])
    extra = {}
    if family == "gemma3":  # Gemma3Processor reads these names from its tokenizer
        extra = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
                     extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                           "image_token": "<image_soft_token>"})
    named = {t for t in (bos, eos, pad) if t}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[t for t in special if t not in named], **extra)


def _sentencepiece_tokenizer():
    """vicuna's (and mistral's) kind: sentencepiece BPE, byte fallback, split digits, "▁" prefix; <image> and
    <pad> added as llava-hf's conversions add them."""
    from transformers import AutoTokenizer

    from vicuna_tokenizer import make_vicuna_like_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(make_vicuna_like_tokenizer(Path(tmp)))
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tokenizer


def family_tokenizer(family: str, texts: Iterable[str]):
    if family in ("llava", "llava_next", "llava_next_mistral", "llava_next_mistral_bs"):
        return _sentencepiece_tokenizer()
    if family == "mistral3":  # its default system prompt is in every conversation without a system turn
        texts = [*texts, MISTRAL3_DEFAULT_SYSTEM]
    return _bpe_tokenizer(family, texts)


def build_family(family: str, out: str | Path, texts: Iterable[str], seed: int = 0) -> Path:
    """A random `family` model and its processor saved to `out` (loadable with AutoModelForImageTextToText and
    AutoProcessor)."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = Path(out)
    tokenizer = family_tokenizer(family, texts)
    template = TEMPLATES.get(family)
    ids = lambda t: tokenizer.convert_tokens_to_ids(t)  # noqa: E731
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    clip = {"model_type": "clip_vision_model", **VISION, "image_size": 32, "patch_size": 8}
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor
        config = LlavaConfig(text_config={"model_type": "llama", **TEXT, **common}, vision_config=clip,
                             image_token_index=ids("<image>"), vision_feature_layer=-1)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", chat_template=template,
                                   num_additional_image_tokens=1)
    elif family.startswith("llava_next"):
        from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        config = LlavaNextConfig(text_config={"model_type": "llama", **TEXT, **common}, vision_config=clip,
                                 image_token_index=ids("<image>"), image_grid_pinpoints=pinpoints,
                                 vision_feature_layer=-1)
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                  image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                       vision_feature_select_strategy="default", chat_template=template,
                                       num_additional_image_tokens=1)
    elif family == "llava_onevision":
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                                  LlavaOnevisionVideoProcessor)
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        config = LlavaOnevisionConfig(text_config={"model_type": "qwen2", **TEXT, **common},
                                      vision_config={"model_type": "siglip_vision_model", **VISION, "image_size": 32,
                                                     "patch_size": 8},
                                      image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                      image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
        image_processor = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
        processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=16,
                                            vision_feature_select_strategy="full", chat_template=template)
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
                                     video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    elif family in ("idefics3", "smolvlm"):  # SmolVLM-Instruct is an Idefics3 checkpoint with SmolLM's tokenizer
        from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor
        config = Idefics3Config(text_config={"model_type": "llama", **TEXT, **common},
                                vision_config={**VISION, "image_size": 32, "patch_size": 8}, scale_factor=2,
                                image_token_id=ids("<image>"), **common)
        image_processor = Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                 do_image_splitting=False)
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=template)
    elif family == "gemma3":
        from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor
        config = Gemma3Config(text_config={**TEXT, **common, "head_dim": 16, "sliding_window": 64},
                              vision_config={**VISION, "image_size": 32, "patch_size": 8}, mm_tokens_per_image=4,
                              boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                              image_token_index=ids("<image_soft_token>"), **common)
        image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                    chat_template=template)
    elif family == "paligemma":  # no chat template: the processor makes the labels from a prompt and a `suffix`
        from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
        image_processor.image_seq_length = 16  # (32 / 8) ** 2 patches
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        common["vocab_size"] = len(tokenizer)  # with the tokens the processor added
        config = PaliGemmaConfig(text_config={"model_type": "gemma", **TEXT, **common, "head_dim": 16},
                                 vision_config={"model_type": "siglip_vision_model", **VISION, "image_size": 32,
                                                "patch_size": 8},
                                 image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=64,
                                 **common)
    elif family == "mistral3":
        from transformers import Mistral3Config, PixtralImageProcessor, PixtralProcessor
        config = Mistral3Config(text_config={"model_type": "mistral", **TEXT, **common, "head_dim": 16},
                                vision_config={"model_type": "pixtral", **VISION, "head_dim": 16, "image_size": 32,
                                               "patch_size": 8},
                                image_token_index=ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1)
        image_processor = PixtralImageProcessor(size={"longest_edge": 32}, patch_size={"height": 8, "width": 8})
        processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                     spatial_merge_size=2, chat_template=template)
    elif family == "pixtral":  # pixtral-12b is a LlavaForConditionalGeneration with a Pixtral tower, no merge
        from transformers import LlavaConfig, PixtralImageProcessor, PixtralProcessor
        config = LlavaConfig(text_config={"model_type": "mistral", **TEXT, **common, "head_dim": 16},
                             vision_config={"model_type": "pixtral", **VISION, "head_dim": 16, "image_size": 32,
                                            "patch_size": 8},
                             image_token_index=ids("[IMG]"), vision_feature_layer=-1,
                             vision_feature_select_strategy="full")
        image_processor = PixtralImageProcessor(size={"longest_edge": 32}, patch_size={"height": 8, "width": 8})
        processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                     spatial_merge_size=1, chat_template=template)
    elif family == "mllama":
        from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor
        config = MllamaConfig(text_config={**TEXT, **common, "cross_attention_layers": [1]},
                              vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                             "num_global_layers": 1, "attention_heads": 2, "image_size": 32,
                                             "patch_size": 8, "max_num_tiles": 2, "vision_output_dim": 64,
                                             "intermediate_layers_indices": [0],
                                             "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
                              image_token_index=ids("<|image|>"))
        image_processor = MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2)
        processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    else:
        raise ValueError(f"unknown family {family!r}; one of {TEMPLATE_FAMILIES}")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


REMOTE_CONFIG = '''from transformers import LlavaConfig


class TinyRemoteConfig(LlavaConfig):
    model_type = "tiny_remote_vlm"
'''
REMOTE_MODEL = '''from transformers import LlavaForConditionalGeneration

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = TinyRemoteConfig
'''


def build_remote_code_checkpoint(out: str | Path, texts: Iterable[str]) -> Path:
    """The "llava" family saved as a checkpoint that brings its own code (as Phi-3.5-vision and InternVL2 do): a
    model type transformers does not know, classes named by the config's auto_map, their files beside it."""
    import json

    out = build_family("llava", out, texts)
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "tiny_remote_vlm"
    config["auto_map"] = {"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                          "AutoModelForImageTextToText": "modeling_tiny_remote.TinyRemoteForConditionalGeneration"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (out / "modeling_tiny_remote.py").write_text(REMOTE_MODEL)
    return out
