"""What the CPU offers, for engines choosing precision and thread counts."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# AMX tiles or AVX-512 BF16 make bf16 inference faster than fp32; other CPUs
# emulate it and run slower, so "auto" precision keeps fp32 there.
_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 arithmetic (``amx_bf16`` or ``avx512_bf16``).

    False where ``cpuinfo`` cannot be read (non-Linux systems).
    """
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            # Every core lists the same flags; the first line decides.
            return not _BF16_FLAGS.isdisjoint(line.partition(":")[2].split())
    return False


def cpu_count() -> int:
    """Cores this process may run on (honours ``taskset`` and cgroup cpusets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity outside Linux
        return max(1, os.cpu_count() or 1)
