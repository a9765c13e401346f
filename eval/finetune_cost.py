#!/usr/bin/env python
"""What `--fine-tune-blocks N` costs a training step, against the frozen encoder's cached features, timed
in the same process.

Fine-tuning runs the encoder's last N stages on the cached maps below them (encoders.Trunk, computed once
per view); before, it ran the whole CNN on the images at every step. This times the recipe's step
(train/flickr8k.json: 1024-unit LSTM attending over 3x3 regions, batch 64, one thread as each of the recipe's
side-by-side runs has, float32) three ways: cached pooled features (the recipe), the last N stages on cached
maps plus the decoder, and the whole encoder in the loop plus the decoder (the old way). Random
pixels, maps and captions of Flickr8k's lengths; the image decoding the old way also paid is left out.

    python eval/finetune_cost.py [--blocks 1] [--reps 5]
"""
from __future__ import annotations

import torch

from bench import median_ms, step_cost_args  # eval/bench.py, beside this script
from captioner.encoders import Trunk, TunedTop, create_encoder
from captioner.model import DecoderConfig, ShowAndTell


def main() -> None:
    args = step_cost_args(__doc__, reps=5, extra=lambda p: p.add_argument(
        "--blocks", type=int, default=1, help="stages fine-tuned (1: Lite0's 1x1 head to 1280 channels)"))
    B = 64
    enc = create_encoder(pool="regions")
    trunk = Trunk(enc, args.blocks)
    size = enc.preprocess.size
    images = torch.randn(B, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        maps = trunk(images).half()  # as cached
        feats = enc(images).half()
    lens = torch.randint(9, 18, (B,))  # <start> + words + <end>
    caps = torch.randint(4, args.vocab, (B, int(lens.max())))
    model = ShowAndTell(DecoderConfig(args.vocab, enc.dim, 512, 1024, 1, 0.3, regions=9, att_dropout=0.5)).train()
    enc.freeze(args.blocks)
    enc.train(True)
    top = TunedTop(trunk)
    params = list(model.parameters()) + [q for q in enc.parameters() if q.requires_grad]
    optim = torch.optim.AdamW(params, 1e-3)

    def step(features) -> None:
        loss = model.loss(features(), caps, lens)
        optim.zero_grad()
        loss.backward()
        optim.step()

    ways = {"cached features (the recipe)": lambda: feats.float(),
            f"last {args.blocks} stage(s) on cached maps": lambda: top(maps.float()),
            "whole encoder on the images (the old way)": lambda: enc(images)}
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(2):  # two alternating rounds: the first way timed in a process can run slow
        for w, f in ways.items():
            times[w].append(median_ms(lambda: step(f), args.reps))
    base = min(times[next(iter(ways))])
    print(f"one training step, batch {B}, float32, one thread (best of two rounds' medians); "
          f"cached map {tuple(trunk.shape)} = {trunk.dim} values an image against {enc.dim} pooled:")
    for w in ways:
        t = min(times[w])
        print(f"  {w:44s} {t:8.1f} ms  ({t / base:.2f}x)")


if __name__ == "__main__":
    main()
