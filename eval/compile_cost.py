#!/usr/bin/env python
"""Does torch.compile speed up the recipe's training step on this CPU? Eager and compiled, same process.

    python eval/compile_cost.py            # ~2 minutes on 1 core (compilation included)

The recipe's decoder (1024 units, dropout 0.3) and bf16 autocast, batches of 64 captions with Flickr8k-like
lengths (8-22 tokens). `model.loss` is compiled with dynamic shapes, since every batch has its own
length; steps alternate between the two models after warm-up, and the medians are compared.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench import timed  # eval/bench.py, beside this script
from captioner.model import DecoderConfig, ShowAndTell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    vocab = 2541  # the bundled model's vocabulary

    def batch():
        lens = torch.tensor([rng.randint(8, 22) for _ in range(64)])
        return torch.randn(64, 1280), torch.randint(4, vocab, (64, int(lens.max()))), lens
    batches = [batch() for _ in range(40)]
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        m = ShowAndTell(DecoderConfig(vocab, hidden_dim=1024, dropout=0.3)).train()
        loss = torch.compile(m.loss, dynamic=True) if name == "compiled" else m.loss
        models[name] = (loss, torch.optim.AdamW(m.parameters(), 1e-3))

    def step(name: str, i: int) -> None:
        loss_fn, opt = models[name]
        f, c, l = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(f, c, l)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = time.perf_counter()
    for i in range(5):  # warm-up; the compiled model compiles here
        step("compiled", i)
        step("eager", i)
    print(f"warm-up (compilation included): {time.perf_counter() - t:.1f} s")
    times = {"eager": [], "compiled": []}
    for i in range(args.steps):
        for name in times:
            times[name] += timed(lambda: step(name, i), 1, warmup=0)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"training step, batch 64, bf16 autocast, {args.threads} thread(s): eager {e * 1e3:.0f} ms, "
          f"torch.compile {c * 1e3:.0f} ms -> {e / c:.2f}x")


if __name__ == "__main__":
    main()
