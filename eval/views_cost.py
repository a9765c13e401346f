"""Cost of test-time views: one image captioned with `--views 1, 2, 6` (median of 20 warm runs, one thread).

The views' features are averaged (captioner.encoders.test_views); the encoder runs once per view, the
decoder once. Baseline: one view, as the demo decodes.

    python eval/views_cost.py [--model CKPT] [--image JPG] [--precision float32|bfloat16|int8]
"""
from __future__ import annotations

import argparse

import torch

from bench import PHOTO, median_ms  # eval/bench.py, beside this script
from captioner.defaults import PRECISION, PRECISIONS
from captioner.inference import Captioner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--image", default=str(PHOTO), help="image (default: the first of ../shared/data/photos)")
    p.add_argument("--precision", choices=PRECISIONS, default=PRECISION, help="decoder weights (as captioner caption)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cap = Captioner.load(args.model, precision=args.precision)
    base = None
    for views in (1, 2, 6):
        ms = median_ms(lambda: cap.caption_full([args.image], views=views), 20)
        base = base or ms
        text = cap.caption_full([args.image], views=views)[0].text
        print(f"views {views}: {ms:.1f} ms ({ms / base:.2f}x one view), {cap.precision} decoder weights: \"{text}\"")


if __name__ == "__main__":
    main()
