"""Spread over seeds: every checkpoint alone, and every pair of them as an ensemble (the recipe ships a
pair), scored on dev with the shipped decoding (captioner/defaults.py) unless told otherwise; prints one markdown table with the mean and standard deviation.

    python eval/seeds.py runs/flickr8k/scst-s0 runs/flickr8k/scst-s1 runs/flickr8k/scst-s2
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

from captioner.defaults import BEAM_SIZE, LENGTH_PENALTY, RERANK
from captioner.encoders import VIEWS
from captioner.errors import CaptionerError
from captioner.evaluate import METRIC_ORDER, evaluate
from captioner.inference import save_ensemble


def _row(name: str, m: dict) -> str:
    return f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in METRIC_ORDER) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="run folders or .safetensors files, one per seed")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--split", default="dev")
    p.add_argument("--beam-size", type=int, default=BEAM_SIZE)
    p.add_argument("--length-penalty", type=float, default=LENGTH_PENALTY)
    p.add_argument("--rerank", type=int, default=RERANK)
    p.add_argument("--views", type=int, choices=VIEWS, default=1, help="views averaged per image (as captioner evaluate)")
    p.add_argument("--no-pairs", action="store_true", help="score the checkpoints alone only")
    args = p.parse_args()
    score = lambda model: evaluate(model, args.data, args.split, args.beam_size, length_penalty=args.length_penalty,
                                   progress=False, views=args.views, rerank=args.rerank)["metrics"]
    names = [Path(c).stem if Path(c).is_file() else Path(c).name for c in args.checkpoints]
    lines = ["| model | " + " | ".join(METRIC_ORDER) + " |", "| --- " * (1 + len(METRIC_ORDER)) + "|"]
    groups: dict[str, list[dict]] = {"single": [], "pair": []}
    for name, ckpt in zip(names, args.checkpoints):
        m = score(ckpt)
        groups["single"].append(m)
        lines.append(_row(name, m))
        print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for (na, a), (nb, b) in itertools.combinations(zip(names, args.checkpoints), 2):
            if args.no_pairs:
                break
            path = Path(tmp) / f"{na}+{nb}.safetensors"
            try:
                save_ensemble(path, [a, b], storage="float16")
            except CaptionerError as e:  # e.g. members attending to different grids
                print(f"no ensembles: {e}", flush=True)
                break
            m = score(path)
            groups["pair"].append(m)
            lines.append(_row(f"ensemble {na} + {nb}", m))
            print(lines[-1], flush=True)
    for kind, ms in groups.items():
        if len(ms) > 1:
            cells = [f"{statistics.mean(x[k] for x in ms):.2f} ± {statistics.stdev(x[k] for x in ms):.2f}"
                     for k in METRIC_ORDER]
            lines.append(f"| **{kind}: mean ± sd over {len(ms)}** | " + " | ".join(cells) + " |")
    print(f"\n{args.split} split, beam {args.beam_size}, reranked {args.rerank}, length penalty {args.length_penalty}, "
          f"{args.views} view(s):\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
