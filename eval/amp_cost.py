#!/usr/bin/env python
"""What bfloat16 autocast (`--amp`) costs a training step on this CPU, against float32 in the same process.

`--amp` lowers the recipe's matrix products to bfloat16, which halved its epochs on the CPUs it was tuned on
(AVX512-BF16). A CPU without bfloat16 arithmetic (AVX2 only) emulates it; this times what that would cost,
which is why `autocast` now trains such a CPU in float32. The step is the recipe's decoder
(train/flickr8k.json: 1024-unit LSTM, attention over 3x3 regions) on random features and captions of
Flickr8k's lengths, batch 64, one thread (the recipe runs one process per seed).

    python eval/amp_cost.py [--steps 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captioner.distributed import bfloat16_is_native  # noqa: E402
from captioner.encoders import POOLS, attended_regions  # noqa: E402
from captioner.model import DecoderConfig, ShowAndTell  # noqa: E402
from captioner.train import _pad, optimizer_step  # noqa: E402

RECIPE = json.loads((ROOT / "train" / "flickr8k.json").read_text())
VOCAB = 2541  # the bundled model's vocabulary (Flickr8k train at min count 5)


def step_ms(dtype: torch.dtype | None, steps: int) -> float:
    """Median milliseconds of a training step; dtype None is float32, else autocast to it."""
    torch.manual_seed(0)
    rng = random.Random(0)
    pool = RECIPE["pool"]
    model = ShowAndTell(DecoderConfig(VOCAB, 1280 * POOLS[pool], RECIPE["embed_dim"], RECIPE["hidden_dim"],
                                      RECIPE["num_layers"], RECIPE["dropout"], attended_regions(pool),
                                      att_dropout=RECIPE["att_dropout"])).train()
    params = list(model.parameters())
    optim = torch.optim.AdamW(params, lr=RECIPE["lr"])
    times = []
    for i in range(steps + 1):  # the first is a warm-up
        caps, lens = _pad([[1] + [rng.randrange(4, VOCAB) for _ in range(rng.randint(8, 18))] + [2] for _ in range(64)])
        f = torch.randn(64, 1280 * POOLS[pool])
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model.loss(f, caps, lens)
        optimizer_step(loss, optim, params, None, RECIPE["grad_clip"])
        if i:
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def matmul_gflops(dtype: torch.dtype) -> float:
    a = torch.randn(1024, 1024).to(dtype)
    a @ a
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 1.0:
        a @ a
        n += 1
    return n * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind (median)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}; torch {torch.__version__}; {args.threads} thread(s); "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; bfloat16 native: {bfloat16_is_native()}")
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"1024x1024 matrix product: float32 {fp32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s "
          f"(bfloat16 {fp32 / bf16:.2f}x the time)")
    base = step_ms(None, args.steps)
    print(f"training step, float32: {base:.0f} ms", flush=True)
    try:
        amp = step_ms(torch.bfloat16, args.steps)
        print(f"training step, bfloat16 autocast: {amp:.0f} ms ({amp / base:.2f}x float32)")
    except RuntimeError as e:  # oneDNN may refuse a bfloat16 LSTM outright on such a CPU
        print(f"training step, bfloat16 autocast: failed ({str(e).splitlines()[0][:120]})")


if __name__ == "__main__":
    main()
