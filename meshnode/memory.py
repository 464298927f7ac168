"""The process's memory hygiene: collector tuning and handing freed memory back to the OS.

Two callers: `meshnode.cli.main` tunes the collector and the allocator once at start
(`tune_for_serving`), and `meshnode.rpc.guard` calls `release_memory` after refusing a large
message. The allocator calls are glibc's (`mallopt`, `malloc_trim`); elsewhere (musl, macOS)
they are skipped and only the collector is tuned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

# glibc's mallopt parameter; from <malloc.h>.
_M_MMAP_THRESHOLD = -3
# Blocks from this size up get their own mapping, returned to the OS when freed. glibc's
# default threshold starts at 128 KiB and rises to the largest block freed so far, after
# which a burst of 15 MB messages stays in the heap for good (RSS at its high-water mark).
MMAP_THRESHOLD_BYTES = 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def tune_for_serving() -> None:
    """Move everything built at start-up out of the collector's sight and collect young
    objects less often. Requests allocate many short-lived objects; with the default threshold
    (700) the cyclic collector ran every few requests and showed up as ~10% of the node's CPU.
    Reference counting still frees almost everything at once; cycles are still collected, and
    `release_memory` collects at once where a large block may hang in a cycle. Large blocks are
    mapped on their own so that freeing them returns them to the OS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Collect cycles now and return the heap's free pages to the OS."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
