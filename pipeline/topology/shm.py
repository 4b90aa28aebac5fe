"""A pool of fixed-size frame slots in one shared, nameless memory region.

Producers (decoders, frame sources) write pixels into slots; the inference
process reads them by slot index, so pixel payloads never travel through
ZeroMQ. The region is a ``memfd`` (on Linux; elsewhere a temporary file
unlinked at once): it has no name anywhere, so nothing can leak, not even
after ``kill -9`` of every process. The owner passes its file descriptor to
each worker it spawns, restarted workers included, and the memory goes away
when the last process holding it exits.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from wanwu.errors import TransportError
from wanwu.specs import FrameSpec

if TYPE_CHECKING:
    from wanwu.pipeline.topology.plan import Plan

logger = logging.getLogger(__name__)


def shm_dir() -> Path:
    """Where a region's backing file lives where there is no memfd: ``/dev/shm``, else the temp dir."""
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


def _anonymous_fd(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"wanwu-pool-{os.getpid()}", os.MFD_CLOEXEC)
    else:  # no memfd: a file that is unlinked before anyone can see it
        fd, path = tempfile.mkstemp(prefix=f"wanwu-{os.getpid()}-", dir=shm_dir())
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class SlotPool:
    """``n_slots`` frames of ``spec`` in one shared region.

    Create it in the owner with ``create``; attach in workers with ``attach`` and
    the descriptor the owner passed down (``fd``).
    """

    def __init__(self, fd: int, spec: FrameSpec, n_slots: int, owner: bool) -> None:
        if spec.device != "cpu":
            raise TransportError(f"expected frames in host memory for a shared-memory pool, got {spec.describe()}")
        self.spec = spec
        self.n_slots = n_slots
        self.owner = owner
        self._fd = fd if owner else -1  # the owner keeps it open for workers started later
        size = spec.nbytes * n_slots
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise TransportError(f"shared memory (fd {fd}) has {actual} bytes, expected {size}")
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        except OSError as exc:
            raise TransportError(f"cannot map shared memory (fd {fd}): {exc}") from exc
        finally:
            if not owner:
                os.close(fd)  # the mapping keeps the memory; the descriptor is not needed
        self.frames = np.ndarray((n_slots, *spec.shape), np.dtype(spec.dtype), self._mmap)

    @property
    def fd(self) -> int:
        """The descriptor to pass to workers (owner only)."""
        if self._fd < 0:
            raise TransportError("expected the owner's pool: only it keeps a descriptor to pass on")
        return self._fd

    @classmethod
    def create(cls, spec: FrameSpec, n_slots: int) -> "SlotPool":
        """A new region of ``n_slots`` frames."""
        if n_slots <= 0:
            raise TransportError(f"expected at least one slot, got {n_slots}")
        try:
            fd = _anonymous_fd(spec.nbytes * n_slots)
        except OSError as exc:
            raise TransportError(f"cannot create {spec.nbytes * n_slots} bytes of shared memory: {exc}") from exc
        return cls(fd, spec, n_slots, owner=True)

    @classmethod
    def attach(cls, fd: int, spec: FrameSpec, n_slots: int) -> "SlotPool":
        """Map the region behind ``fd`` (inherited from the owner); takes over the descriptor."""
        return cls(fd, spec, n_slots, owner=False)

    def frame(self, slot: int) -> np.ndarray:
        """A writable view of one slot."""
        return self.frames[slot]

    def gather(self, slots: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Copy ``slots`` into one contiguous batch (the point where a GPU build copies H2D)."""
        return np.take(self.frames, np.asarray(slots, dtype=np.intp), axis=0, out=out)

    def close(self) -> None:
        """Unmap, and close the owner's descriptor. Safe to call twice."""
        if self._mmap is not None:
            self.frames = None  # type: ignore[assignment]
            try:
                self._mmap.close()
            except BufferError:
                # A view is still exported somewhere; the OS unmaps at exit.
                pass
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def attach_pool(fd: int, plan: "Plan") -> Any:
    """A worker's pool: the host ``SlotPool``, or the owner's device pool when the GPU plan put it there."""
    if plan.gpu is not None and plan.gpu.pool.placement == "device":
        from wanwu.pipeline.topology.gpu_pool import attach_device_pool  # CUDA only for GPU jobs

        return attach_device_pool(fd, plan)
    return SlotPool.attach(fd, plan.frame, plan.n_slots)
