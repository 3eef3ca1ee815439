"""Keep large freed blocks inside the process (glibc malloc), so CPU work does not page-fault.

glibc serves every allocation above its mmap threshold (at most 32 MB by default) with a
fresh ``mmap`` and returns it to the kernel on ``free``. LiteMedSAM's first stage makes
several 64-128 MB activations per batch, so every forward re-faults (and the kernel zeroes)
hundreds of MB: on this project's 2-core machine a batch-4 bf16 encoder forward took 2.9 s
wall with 2.8 s of system time (page faults); with the blocks kept, 1.1 s wall and 0.01 s
of system time, bit-for-bit the same output (``bench/bench_allocator.py`` prints both).

:func:`keep_freed_memory` raises the mmap threshold and the trim threshold to 1 GiB, so
freed blocks are reused. The cost: the process keeps its peak heap instead of shrinking
after it. Entry points that run models call it (the CLI, each Ray training worker and
evaluation actor, the registry's pyfunc model); it is a no-op where malloc is not glibc's (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
KEEP_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process; True when applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: AttributeError elsewhere)
    except (OSError, AttributeError):
        return False
    # Some glibc versions cap the mmap threshold; then stop using mmap for the heap at all.
    threshold = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 or mallopt(M_MMAP_MAX, 0) == 1
    trimmed = mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    if not (threshold and trimmed):
        log.debug("mallopt refused the thresholds; allocator left as it was")
        return False
    return True
