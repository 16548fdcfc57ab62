"""Tiny stand-ins for the paper's starting point, built from configs and saved like real checkpoints.

No machine here downloads weights, so the demo and the tests write, in a folder:
    tokenizer/   a BPE tokenizer trained on the demo text (tokenizers), saved as a transformers fast tokenizer
    llm/         a small LlamaForCausalLM (the role of vicuna-7b-v1.5), with that tokenizer
    vision/      a small CLIPVisionModel and its CLIPImageProcessor (the role of clip-vit-large-patch14-336)
    mm_projector.bin   a stage-1 projector file with LLaVA's key names
and the recipe then loads them through the same from_pretrained path a real checkpoint takes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from data.conversation import IMAGE_TOKEN, VICUNA_SYSTEM

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                 "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=[IMAGE_TOKEN])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def corpus_from_llava_json(path: Path) -> list[str]:
    """Every turn's text, for training the tokenizer."""
    records = json.loads(Path(path).read_text())
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT:"]
    for r in records:
        texts += [c["value"].replace(IMAGE_TOKEN, " ") for c in r["conversations"]]
    return texts


def dialogues_from_llava_json(path: Path) -> list[str]:
    """Each conversation rendered with the vicuna_v1 template, images left out: the text the LLM pretrains on."""
    from data.conversation import parse_turns, render_vicuna_v1
    records = json.loads(Path(path).read_text())
    return [render_vicuna_v1(parse_turns([{**c, "value": c["value"].replace(IMAGE_TOKEN, "")}
                                          for c in r["conversations"]], has_image=False)).text for r in records]


def pretrain_language_model(llm, tokenizer, texts: list[str], steps: int, batch_size: int = 16, lr: float = 3e-3,
                            seed: int = 0) -> float:
    """A few hundred steps of plain next-token training on text: the tiny LLM then plays a pretrained one
    (an output layer at a trained scale, the answer vocabulary in context), as vicuna does for the paper."""
    import random
    rng = random.Random(seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    llm.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        enc = tokenizer(rng.sample(texts, min(batch_size, len(texts))), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = llm(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    llm.eval()
    return loss.item()


def make_demo_checkpoints(root: str | Path, corpus: Iterable[str], lm_texts: Iterable[str] = (), lm_steps: int = 0,
                          image_size: int = 48, patch_size: int = 8, hidden: int = 96, layers: int = 2,
                          vision_layers: int = 1,
                          seed: int = 0) -> dict[str, Path]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    paths = {"tokenizer": root / "llm", "llm": root / "llm", "vision": root / "vision",
             "projector": root / "mm_projector.bin"}
    tokenizer = train_tokenizer(corpus, paths["llm"])
    llm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    llm = LlamaForCausalLM(llm_config)
    pretrain_language_model(llm, tokenizer, list(lm_texts), steps=lm_steps)
    llm.save_pretrained(paths["llm"])
    vision_config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=64,
                                     intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
                                     projection_dim=64)
    CLIPVisionModel(vision_config).save_pretrained(paths["vision"])
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(paths["vision"])
    # A stage-1 projector in LLaVA's own file format (keys model.mm_projector.0/.2).
    first, second = torch.nn.Linear(64, hidden), torch.nn.Linear(hidden, hidden)
    torch.save({"model.mm_projector.0.weight": first.weight.data, "model.mm_projector.0.bias": first.bias.data,
                "model.mm_projector.2.weight": second.weight.data, "model.mm_projector.2.bias": second.bias.data},
               paths["projector"])
    return paths
