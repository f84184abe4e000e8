"""The C heap's policy for large blocks, set once per process by the command line.

glibc serves blocks above its mmap threshold with mmap (handed back to the OS when freed) and
smaller ones from its arenas (kept for reuse). The threshold starts at 128 KiB and rises to the
size of each large block freed, up to 32 MiB: after a few steps of training on the CPU, the
activations, logits chunks and update slices (1-32 MiB each, of sizes that change with every
length bucket) all land in the arenas, which keep them. A fixed 4 MiB threshold hands them back:
docs/PERFORMANCE.md ("A user's case: LoRA on SmolLM2-135M") has the RSS both ways and the time
it costs.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3          # mallopt's parameter number (malloc.h)
THRESHOLD = 4 << 20            # blocks of 4 MiB or more: mmap, returned when freed


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (Linux with glibc only). A MALLOC_* tunable
    the user set in the environment is left to rule. Returns whether the policy was set."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
