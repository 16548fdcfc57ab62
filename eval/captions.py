"""Captioning metrics through pycocoevalcap, as the COCO caption and VALUE (TVC, YC2C) scorers compute them.

Captions are tokenised with pycocoevalcap's PTBTokenizer (Stanford CoreNLP, needs java; lowercases and drops
punctuation), then scored with BLEU-1..4, METEOR (java), ROUGE-L and CIDEr. pycocoevalcap's `Cider` is
CIDEr-D (clipped n-gram counts, Gaussian length penalty, x10). Scores are returned x100 as in the paper's
tables. SPICE is left out: it downloads CoreNLP models on first use.
"""
from __future__ import annotations

import shutil
from typing import Mapping, Sequence

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def _ascii(text: str) -> str:
    # The VALUE scorer removes non-ASCII characters before tokenising; the PTB tokenizer chokes on some.
    return text.encode("ascii", "ignore").decode("ascii")


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   meteor: bool = True) -> dict[str, float]:
    """Corpus-level caption metrics (x100) of one predicted caption per id against its reference captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise RuntimeError("caption scoring needs java (pycocoevalcap's PTB tokenizer and METEOR run on it)")
    ids = sorted(references)
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} ids, e.g. {missing[:3]}")
    empty_refs = [i for i in ids if not references[i]]
    if empty_refs:
        raise ValueError(f"ids without reference captions: {empty_refs[:3]}")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": _ascii(c)} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": _ascii(predictions[i])}] for i in ids})
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


def _close_meteor(meteor) -> None:
    # pycocoevalcap's Meteor keeps a java subprocess; close it so that no process outlives the scoring.
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with meteor.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
