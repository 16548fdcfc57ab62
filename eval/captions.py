"""Captioning metrics through pycocoevalcap, fed exactly as each official scorer feeds it.

All the official caption scorers run the same pieces (pycocoevalcap's PTBTokenizer, Stanford CoreNLP in java,
lowercasing and dropping punctuation; then BLEU-1..4, METEOR 1.5 (java), ROUGE-L and CIDEr-D). They differ
in what they send to the tokenizer, and the tokenizer's output depends on it: one java process reads all
lines, and a line-final abbreviation-like token ("x.") is split or kept depending on the next line, so the
ORDER of the lines changes the scores. Each protocol below follows its scorer:

- COCO (salaniz/pycocoevalcap ad63453 COCOEvalCap; the same in bckim92/language-evaluation 8e9e03f, which
  VL-T5 / NVlabs/DoRA use for the Karpathy test split): text kept as is (non-ASCII included); references and
  predictions both in ground-truth image order.
- VALUE (VALUE-Leaderboard/EvaluationTools 10fc2d4, evaluate_tvc.py, also used for YC2C): every non-ASCII
  character becomes a space; one item per clip, all its descriptions as references. Its scorer runs on
  Python 2.7 only and keys both sides by the integer clip id in a dict, so the lines go out in Python 2.7's
  dict order (`py27_dict_order`: references built in ground-truth file order, predictions in submission
  order), not in file order.
- per-description (NVlabs/DoRA 7e2f10a, VL-T5/src/video/tvc_data.py + tvc.py through language-evaluation's
  CocoEvaluator): one item per description with that description as its only reference and its clip's
  caption as the prediction, in ground-truth order; text kept; "_UNK" in a reference becomes "_UNKNOWN".

Scores are returned x100 as in the paper's tables. SPICE is left out: it downloads CoreNLP models on first use.
A caption holding a line break other than "\\n" ("\\r", U+2028, ...) is refused: the java tokenizer splits the
line there and the official scorers then silently pair every later caption with the wrong item.
"""
from __future__ import annotations

import re
import shutil
from typing import Hashable, Mapping, Sequence

from .files import InputError

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
PROTOCOLS = ("coco", "value", "per-description")
_LINE_BREAKS = ("\r", "\x0b", "\x0c", "\u2028", "\u2029")  # split by the java tokenizer; "\n" is replaced


def py27_dict_order(keys: Sequence[int]) -> list[int]:
    """The iteration order of a CPython 2.7 dict into which the integer `keys` were inserted in this order.

    Facts of CPython 2.7's dictobject.c: hash(i) == i (-1 hashes as -2); 8 slots to start; open addressing
    with slot = i & mask, then i = 5*i + perturb + 1 with perturb = hash, shifted right by 5 each probe; after
    an insertion that fills two thirds of the slots the table grows to the first power of two (from 8) above
    4 * used (2 * used past 50000 entries), and the entries are reinserted in slot order."""
    size, table, used = 8, [None] * 8, 0

    def place(table, key):
        mask, h = len(table) - 1, (-2 if key == -1 else key) % (1 << 64)
        i, perturb = h, h
        while table[i & mask] is not None:
            i = (5 * i + perturb + 1) % (1 << 64)
            perturb >>= 5
        table[i & mask] = key

    seen = set()
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        place(table, key)
        used += 1
        if used * 3 >= size * 2:
            minused = (2 if used > 50000 else 4) * used
            size = 8
            while size <= minused:
                size <<= 1
            old, table = table, [None] * size
            for k in old:
                if k is not None:
                    place(table, k)
    return [k for k in table if k is not None]


def _py27_order(keys: Sequence[str]) -> list[str]:
    # VALUE's clip ids are JSON integers; any other id keeps the given order.
    if not all(re.fullmatch(r"-?\d+", k) for k in keys):
        return list(keys)
    by_int = {int(k): k for k in keys}
    return [by_int[i] for i in py27_dict_order(list(by_int))]


def value_ascii(text: str) -> str:
    """VALUE's remove_nonascii: each non-ASCII character becomes a space."""
    return "".join(c if ord(c) < 128 else " " for c in text)


def corpus_scores(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str],
                  meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (x100) of one prediction per key against its references.

    The tokenizer receives the references in the order of `references`, then (a second java process) the
    predictions in the order of `predictions`, as the official scorers send them. Keys must be the same."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise InputError("caption scoring needs java (pycocoevalcap's PTB tokenizer and METEOR run on it)")
    if set(references) != set(predictions):
        raise ValueError("references and predictions must have the same keys")
    for key, captions in [*references.items(), *((k, [p]) for k, p in predictions.items())]:
        if not captions:
            raise InputError(f"item {key!r} has no reference caption")
        for caption in captions:
            if any(b in caption for b in _LINE_BREAKS):
                raise InputError(f"item {key!r}: caption {caption[:60]!r} holds a line break other than \\n, "
                                 f"which the PTB tokenizer would misalign")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": p}] for k, p in predictions.items()})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        scores[f"Bleu_{n}"] = 100 * b
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor
        m = Meteor()
        try:
            scores["METEOR"] = 100 * m.compute_score(gts, res)[0]
        finally:
            _close_meteor(m)
    scores["ROUGE_L"] = 100 * Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    return scores


def coco_caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                        meteor: bool = True) -> dict[str, float]:
    """COCOEvalCap: `references` in ground-truth image order (the order sent for both sides)."""
    return corpus_scores(references, {k: predictions[k] for k in references}, meteor)


def value_caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                         meteor: bool = True) -> dict[str, float]:
    """VALUE's TVC/YC2C scorer: one item per clip; `references` in ground-truth file order, `predictions` in
    submission order, each sent in Python 2.7's dict order; non-ASCII characters become spaces."""
    return corpus_scores({k: [value_ascii(c) for c in references[k]] for k in _py27_order(list(references))},
                         {k: value_ascii(predictions[k]) for k in _py27_order(list(predictions))}, meteor)


def per_description_caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                                   meteor: bool = True) -> dict[str, float]:
    """NVlabs/DoRA's TVC/YC2C protocol: each description of each clip (ground-truth order) is an item with
    itself as the one reference and the clip's predicted caption as the prediction."""
    items = [(clip, desc) for clip, descs in references.items() for desc in descs]
    refs = {i: [desc.replace("_UNK", "_UNKNOWN")] for i, (_, desc) in enumerate(items)}
    return corpus_scores(refs, {i: predictions[clip] for i, (clip, _) in enumerate(items)}, meteor)


def _close_meteor(meteor) -> None:
    # pycocoevalcap's Meteor keeps a java subprocess; close it so that no process outlives the scoring.
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with meteor.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
