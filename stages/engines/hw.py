"""What the CPU offers, for engines choosing precision and thread counts.

The precision rule is one pure function of ``/proc/cpuinfo`` text
(``cpu_precision``), so the engines' ``auto`` and anything that must choose as
they do (the benchmark's baselines) share it and a test can feed it any CPU.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# AMX tiles or AVX-512 BF16 make bf16 inference faster than fp32; other CPUs
# emulate it (torch autocast on a Zen 3 ran about 5x slower than fp32), so
# "auto" precision keeps fp32 there.
_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})

# The instruction sets that decide inference speed, by the names /proc/cpuinfo uses.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX2": ("avx2",),
    "AVX512F": ("avx512f",),
    "AVX512-BF16": ("avx512_bf16",),
    "AMX": ("amx_bf16",),
    "VNNI": ("avx512_vnni", "avx_vnni"),  # either: int8 dot products (AVX-512 or AVX2 encoding)
}

# "int8": NNCF post-training quantization (OpenVINO only); "int8+fp32": int8 with the near
# ties recomputed in fp32, as auto does for bf16. auto never picks int8 (see cpu_precision).
PRECISIONS = ("auto", "bf16", "fp32", "int8", "int8+fp32")


@dataclass(frozen=True)
class CpuFeatures:
    """The first processor of a ``/proc/cpuinfo`` text (every core lists the same)."""

    model_name: str = "?"  # "model name", e.g. "AMD EPYC 7B13"
    family: int | None = None  # "cpu family" (6: Intel Core/Xeon, 25: AMD Zen 3/4)
    model: int | None = None  # "model" (143: Sapphire Rapids, 1: Zen 3 Milan, 17: Zen 4 Genoa)
    flags: frozenset[str] = frozenset()

    @property
    def native_bf16(self) -> bool:
        """True with AMX-BF16 or AVX512-BF16: bf16 runs faster than fp32, not emulated."""
        return not _BF16_FLAGS.isdisjoint(self.flags)

    def isa(self) -> dict[str, bool]:
        """``ISA_FLAGS``' names, each True when the CPU has it."""
        return {name: not self.flags.isdisjoint(names) for name, names in ISA_FLAGS.items()}


def cpu_features(cpuinfo_text: str) -> CpuFeatures:
    """Parse the first processor block of ``cpuinfo_text``; fields missing from it keep their defaults."""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())

    def number(key: str) -> int | None:
        try:
            return int(fields[key])
        except (KeyError, ValueError):
            return None

    return CpuFeatures(
        model_name=fields.get("model name", "?"), family=number("cpu family"), model=number("model"),
        flags=frozenset(fields.get("flags", "").split()),
    )


def native_bf16(cpuinfo_text: str) -> bool:
    """True when the CPU described by ``cpuinfo_text`` has AMX-BF16 or AVX512-BF16."""
    return cpu_features(cpuinfo_text).native_bf16


def cpu_precision(wanted: str, cpuinfo_text: str) -> str:
    """The precision a CPU computes in for ``wanted``: ``"bf16"``, ``"fp32"`` or ``"int8"``.

    ``auto`` means bf16 only where the CPU has native bf16 (``native_bf16``),
    fp32 elsewhere; ``bf16`` and ``fp32`` are taken as asked, ``int8`` and
    ``int8+fp32`` compute in int8. This is the one rule: the engines' ``auto``
    and the benchmark's baselines all call it.

    ``auto`` never means int8. Measured (README, Precision): NNCF's int8 changed
    about 5% of EfficientNet-Lite0's top-1 answers; with the fp32 recheck that
    keeps 99.5% of them it ran no faster than bf16 with its recheck on Sapphire
    Rapids, and on CPUs without native bf16 its gain is not measured yet. It also
    needs NNCF and a calibration set. So int8 is asked for, never chosen silently.

    Raises:
        ValueError: ``wanted`` is not one of ``PRECISIONS``.
    """
    if wanted not in PRECISIONS:
        raise ValueError(f"expected precision in {PRECISIONS}, got {wanted!r}")
    if wanted.startswith("int8"):
        return "int8"
    return "bf16" if wanted == "bf16" or (wanted == "auto" and native_bf16(cpuinfo_text)) else "fp32"


@functools.lru_cache(maxsize=4)
def cpuinfo_text(path: str = "/proc/cpuinfo") -> str:
    """The text of ``path``, read once per process; "" where it cannot be read (non-Linux systems)."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 arithmetic (``amx_bf16`` or ``avx512_bf16``).

    Reads the file ``cpuinfo`` (cached); False where it cannot be read.
    """
    return native_bf16(cpuinfo_text(cpuinfo))


def cpu_count() -> int:
    """Cores this process may run on (honours ``taskset`` and cgroup cpusets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity outside Linux
        return max(1, os.cpu_count() or 1)
