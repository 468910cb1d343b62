"""The CPU memory cache behind large results (``condense`` outputs of 4 MiB and more).

Large CPU results live on 2 MiB pages that are faulted in (and zeroed by the kernel)
when first mapped, which costs about as much as the condensation itself. A result's
buffer is therefore kept when its last tensor is freed and handed to the next result it
fits, like glibc's heap or torch's CUDA caching allocator. The cache holds at most
:func:`cache_limit` bytes (default 256 MiB, at most 4 buffers), oldest evicted first.

Example::

    c = kcd_fast.condense(values, n_keep)   # maps and faults a fresh buffer
    del c                                   # the buffer goes to the cache
    c = kcd_fast.condense(values, n_keep)   # reuses it: no page faults
    kcd_fast.memory.empty_cache()           # returns its bytes to the OS
"""

from __future__ import annotations

import numpy as np

from ._ext import _cpu


def cached_bytes() -> int:
    """Bytes of released result buffers the cache holds now."""
    return int(_cpu.cached_pages_bytes())


def empty_cache() -> int:
    """Unmap every cached buffer (tensors still alive keep theirs); returns the bytes released."""
    return int(_cpu.empty_pages_cache())


def cache_limit() -> int:
    """The cache's byte limit."""
    return int(_cpu.pages_cache_limit())


def set_cache_limit(nbytes: int) -> int:
    """Hold at most ``nbytes`` of released buffers (0 disables the cache); returns the old limit.

    Buffers over the new limit are unmapped at once, oldest first.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return int(_cpu.set_pages_cache_limit(int(nbytes)))
