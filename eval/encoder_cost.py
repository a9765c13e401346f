"""Cost of the EfficientNet-Lite encoders on this CPU: the bare forward pass to the pooled features, each at
its own input size, as the demo runs it (batch 1, one thread) and as feature extraction does (batch 32, all
threads). Baseline: EfficientNet-Lite0, the bundled model's encoder, timed in the same process.

    python eval/encoder_cost.py [--encoders efficientnet_lite0,efficientnet_lite2] [--reps 20]
"""
from __future__ import annotations

import argparse

import torch

from bench import median_ms  # eval/bench.py, beside this script
from captioner.encoders import ENCODERS, create_encoder


def main() -> None:
    lites = [n for n in ENCODERS if n.startswith("efficientnet_lite")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default=",".join(lites), help="comma-separated; the first is the baseline")
    p.add_argument("--reps", type=int, default=20, help="timed runs per figure (batch 32: a quarter of them)")
    args = p.parse_args()
    names = args.encoders.split(",")
    unknown = [n for n in names if n not in ENCODERS]
    if unknown:
        p.error(f"unknown encoder {unknown[0]!r}; choose from {', '.join(ENCODERS)}")
    threads = torch.get_num_threads()
    encoders = {name: create_encoder(name, pool="regions") for name in names}
    settings = ((1, 1, args.reps), (32, threads, max(3, args.reps // 4)))

    def run(name: str, batch: int, n_threads: int, reps: int) -> float:
        enc = encoders[name]
        torch.set_num_threads(n_threads)
        x = torch.randn(batch, 3, enc.preprocess.size, enc.preprocess.size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ms = median_ms(lambda: enc(x), reps) / batch
        torch.set_num_threads(threads)
        return ms

    for name in names:  # an untimed pass first: the first model timed in a process ran up to 1.4x slower
        for batch, n_threads, _ in settings:
            run(name, batch, n_threads, 1)
    base: dict[int, float] = {}
    print(f"bare encoder forward to pooled features (--pool regions), median of warm runs; {threads} threads for batch 32")
    for name in names:
        row = []
        for batch, n_threads, reps in settings:
            ms = run(name, batch, n_threads, reps)
            base.setdefault(batch, ms)
            row.append(f"batch {batch}: {ms:.1f} ms/image ({ms / base[batch]:.2f}x)")
        print(f"{name} ({encoders[name].preprocess.size} px): " + "; ".join(row), flush=True)


if __name__ == "__main__":
    main()
