"""A small tokenizer that behaves like vicuna-7b-v1.5's (LLaMA's sentencepiece model), for the tests.

Trained here with sentencepiece (BPE, byte fallback, digits split one by one, a dummy "▁" prefix, identity
normalisation) and saved as vicuna ships its tokenizer: `tokenizer.model` plus a `tokenizer_config.json` naming
LlamaTokenizer with `legacy: false`, which transformers converts on load. As in vicuna's vocabulary, "USER" inside
a word is one piece while " USER" splits as "▁US" "ER", and an answer that starts with a digit or a character
outside the vocabulary is preceded by a bare "▁" token.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from data.conversation import VICUNA_SYSTEM

WORDS = ("what is the colour of this shape circle square triangle red green blue yellow how many are there in "
         "image picture answer question short word phrase left right top bottom small large describe a an and "
         "yes no it they one two three").split()


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []

    def sentence():
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
        return " ".join(words).capitalize() + rng.choice([".", "?", f" {rng.randint(0, 999)}."])
    for _ in range(1500):
        lines.append(f"{VICUNA_SYSTEM} USER: {sentence()} ASSISTANT: {sentence()}")
    return lines


def _vicuna_pieces(model_file: Path) -> None:
    """Give the model vicuna's pieces for the role names: "USER" whole, " USER" as "▁US" "ER"."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    drop = {"▁USER", "▁USE", "USER", "US", "ER", "▁US", "SER", "USE"}
    kept = [p for p in proto.pieces if p.piece not in drop]
    top = max(p.score for p in kept if p.type == pb.ModelProto.SentencePiece.NORMAL)
    del proto.pieces[:]
    proto.pieces.extend(kept)
    # BPE merges by score: "US" and "ER" first, then "▁US" before "USER", so "▁USER" stops at "▁US" "ER".
    for piece, score in (("US", top + 4), ("ER", top + 4), ("▁US", top + 3), ("USER", top + 2)):
        proto.pieces.add(piece=piece, score=score, type=pb.ModelProto.SentencePiece.NORMAL)
    model_file.write_bytes(proto.SerializeToString())


def make_vicuna_like_tokenizer(out: Path, seed: int = 0, vocab_size: int = 420) -> Path:
    import sentencepiece as spm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(_corpus(seed)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    _vicuna_pieces(out / "tokenizer.model")
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": None, "legacy": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 4096, "padding_side": "right", "tokenizer_class": "LlamaTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))
    return out
