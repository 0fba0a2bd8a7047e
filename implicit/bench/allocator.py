"""The C allocator settings CPU timings run under.

glibc's malloc serves a block above its (adaptive) mmap threshold with a fresh ``mmap`` and hands
the memory back to the system when it is freed; it also trims the top of its heap whenever more
than its trim threshold lies free there. A DEQ solve allocates and frees states of several MiB
every step, so under the defaults some of that memory comes back as fresh pages each time, and
every 4 KiB page is faulted in and zeroed on first touch. Measured on the project machine on the
ch.4 ResNet workload (batch 16): 36 000–39 000 page faults over 17 cell evaluations, and cell
evaluations 12.1 ms with the settings below against 16.4 ms without, in the same minute.

Allocator tuning is the standard advice for PyTorch on CPU (PyTorch's own
``torch.backends.xeon.run_cpu`` launcher preloads jemalloc or tcmalloc and tells it never to
return memory). ``tuned`` does the same with glibc itself: the mmap threshold is pinned at its
maximum (32 MiB on 64-bit) and the heap is never trimmed automatically. Both the solves and the
cell evaluations they are compared with run under it, so ratios compare like with like;
``system`` keeps the defaults. Peak-memory measurements call :func:`release_free_memory` first,
so memory a previous phase freed is not reused unseen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

MALLOC_MODES = ("tuned", "system")

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (4 MiB · sizeof(long))
_NEVER_TRIM = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def configure(mode: str) -> str:
    """Apply ``mode`` (``"tuned"`` or ``"system"``) to this process; return what is in force,
    for the results (``"glibc defaults"`` where mallopt is unavailable, e.g. macOS or musl)."""
    if mode not in MALLOC_MODES:
        raise ValueError(f"malloc mode {mode!r}: expected one of {', '.join(MALLOC_MODES)}")
    libc = _libc()
    if mode == "system" or libc is None:
        return "system defaults" if libc is None else "glibc defaults"
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1 and ok
    if not ok:
        return "glibc defaults (mallopt refused the tuned settings)"
    return "glibc, mmap threshold 32 MiB, no automatic trim"


def release_free_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim(0)``), where available."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
