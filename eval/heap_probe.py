#!/usr/bin/env python
"""Where a CPU training run's memory goes: RSS and glibc's heap statistics every N steps.

    OMP_NUM_THREADS=1 python eval/heap_probe.py train --config train/flickr8k.json --epochs 1 \\
        --dev-images 100 --out /tmp/probe --overwrite --quiet --stop-after-steps 200

Runs `captioner ARGS` in this process and prints, every --every optimiser steps, the resident set size
and `mallinfo2`'s heap in use and heap free (glibc 2.33+). Memory in use that keeps rising is live
(caches); free heap that keeps rising is fragmentation, which `malloc_trim` returns. Compare with
CAPTIONER_TRIM_EVERY=0 or ONEDNN_PRIMITIVE_CACHE_CAPACITY=N in the environment (captioner/memory.py).
"""
from __future__ import annotations

import ctypes
import os
import resource
import sys

import torch

from captioner.cli import main


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _report(label: str) -> None:
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    m = _LIBC.mallinfo2()
    print(f"{label}: RSS {rss:.2f} GB (max {peak:.2f}), heap in use {m.uordblks / 1e9:.2f} GB, "
          f"heap free {m.fordblks / 1e9:.2f} GB", flush=True)


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2
EVERY = 50


def _probe_steps() -> None:
    step, n = torch.optim.AdamW.step, [0]

    def probed(self, *a, **k):
        out = step(self, *a, **k)
        n[0] += 1
        if n[0] % EVERY == 0:
            _report(f"step {n[0]}")
        return out
    torch.optim.AdamW.step = probed


if __name__ == "__main__":
    if sys.argv[1:2] == ["--every"]:
        EVERY = int(sys.argv[2])
        del sys.argv[1:3]
    _probe_steps()
    sys.argv = ["captioner", *sys.argv[1:]]
    try:
        main()
    except SystemExit:
        pass
    _report("end")
