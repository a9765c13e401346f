"""Cost of one cross-entropy training step with `--att-feed` (the LSTM unrolled word by word so that what
attention read can be its next input) against the bundled recipe's decoder (one nn.LSTM call over the whole
sentence), timed in the same process: the recipe's sizes (1024 units, a 3x3 grid, batch 64, bf16 autocast),
one thread as each of the recipe's side-by-side runs has, random features and captions of Flickr8k's lengths.

    python eval/feed_cost.py [--reps 15] [--vocab 2600]
"""
from __future__ import annotations

import torch

from bench import median_ms, step_cost_args  # eval/bench.py, beside this script
from captioner.model import DecoderConfig, ShowAndTell


def main() -> None:
    args = step_cost_args(__doc__, reps=15)
    B = 64
    feats = torch.randn(B, 1280 * 10)
    lens = torch.randint(9, 18, (B,))  # <start> + words + <end>: Flickr8k's captions are 7-16 words mostly
    caps = torch.randint(4, args.vocab, (B, int(lens.max())))
    models = {feed: ShowAndTell(DecoderConfig(args.vocab, 12800, 512, 1024, 1, 0.3, regions=9, att_feed=feed)).train()
              for feed in (False, True)}
    optims = {feed: torch.optim.AdamW(m.parameters(), 1e-3) for feed, m in models.items()}

    def step(feed: bool) -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = models[feed].loss(feats, caps, lens)
        optims[feed].zero_grad()
        loss.backward()
        optims[feed].step()

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):  # two alternating rounds: the first model timed in a process can run slow
        for feed in (False, True):
            times[feed].append(median_ms(lambda: step(feed), args.reps))
    base, fed = min(times[False]), min(times[True])
    print(f"one training step, batch {B}, 1024 units, one thread (best of two rounds' medians):")
    print(f"  output attention only (the bundled recipe): {base:7.1f} ms")
    print(f"  --att-feed, unrolled:                       {fed:7.1f} ms  ({fed / base:.2f}x)")


if __name__ == "__main__":
    main()
