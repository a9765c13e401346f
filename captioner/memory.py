"""Hand freed heap memory back to the OS during long CPU training runs.

Every training batch has its own caption lengths, so the tensors freed after a step rarely fit the next
step's requests exactly; glibc keeps the freed pieces, and a Flickr8k epoch of the recipe's model grew
the process from 1.2 to over 1.8 GB (eval/RESULTS.md, Speed, row 5). `malloc_trim` returns those free
pages; every TRIM_EVERY steps it costs little, where a lower mmap threshold made training 2x slower.
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


def trim_due(step: int) -> bool:
    return TRIM_EVERY > 0 and step % TRIM_EVERY == 0


def trim_heap() -> bool:
    """Release free heap pages (glibc only; elsewhere a no-op). True when it ran."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
