"""``heap.trim``: the C heap's free pages go back to the kernel (glibc; this machine's libc)."""

from __future__ import annotations

from pathlib import Path

from watcher.live import heap


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_trim_returns_freed_heap_pages_to_the_kernel() -> None:
    """64 MiB of malloc-sized blocks freed below one that stays (so free() cannot shrink the
    heap's top by itself): RSS stays up until ``trim`` hands the pages back."""
    blocks = [bytes(1024) for _ in range(65536)]  # over pymalloc's 512 B: glibc's heap
    pin = bytes(1024)
    del blocks
    before = _rss_kib()
    assert heap.trim()
    assert before - _rss_kib() > 32 * 1024, "less than half of the 64 MiB came back"
    del pin
