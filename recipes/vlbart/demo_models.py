"""A tiny stand-in for facebook/bart-base, built from a config and saved like the real checkpoint.

No machine here downloads weights, so the demo and the tests write, in a folder:
    bart/   a byte-level BPE tokenizer trained on the demo's text (as BART's is byte-level BPE) and a small
            BartForConditionalGeneration, briefly pretrained as BART is: a denoising autoencoder that rebuilds the
            demo's sentences from copies with words masked. It then knows the language but none of the tasks
            (no prompt, no image), which is what fine-tuning facebook/bart-base starts from.
and the recipe then loads it through the same from_pretrained path facebook/bart-base takes.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Sequence

import torch

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0-3, <mask> last in BART; here 4


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))  # <s> text </s>, as BART
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")
    fast.save_pretrained(out)
    return fast


def mask_words(text: str, rng: random.Random, rate: float = 0.3) -> str:
    """BART's text infilling, by words: each word replaced by <mask> with probability `rate`, runs merged."""
    out = []
    for word in text.split(" "):
        masked = rng.random() < rate
        if not (masked and out and out[-1] == "<mask>"):
            out.append("<mask>" if masked else word)
    return " ".join(out)


def pretrain_denoising(model, tokenizer, texts: Sequence[str], steps: int, batch_size: int = 32,
                       lr: float = 3e-3, seed: int = 0) -> float:
    """A few steps of denoising autoencoding on text: a masked copy in, the sentence out. No image, no prompt."""
    rng = random.Random(seed)
    texts = list(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = rng.sample(texts, min(batch_size, len(texts)))
        enc = tokenizer([mask_words(t, rng) for t in batch], return_tensors="pt", padding=True)
        labels = tokenizer(batch, return_tensors="pt", padding=True)["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def make_tiny_bart(out: str | Path, texts: Sequence[str], steps: int = 0, d_model: int = 64, layers: int = 2,
                   dropout: float = 0.1, seed: int = 0) -> Path:
    """Tokenizer + BART (encoder and decoder of `layers` layers each), pretrained `steps` steps on `texts`."""
    from transformers import BartConfig, BartForConditionalGeneration

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, out)
    config = BartConfig(vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                        decoder_ffn_dim=2 * d_model, max_position_embeddings=256, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, scale_embedding=False,
                        dropout=dropout)  # bart-base's 0.1; 0 where tests compare runs number for number
    model = BartForConditionalGeneration(config)
    if steps:
        pretrain_denoising(model, tokenizer, texts, steps, seed=seed)
    model.save_pretrained(out)
    return out
