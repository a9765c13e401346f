"""Cost of consensus reranking (captioner/consensus.py) and trigram blocking: the shipped decoding (beam 10,
the caption picked among its 3 best by agreement with all 10, no repeated trigram; since session 32 a longer
length penalty and agreement partly by METEOR's F-mean) against the same before session 32, without blocking
(sessions 20-24) and plain beam 3, the decoding before all of them.

1. one image, the CLI's and demo's path (`caption_full`: encode + decode), median of 20 warm runs, one thread
2. batched decoding of Flickr8k dev features, 100 images a call (as `captioner evaluate`), and the share
   of that time the reranking itself takes

    python eval/rerank_cost.py [--model CKPT] [--image JPG] [--images N]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench import PHOTO, ROOT, median_ms  # eval/bench.py, beside this script
from captioner import consensus
from captioner.data import load_dataset
from captioner.decoding import beam_search
from captioner.defaults import LENGTH_PENALTY, RERANK_FMEAN
from captioner.evaluate import view_features
from captioner.inference import Captioner

OLD = dict(length_penalty=0.5, rerank_fmean=0.0)  # the decoding shipped before session 32
SETTINGS = {"beam 3, no reranking (before session 20)": dict(beam_size=3, rerank=0, block_trigrams=False, **OLD),
            "beam 10, reranked among its 3 best (sessions 20-24)": dict(beam_size=10, rerank=3, block_trigrams=False,
                                                                          **OLD),
            "the same with trigram blocking (sessions 25-31)": dict(beam_size=10, rerank=3, block_trigrams=True, **OLD),
            f"length penalty {LENGTH_PENALTY}, F-mean share {RERANK_FMEAN} (shipped since session 32)":
                dict(beam_size=10, rerank=3, block_trigrams=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--image", default=str(PHOTO), help="image (default: the first of ../shared/data/photos)")
    p.add_argument("--images", type=int, default=500, help="Flickr8k dev images decoded in section 2")
    args = p.parse_args()
    torch.set_num_threads(1)
    cap = Captioner.load(args.model)
    print(f"{cap.precision} decoder weights, one thread")

    print("\n1. one image, encode + decode (median of 20 warm runs)")
    base = None
    for name, kw in SETTINGS.items():
        ms = median_ms(lambda: cap.caption_full([args.image], **kw), 20)
        base = base or ms
        print(f"   {name}: {ms:.1f} ms ({ms / base:.2f}x): \"{cap.caption_full([args.image], **kw)[0].text}\"")

    print(f"\n2. batched decoding, {args.images} Flickr8k dev images, 100 a call")
    recs = load_dataset(ROOT.parent / "shared" / "data" / "flickr8k", split="dev").records[:args.images]
    feats, _, _ = view_features(cap, [r.image for r in recs], progress=False)
    base = None
    for name, kw in SETTINGS.items():
        cap.decode(feats[:100], **kw)  # warm-up
        t = time.perf_counter()
        for i in range(0, len(feats), 100):
            cap.decode(feats[i:i + 100], **kw)
        s = time.perf_counter() - t
        base = base or s
        print(f"   {name}: {s:.2f} s, {len(feats) / s:.0f} captions/s ({s / base:.2f}x)")
    lists = [[h.tokens for h in hs] for i in range(0, len(feats), 100)
             for hs in beam_search(cap.decoder, feats[i:i + 100], cap.vocab, 10, 20, LENGTH_PENALTY, 10, suppress_unk=True,
                                 block_trigrams=True)]
    t = time.perf_counter()
    for caps in lists:
        consensus.rerank(caps, 3, len(caps), RERANK_FMEAN)
    r = time.perf_counter() - t
    print(f"   the reranking alone (F-mean share {RERANK_FMEAN}): {r:.3f} s, {r / len(lists) * 1e3:.2f} ms an image")


if __name__ == "__main__":
    main()
