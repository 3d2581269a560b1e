"""glibc's allocator, told to give big blocks back.

glibc serves a block above its mmap threshold (128 KB at first) with its own mapping,
returned to the system when freed; but each such free raises the threshold (up to 32 MB),
so the next big blocks (a scoring call's tens of MB of log-probs, a batch's arrays) come
from the heap, where freed memory stays part of the process. Fixing the threshold at 4 MB
keeps the per-step arrays (about 1.5 MB: reused from the heap, no page faults) as they
are and maps the larger ones. Measured with the shipped folder at 32 concurrent hybrid
requests in one process: peak RSS 218 -> 190 MB at the same replies/s.

Fixing the mmap threshold also stops glibc from adjusting its trim threshold, which then
stays at 128 KB: every per-step array freed at the heap's top went back to the system and
the next step page-faulted it in again (a copy of the batch-32 log-probs: 40 -> 550 us).
So the trim threshold is fixed too, at twice the mmap threshold (glibc's own ratio when it
adjusts them): a few steps' arrays stay, the big blocks still go back.

Other C libraries: nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
_done = threading.Event()


def give_back_big_blocks() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process); False where there is no
    glibc."""
    if _done.is_set():
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if ok:
        _done.set()
    return ok
