"""Caption metrics on the same tokenisation as training.

BLEU-1..4 come from NLTK's corpus_bleu (always available). METEOR, ROUGE-L and CIDEr come from the COCO
caption toolkit (pycocoevalcap, needs Java for METEOR) when installed. All scores are on the 0-100 scale.
"""
from __future__ import annotations

import shutil
from typing import Sequence

from .vocab import tokenize


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (0-100), NLTK with no smoothing, as in the COCO toolkit's closest-length brevity."""
    from nltk.translate.bleu_score import corpus_bleu
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    scores = corpus_bleu(refs, hyps, weights=weights)
    return {f"BLEU-{n}": 100.0 * float(s) for n, s in enumerate(scores, 1)}
