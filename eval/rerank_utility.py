"""Other agreement measures for consensus reranking (captioner/consensus.py), on one model's beam-10 n-best
lists: BLEU+1 alone, METEOR's unigram F-mean alone (recall weighted 9:1, no stems, synonyms or fragmentation
penalty), the two mixed (W, the F-mean's share: `--rerank-fmean`; 1/2 shipped since session 32), and BLEU+1 with
voters weighted by their length-normalised beam score (softmax) instead of equally. Each scored with BLEU-1..4,
METEOR, ROUGE-L, CIDEr.

    python eval/rerank_utility.py [--model CKPT] [--data D --split S] [--length-penalty A] [--views N]

Decoding is otherwise as shipped (beam 10, no repeated trigram). Session 24 measured it on the bundled pair,
the second pair and 159 COCO images before trigram blocking (eval/RESULTS.md, "Consensus reranking", "The
bundled pair (session 24)"); session 32 on the Lite0 + Lite2 pair with blocking.
"""
from __future__ import annotations

import argparse

import numpy as np

from captioner.consensus import _bleu1, _ngrams, rerank
from captioner.data import load_dataset
from captioner.decoding import beam_search
from captioner.defaults import BEAM_SIZE, BLOCK_TRIGRAMS, LENGTH_PENALTY, RERANK
from captioner.evaluate import METRIC_ORDER, view_features
from captioner.inference import Captioner
from captioner.metrics import all_metrics


def pick_weighted(hs, candidates: int) -> list[int]:
    """BLEU+1 agreement with each voter weighted by its beam score (softmax), not equally."""
    toks = [h.tokens for h in hs]
    E, H = len(toks), min(candidates, len(toks))
    w = np.exp(np.array([h.score for h in hs]) - max(h.score for h in hs))
    grams = [_ngrams(t) for t in toks]
    scores = [sum(w[j] * _bleu1(grams[i], len(toks[i]), grams[j], len(toks[j])) for j in range(E) if j != i)
              / (w.sum() - w[i]) for i in range(H)]
    return toks[int(np.argmax(scores))]  # a tie keeps the beam's order


# name, the F-mean's share W (None: BLEU+1 with weighted voters)
VARIANTS = [("BLEU+1 (W = 0)", 0.0), ("F-mean (W = 1)", 1.0), ("BLEU+1 + F-mean (W = 1/2, shipped)", 0.5),
            ("BLEU+1 + 2 F-mean (W = 2/3)", 2 / 3), ("BLEU+1, voters weighted by score", None)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--split", default="dev")
    p.add_argument("--length-penalty", type=float, default=LENGTH_PENALTY)
    p.add_argument("--views", type=int, default=1, choices=(1, 2, 6))
    p.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/captioner/features)")
    args = p.parse_args()
    cap = Captioner.load(args.model)
    recs = load_dataset(args.data, split=args.split).records
    feats, mask, _ = view_features(cap, [r.image for r in recs], args.views, args.cache_dir, progress=False)
    refs = [r.captions for r, ok in zip(recs, mask) if ok]
    nbest = [hs for i in range(0, len(feats), 100) for hs in beam_search(
        cap.decoder, feats[i:i + 100], cap.vocab, BEAM_SIZE, 20, args.length_penalty, BEAM_SIZE, suppress_unk=True,
        block_trigrams=BLOCK_TRIGRAMS)]
    print(f"model {args.model or 'bundled'}, {cap.precision} decoder weights, beam {BEAM_SIZE}, its {RERANK} best "
          f"compete, all {BEAM_SIZE} vote; length penalty {args.length_penalty}, {args.views} view(s), "
          f"trigram blocking {BLOCK_TRIGRAMS}; {len(refs)} {args.split} images\n")
    print("| agreement | " + " | ".join(METRIC_ORDER) + " | words a caption |")
    print("| --- " * (2 + len(METRIC_ORDER)) + "|")
    for name, share in VARIANTS:
        picks = [cap.vocab.decode(pick_weighted(hs, RERANK) if share is None else
                                  hs[rerank([h.tokens for h in hs], RERANK, len(hs), share)[0]].tokens) for hs in nbest]
        m, _, _ = all_metrics(picks, refs)
        print(f"| {name} | " + " | ".join(f"{m[x]:.2f}" for x in METRIC_ORDER if x in m)
              + f" | {np.mean([len(c.split()) for c in picks]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
