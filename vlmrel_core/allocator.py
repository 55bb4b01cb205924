"""Keep freed tensor memory in the process for reuse (glibc's malloc), so forward passes stop page-faulting.

Why: every forward pass allocates and frees activation tensors of a few MB. With glibc's default, adaptive
settings, freed memory at the top of the heap is handed back to the OS (trimmed) and the next pass faults it back
in, page by page. The README's `vlmrel ablate` took 2.1 million minor page faults and 8 s of system time on
2 cores; with a fixed mmap threshold (64 MiB: larger blocks, such as weights, are still mapped and unmapped on
their own) and trim threshold (1 GiB), 0.15 million and 1.4 s, and ~10% less wall time. PyTorch's CPU tuning
guide recommends the same effect through jemalloc or tcmalloc; this needs no extra library. Peak memory is the
same (`benchmarks/bench_memory.py`); memory freed after the peak stays with the process until it exits.

`keep_freed_memory` runs once at the start of a `vlmrel` process (`cli.main.cli`, not in-process `main()` calls). It changes nothing where the user already tuned
malloc (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or a ``glibc.malloc.`` tunable), with
``VLMREL_KEEP_FREED_MEMORY=0``, or off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks above it are mapped on their own; glibc before ~2.35 refuses more than 32 MiB, which is then used.
MMAP_THRESHOLD_BYTES = 64 * 2**20
_OLDER_GLIBC_MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory(environ: "os._Environ[str] | dict[str, str] | None" = None) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process; True where applied (see the module doc)."""
    env = os.environ if environ is None else environ
    if (env.get("VLMREL_KEEP_FREED_MEMORY", "1").strip() == "0" or any(name in env for name in _USER_SETTINGS)
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either one turns glibc's adaptive thresholds off
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) or mallopt(_M_MMAP_THRESHOLD, _OLDER_GLIBC_MMAP_THRESHOLD_BYTES)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
