import sys

import pytest

from captioner import memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_returns_freed_memory_that_malloc_keeps():
    blocks = [bytearray(60_000) for _ in range(3000)]  # ~180 MB of heap chunks, below the mmap threshold
    del blocks[:-1]  # the last block pins the heap's top, so free() alone gives nothing back
    freed = _rss_mb()
    assert memory.trim_heap()
    assert _rss_mb() < freed - 100


def test_trim_schedule_follows_the_environment(monkeypatch):
    monkeypatch.setenv("CAPTIONER_TRIM_EVERY", "3")
    assert memory._trim_every() == 3
    monkeypatch.setenv("CAPTIONER_TRIM_EVERY", "0")
    assert memory._trim_every() == 0
    monkeypatch.setenv("CAPTIONER_TRIM_EVERY", "often")
    assert memory._trim_every() == 10
    monkeypatch.setattr(memory, "TRIM_EVERY", 0)
    assert not any(memory.trim_due(s) for s in range(1, 50))
    monkeypatch.setattr(memory, "TRIM_EVERY", 10)
    assert [s for s in range(1, 31) if memory.trim_due(s)] == [10, 20, 30]


def test_onednn_cache_cap_is_a_default_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    memory.limit_onednn_cache()
    import os
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == memory.ONEDNN_CACHE_CAPACITY
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    memory.limit_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"
