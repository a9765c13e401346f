"""Consensus reranking's settings on Flickr8k dev: beam width K, the H best that compete, the E best that
vote (captioner/consensus.py), each scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr, beside plain beam
search in the same run. The shipped decoding is K = E = 10, H = 3, with trigram blocking (captioner/defaults.py).

    python eval/rerank_grid.py [--model CKPT] [--views 6] [--no-block-trigrams]

Each beam is decoded once with its whole n-best list; the picks are made from those lists.
"""
from __future__ import annotations

import argparse

import numpy as np

from captioner.consensus import agreement
from captioner.data import load_dataset
from captioner.decoding import beam_search
from captioner.defaults import BLOCK_TRIGRAMS, LENGTH_PENALTY
from captioner.encoders import VIEWS
from captioner.evaluate import METRIC_ORDER, view_features
from captioner.inference import Captioner
from captioner.metrics import all_metrics

# (beam K, competing H, voting E); H = 1 is the beam's own best
GRID = [(3, 1, 3), (10, 1, 10), (10, 3, 10), (10, 5, 10), (10, 10, 10),
        (20, 1, 20), (20, 3, 10), (20, 3, 20), (20, 5, 20), (20, 20, 20)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--views", type=int, choices=VIEWS, default=1)
    p.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=BLOCK_TRIGRAMS,
                   help="beam search never repeats a word trigram (default: as shipped)")
    args = p.parse_args()
    cap = Captioner.load(args.model)
    recs = load_dataset(args.data, split="dev").records
    feats, mask, _ = view_features(cap, [r.image for r in recs], args.views, progress=False)
    recs = [r for r, ok in zip(recs, mask) if ok]
    refs = [r.captions for r in recs]
    print(f"model {args.model or 'bundled'}, {args.views} view(s), {cap.precision} decoder weights, "
          f"length penalty {LENGTH_PENALTY}, trigram blocking {'on' if args.block_trigrams else 'off'}, "
          f"{len(recs)} dev images\n")
    print("| beam K | competing H | voting E | " + " | ".join(METRIC_ORDER) + " | words a caption |")
    print("| --- " * (4 + len(METRIC_ORDER)) + "|")
    nbest: dict[int, list] = {}  # beam K's whole n-best lists, as Captioner.decode gets them
    for k, h, e in GRID:
        if k not in nbest:
            nbest[k] = [hs for i in range(0, len(feats), 100)
                        for hs in beam_search(cap.decoder, feats[i:i + 100], cap.vocab, k, 20, LENGTH_PENALTY, k,
                                              suppress_unk=True, block_trigrams=args.block_trigrams)]
        picks = []
        for hs in nbest[k]:
            score = agreement([x.tokens for x in hs], h, e) if h > 1 else [0.0]
            picks.append(cap.vocab.decode(hs[int(np.argmax(score))].tokens))  # a tie keeps the beam's order
        m, _, _ = all_metrics(picks, refs)
        words = np.mean([len(c.split()) for c in picks])
        print(f"| {k} | {h} | {e} | " + " | ".join(f"{m[x]:.2f}" for x in METRIC_ORDER if x in m)
              + f" | {words:.2f} |", flush=True)


if __name__ == "__main__":
    main()
