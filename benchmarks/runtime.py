"""Process set-up shared by the CPU benchmarks: allocator choice and thread count, fixed before torch loads.

The allocator matters on CPU training steps: glibc's default malloc returns large freed blocks to the
kernel (``mmap`` above a dynamic threshold, heap trimming), so every step page-faults its activations in
again. ``jemalloc`` keeps them; ``tuned`` keeps glibc but raises the mmap/trim thresholds. Both sides of a
ratio must run in the same process and setting, so :func:`reexec_with` restarts the script once with the
chosen environment (``LD_PRELOAD`` only takes effect at exec time).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# glibc caps mmap_threshold at 32 MiB on 64-bit; trim_threshold and top_pad keep freed heap memory mapped.
TUNED_GLIBC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=268435456"
MALLOCS = ("glibc", "jemalloc", "tuned")
_MARKER = "SKF_BENCH_ENV"


def malloc_env(malloc: str, threads: int) -> dict[str, str]:
    """The environment a benchmark process runs under for ``malloc`` and ``threads``."""
    if malloc not in MALLOCS:
        raise ValueError(f"--malloc must be one of {MALLOCS}, got {malloc!r}")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")}
    if malloc == "jemalloc":
        if not os.path.exists(JEMALLOC):
            raise SystemExit(f"{JEMALLOC} not found: install Debian's libjemalloc2 or use --malloc tuned")
        env["LD_PRELOAD"] = JEMALLOC
        # Keep freed pages (no decay): steps minutes apart reuse them instead of faulting them in again.
        env["MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    elif malloc == "tuned":
        env["GLIBC_TUNABLES"] = TUNED_GLIBC
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env[_MARKER] = f"{malloc}:{threads}"
    return env


def reexec_with(malloc: str, threads: int, argv: Sequence[str] | None = None) -> None:
    """Re-exec the current script under :func:`malloc_env` unless it already runs under it."""
    if os.environ.get(_MARKER) == f"{malloc}:{threads}":
        return
    args = [sys.executable, *(sys.argv if argv is None else argv)]
    os.execve(sys.executable, args, malloc_env(malloc, threads))


def describe(malloc: str) -> str:
    """Human-readable allocator setting for reports."""
    if malloc == "jemalloc":
        return f"jemalloc (LD_PRELOAD={JEMALLOC}, MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1)"
    if malloc == "tuned":
        return f"glibc malloc, GLIBC_TUNABLES={TUNED_GLIBC}"
    return "glibc malloc (defaults)"
