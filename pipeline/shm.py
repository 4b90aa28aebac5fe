"""A pool of fixed-size frame slots in one shared-memory segment.

Decoders write pixels into slots; the inference process reads them by slot
index, so pixel payloads never travel through ZeroMQ. The segment is a file in
``/dev/shm`` mapped by every process. The owner unlinks it as soon as every
process has attached (the mapping lives on while mapped), so even ``kill -9``
of the whole job leaves nothing behind; ``reclaim_stale_segments`` removes
segments of dead jobs that were killed before that point.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from wanwu.errors import TransportError
from wanwu.specs import FrameSpec

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "wanwu-"
_SEGMENT_RE = re.compile(r"^wanwu-(\d+)-[0-9a-f]+$")


def shm_dir() -> Path:
    """Where segments live: ``/dev/shm`` on Linux, else the temp dir."""
    dev_shm = Path("/dev/shm")
    return dev_shm if dev_shm.is_dir() and os.access(dev_shm, os.W_OK) else Path(tempfile.gettempdir())


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (zombies count as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlotPool:
    """``n_slots`` frames of ``spec`` in one shared segment.

    Create it in the job's owner with ``create``; attach in workers with ``attach``.
    """

    def __init__(self, path: Path, spec: FrameSpec, n_slots: int, owner: bool) -> None:
        self.path = path
        self.spec = spec
        self.n_slots = n_slots
        self.owner = owner
        size = spec.nbytes * n_slots
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise TransportError(f"cannot attach shared memory {path}: {exc}") from exc
        try:
            if os.fstat(fd).st_size != size:
                raise TransportError(
                    f"shared memory {path} has {os.fstat(fd).st_size} bytes, expected {size}"
                )
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.frames = np.ndarray((n_slots, *spec.shape), np.dtype(spec.dtype), self._mmap)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, spec: FrameSpec, n_slots: int) -> "SlotPool":
        """Create a new segment named after this process, so a later job can tell if it is stale."""
        if n_slots <= 0:
            raise TransportError(f"expected at least one slot, got {n_slots}")
        path = shm_dir() / f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, spec.nbytes * n_slots)
        finally:
            os.close(fd)
        return cls(path, spec, n_slots, owner=True)

    @classmethod
    def attach(cls, path: str | Path, spec: FrameSpec, n_slots: int) -> "SlotPool":
        """Map an existing segment created by ``create``."""
        return cls(Path(path), spec, n_slots, owner=False)

    def frame(self, slot: int) -> np.ndarray:
        """A writable view of one slot."""
        return self.frames[slot]

    def gather(self, slots: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Copy ``slots`` into one contiguous batch (the point where a GPU build copies H2D)."""
        return np.take(self.frames, np.asarray(slots, dtype=np.intp), axis=0, out=out)

    def unlink(self) -> None:
        """Remove the segment's name; mappings stay valid. Safe to call twice."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap (the owner also unlinks). Safe to call twice."""
        if self.owner:
            self.unlink()
        if getattr(self, "_mmap", None) is not None:
            self.frames = None  # type: ignore[assignment]
            try:
                self._mmap.close()
            except BufferError:
                # A view is still exported somewhere; the OS unmaps at exit.
                pass
            self._mmap = None


def reclaim_stale_segments(directory: Path | None = None) -> list[str]:
    """Unlink segments whose creating process is gone (a job killed before unlinking).

    Returns the names removed.
    """
    directory = directory or shm_dir()
    removed = []
    for entry in directory.glob(f"{SEGMENT_PREFIX}*"):
        match = _SEGMENT_RE.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("reclaimed %d stale shared-memory segment(s) of dead jobs", len(removed))
    return removed
