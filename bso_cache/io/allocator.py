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


FRUGAL_THRESHOLD = 128 << 10   # glibc's own starting value, kept fixed: RSS follows the live tensors


def memory_first(cfg, device: str) -> str | None:
    """On the CPU, a run that asked for memory over time (--gradient-checkpointing,
    --optimizer-in-backward) also gets the C heap's frugal policy: every freed block of 128 KiB or
    more goes back to the OS, so RSS follows the live tensors, for some more time per step (the
    trade measured: docs/PERFORMANCE-MEMORY.md). Returns the line to print,
    or None where nothing changed (another device, no such lever, a MALLOC_* setting of the user's)."""
    levers = [flag for flag, on in (("--gradient-checkpointing", cfg.gradient_checkpointing),
                                    ("--optimizer-in-backward", cfg.optimizer_in_backward)) if on]
    if not levers or device != "cpu" or not return_freed_memory(FRUGAL_THRESHOLD):
        return None
    return (f"note: {' and '.join(levers)} trade time for memory, and so does the C heap now: freed blocks of "
            f"128 KiB and more go back to the OS (set MALLOC_MMAP_THRESHOLD_ to choose otherwise)")


def heap_policy(cfg, device: str, log) -> None:
    """What a training run gets, from the command line or the Python API alike: the 4 MiB threshold,
    and the frugal one where memory_first says so (its note printed by rank 0 alone)."""
    return_freed_memory()
    note = memory_first(cfg, device)
    if note and os.environ.get("RANK", "0") == "0":
        log(note)
