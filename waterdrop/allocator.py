"""Keep large tensors in the heap: glibc malloc settings for PyTorch on the CPU.

glibc serves every block above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed, and it trims the heap top above
128 KiB. A CPU training step allocates and frees hundreds of MB of such blocks, so every
step faults its pages in anew: measured on a 2-core machine, a third of the CPU time went
to the kernel and training ran 1.5x slower (``benchmarks/allocator.py``). Raising both
thresholds keeps freed blocks in the heap for the next step; PyTorch's CPU performance
guides reach the same by preloading jemalloc or tcmalloc.

``mallopt(3)`` acts at once, unlike ``GLIBC_TUNABLES``, which glibc reads only at process
start. So the settings are applied when ``waterdrop`` is imported, and every process that
imports it is covered: the tools, the benchmarks, ``torchrun`` ranks, data-loader workers
(forked ones inherit the settings, spawned ones import waterdrop), the scanner's decode
processes and Ray actors. ``WATERDROP_MALLOC=system`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

SWITCH = "WATERDROP_MALLOC"
# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (a batch of 32 activations at 192 px is ~40 MB);
# the heap top is returned to the system only when 256 MiB of it are free, so memory left
# over after a run's largest phase does not stay with the process for good.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 256 << 20
FALLBACK_MMAP_THRESHOLD = 32 << 20  # the largest glibc before 2.26 accepts (HEAP_MAX_SIZE / 2)

_state: str | None = None


def state() -> str:
    """``tuned``, ``partly tuned``, ``system`` (switched off by the user) or ``unavailable: <why>``."""
    return _state or "not applied"


def configure() -> str:
    """Apply the settings once per process, unless switched off; returns :func:`state`."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get(SWITCH, "").lower() in ("system", "off", "0"):
        _state = "system"
    elif platform.system() != "Linux":
        _state = "unavailable: not Linux"  # other systems' allocators do not have glibc's mmap churn
    elif platform.libc_ver()[0] != "glibc":
        _state = "unavailable: not glibc"
        _hint("this C library is not glibc, so waterdrop cannot tune its malloc; preloading jemalloc or tcmalloc "
              "(LD_PRELOAD) can")
    else:
        libc = ctypes.CDLL(None)  # the process's own symbols: the glibc it runs on, no library search
        mmap = any(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(v)) for v in (MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD))
        trim = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD))
        _state = "tuned" if mmap and trim else "partly tuned" if mmap or trim else "unavailable: mallopt refused"
        if _state != "tuned":
            _hint(f"glibc refused {'a' if mmap or trim else 'the'} malloc setting")
    return _state


def _hint(why: str) -> None:
    print(f"waterdrop: {why}; CPU training may run about 1.5x slower (set {SWITCH}=system to silence this)",
          file=sys.stderr)
