"""Consensus reranking's settings on Flickr8k dev: beam width K, the H best that compete, the E best that
vote (captioner/consensus.py), each scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr, beside plain beam
search in the same run. The shipped decoding is K = E = 10, H = 3 (captioner/defaults.py).

    python eval/rerank_grid.py [--model CKPT] [--views 6]

Each beam is decoded once with its whole n-best list; the picks are made from those lists.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from captioner.consensus import agreement
from captioner.data import load_dataset
from captioner.defaults import LENGTH_PENALTY
from captioner.encoders import VIEWS, average_views, test_views
from captioner.evaluate import METRIC_ORDER
from captioner.features import model_features
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
    args = p.parse_args()
    cap = Captioner.load(args.model)
    recs = load_dataset(args.data, split="dev").records
    pres = test_views(cap.encoder.preprocess, args.views)
    sets = [model_features(cap.encoder, [r.image for r in recs], None, progress=False, preprocess=pre) for pre in pres]
    feats = average_views([torch.from_numpy(np.asarray(s.features, dtype=np.float32)) for s in sets],
                          cap.encoder.pool, pres)
    refs = [r.captions for r in recs]
    print(f"model {args.model or 'bundled'}, {args.views} view(s), {cap.precision} decoder weights, "
          f"length penalty {LENGTH_PENALTY}, {len(recs)} dev images\n")
    print("| beam K | competing H | voting E | " + " | ".join(METRIC_ORDER) + " | words a caption |")
    print("| --- " * (4 + len(METRIC_ORDER)) + "|")
    lists: dict[int, list] = {}
    for k, h, e in GRID:
        if k not in lists:
            t = time.time()
            lists[k] = [c.alternatives for i in range(0, len(feats), 100)
                        for c in cap.decode(feats[i:i + 100], beam_size=k, n_best=k, rerank=0)]
            ids = [[cap.vocab.encode(text)[1:-1] for text, _ in alts] for alts in lists[k]]
            lists[k] = (lists[k], ids, time.time() - t)
        alts, ids, _ = lists[k]
        picks = []
        for a, caps in zip(alts, ids):
            score = agreement(caps, h, e) if h > 1 else [0.0]
            picks.append(a[int(np.argmax(score))][0])  # argmax keeps the first of a tie: the beam's order
        m, _, _ = all_metrics(picks, refs)
        words = np.mean([len(c.split()) for c in picks])
        print(f"| {k} | {h} | {e} | " + " | ".join(f"{m[x]:.2f}" for x in METRIC_ORDER if x in m)
              + f" | {words:.2f} |", flush=True)


if __name__ == "__main__":
    main()
