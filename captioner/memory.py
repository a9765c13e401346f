"""Keep long CPU training runs from growing: freed heap handed back, oneDNN's kernel cache kept small.

Every training batch has its own caption lengths, so (1) the tensors freed after a step rarely fit the
next step's requests exactly, and glibc keeps the freed pieces, and (2) oneDNN plans and keeps a new bf16
kernel for every new shape (up to 1024 of them). `malloc_trim` every TRIM_EVERY steps returns the free
pages, and a 16-kernel cache stops the growth, at little cost in time (eval/RESULTS.md, "Speed").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys


def _trim_every() -> int:
    try:  # CAPTIONER_TRIM_EVERY=0 turns trimming off (eval/bench.py's baseline for row 5)
        return max(0, int(os.environ.get("CAPTIONER_TRIM_EVERY", "10")))
    except ValueError:
        return 10


TRIM_EVERY = _trim_every()  # steps


def _libc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _libc_trim()


ONEDNN_CACHE_CAPACITY = "16"


def limit_onednn_cache() -> None:
    """Cap oneDNN's kernel cache for this process, unless the environment sets it. oneDNN reads the
    variable when it makes its first kernel, so call this before any convolution or matrix product."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def trim_due(step: int, every: int | None = None) -> bool:
    every = TRIM_EVERY if every is None else every
    return every > 0 and step % every == 0


def trim_if_due(count: int, every: int | None = None) -> bool:
    """`trim_heap` on every `every`-th call count (default TRIM_EVERY steps). True when it ran."""
    return trim_due(count, every) and trim_heap()


def trim_heap() -> bool:
    """Release free heap pages (glibc only; elsewhere a no-op). True when it ran."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
