"""Caption metrics on the same tokenisation as training.

BLEU-1..4 come from NLTK's corpus_bleu (always available). METEOR, ROUGE-L and CIDEr come from the COCO
caption toolkit (pycocoevalcap, needs Java for METEOR) when installed. All scores are on the 0-100 scale.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from typing import Sequence

from .errors import CaptionerError
from .vocab import degenerate, repeated_word, tokenize


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (0-100), NLTK with no smoothing, as in the COCO toolkit's closest-length brevity."""
    from nltk.translate.bleu_score import corpus_bleu
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    with warnings.catch_warnings():  # NLTK warns, at length, that no n-gram matched: a score of 0 says so
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(refs, hyps, weights=weights)
    return {f"BLEU-{n}": 100.0 * float(s) for n, s in enumerate(scores, 1)}


def _toolkit_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                    empty: str = "<empty>") -> tuple[dict, dict]:
    """pycocoevalcap's {id: [sentence]} dicts on our tokenisation; `empty` stands in for an empty caption
    (METEOR's Java process cannot take an empty line)."""
    res = {i: [" ".join(tokenize(h)) or empty] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(references)}
    return res, gts


def sentence_bleu4(hypothesis: str, references: Sequence[str]) -> float:
    """Per-image BLEU-4 (0-100, smoothed so short captions still rank) for the report's ordering."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    return 100.0 * sentence_bleu([tokenize(r) for r in references], tokenize(hypothesis),
                                 smoothing_function=SmoothingFunction().method1)


def coco_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                 per_image: bool = False) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """METEOR, ROUGE-L and CIDEr (0-100) from pycocoevalcap, on our tokenisation.

    Returns (scores, per-image scores, notes); a metric whose requirement is missing (the `coco` extra,
    or Java for METEOR) is left out with a one-line note instead of failing the evaluation.
    """
    try:
        from pycocoevalcap.cider.cider import Cider  # noqa: F401
        from pycocoevalcap.rouge.rouge import Rouge  # noqa: F401
    except ImportError:
        return {}, {}, ["METEOR, ROUGE-L and CIDEr need the coco extra: pip install \"captioner[coco]\""]
    res, gts = _toolkit_inputs(hypotheses, references)
    return _toolkit_scores(gts, res, per_image)


def _toolkit_scores(gts: dict, res: dict, per_image: bool = False
                    ) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """METEOR, ROUGE-L and CIDEr of already tokenised {id: [sentence]} dicts, with notes for what failed."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    scores: dict[str, float] = {}
    each: dict[str, list[float]] = {}
    notes: list[str] = []
    scorers = [("ROUGE-L", Rouge), ("CIDEr", Cider)]
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor
        scorers.insert(0, ("METEOR", Meteor))
    else:
        notes.append("METEOR skipped: it needs Java (java not found on PATH)")
    for name, cls in scorers:
        try:
            scorer = cls()
            total, per = scorer.compute_score(gts, res)
            if name == "METEOR":  # close the Java process now rather than at interpreter exit
                _close_meteor(scorer)
        except Exception as e:  # a broken Java install must not lose the other metrics
            notes.append(f"{name} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        scores[name] = 100.0 * float(total)
        if per_image:
            each[name] = [100.0 * float(x) for x in per]
    return scores, each, notes


def _close_meteor(scorer) -> None:
    try:
        with scorer.lock:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    except Exception:
        pass


def _toolkit_bleu(gts: dict, res: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    with contextlib.redirect_stdout(io.StringIO()):  # the scorer prints its ratios
        total, _ = Bleu(4).compute_score(gts, res)
    return {f"BLEU-{n}": 100.0 * float(s) for n, s in enumerate(total, 1)}


def coco_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 (0-100) by the COCO toolkit's own scorer, used by the tests to check `bleu` agrees."""
    res, gts = _toolkit_inputs(hypotheses, references, empty="")
    return _toolkit_bleu(gts, res)


def toolkit_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (0-100) the COCO toolkit's own way, its PTB tokenizer (Java) on the
    raw captions instead of `tokenize`: what published figures were scored with, to check ours against."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in rs] for i, rs in enumerate(references)})
    res = tok.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    scores, _, notes = _toolkit_scores(gts, res)
    if notes:
        raise CaptionerError(f"the COCO toolkit's pipeline failed: {'; '.join(notes)}")
    return {**_toolkit_bleu(gts, res), **scores}


def all_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                per_image: bool = False) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """BLEU-1..4 always, plus METEOR / ROUGE-L / CIDEr where available; all 0-100."""
    scores = bleu(hypotheses, references)
    extra, each, notes = coco_metrics(hypotheses, references, per_image)
    scores.update(extra)
    if per_image:
        each["BLEU-4"] = [sentence_bleu4(h, rs) for h, rs in zip(hypotheses, references)]
    return scores, each, notes


def repetition(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """How often captions repeat a content word (vocab.FUNCTION_WORDS names what is not one; a plural and its
    singular are one word), in percent, for the model's captions and for the human references of the same
    images, and how many of the model's captions are degenerate ("X on a X", "eating eating"): people do the
    first now and then, never the second."""
    toks = [tokenize(h) for h in hypotheses]
    refs = [tokenize(r) for rs in references for r in rs]
    share = lambda caps: 100.0 * sum(repeated_word(c) is not None for c in caps) / max(len(caps), 1)  # noqa: E731
    return {"repeats": round(share(toks), 2), "reference_repeats": round(share(refs), 2),
            "degenerate": sum(degenerate(c) for c in toks)}
