"""Hand freed heap memory back to the OS during long CPU training runs.

Every training batch has its own caption lengths, so the tensors freed after a step rarely fit the next
step's requests exactly; glibc keeps the freed pieces, and a Flickr8k epoch of the recipe's model grew
the process from 1.2 to over 1.8 GB (eval/RESULTS.md, Speed, row 5). `malloc_trim` returns those free
pages; every TRIM_EVERY steps it costs little, where a lower mmap threshold made training 2x slower.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

TRIM_EVERY = 10  # steps


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


def trim_heap() -> bool:
    """Release free heap pages (glibc only; elsewhere a no-op). True when it ran."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
