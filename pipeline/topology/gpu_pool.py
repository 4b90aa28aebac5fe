"""The GPU plan's pools, on a device: the device slot pool shared by CUDA IPC, and pinning the host pool.

Imported only when a job runs with ``--device cuda:N`` (by the owner and by the
workers through ``shm.attach_pool``); CuPy and torch are imported inside.

The device pool is allocated by the owner, which outlives every worker, so a
worker's death never frees the frames others still read (the same reason the
host pool is the owner's memfd). Its 64-byte CUDA IPC handle travels to the
workers in a nameless memfd passed like the host pool's descriptor: nothing
lands on disk, and a restarted worker opens the same memory again.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import TYPE_CHECKING, Any, Sequence

from wanwu.errors import TransportError
from wanwu.pipeline.topology.gpu import DeviceFacts, GpuSettings, PoolPlan, plan_gpu
from wanwu.pipeline.topology.plan import Plan

if TYPE_CHECKING:
    from wanwu.pipeline.config import PipelineConfig

logger = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def device_index(device: str) -> int:
    """``N`` of ``cuda:N`` (0 for ``cuda``)."""
    _, _, index = device.partition(":")
    try:
        return int(index or 0)
    except ValueError:
        raise TransportError(f"expected a device like 'cuda:0', got {device!r}") from None


def probe_facts(device: str) -> DeviceFacts | None:
    """What this machine offers for ``device``, or None when torch sees no such device."""
    import importlib.util

    import torch

    index = device_index(device)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    props = torch.cuda.get_device_properties(index)
    # CUDA IPC is a Linux feature; WSL's driver does not implement it.
    ipc = platform.system() == "Linux" and "microsoft" not in platform.release().lower()
    return DeviceFacts(device, props.name, props.major * 10 + props.minor, props.total_memory, ipc=ipc,
                       cupy=importlib.util.find_spec("cupy") is not None,
                       dali=importlib.util.find_spec("nvidia.dali") is not None)


class DeviceSlotPool:
    """``pool.n_slots`` frames in one device allocation, opened in every process by its IPC handle.

    Create it in the owner (``create``); attach in workers (``attach``) with the descriptor of
    the memfd that holds the handle. ``frame(slot)`` is a CuPy array (decoders write it);
    ``frames()`` is a torch tensor of every slot (the inference process gathers from it).
    """

    def __init__(self, pool: PoolPlan, shape: tuple[int, ...], device: str, ptr: int, owner: bool, fd: int) -> None:
        self.plan, self.shape, self.device = pool, shape, device
        self.n_slots = pool.n_slots
        self.owner = owner
        self._ptr, self._fd = ptr, fd
        self._torch: Any = None

    @classmethod
    def create(cls, pool: PoolPlan, shape: tuple[int, ...], device: str) -> "DeviceSlotPool":
        """Allocate the pool on ``device`` and write its IPC handle into a new memfd."""
        import cupy

        with cupy.cuda.Device(device_index(device)):
            # runtime.malloc, not CuPy's memory pool: IPC exports whole allocations.
            ptr = cupy.cuda.runtime.malloc(pool.pool_bytes)
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr))
        fd = os.memfd_create("wanwu-device-pool", os.MFD_CLOEXEC)
        os.write(fd, handle)
        logger.info("device pool: %d slots, %d bytes on %s", pool.n_slots, pool.pool_bytes, device)
        return cls(pool, shape, device, ptr, owner=True, fd=fd)

    @classmethod
    def attach(cls, fd: int, pool: PoolPlan, shape: tuple[int, ...], device: str) -> "DeviceSlotPool":
        """Open the owner's pool from the handle in ``fd``; takes over the descriptor."""
        import cupy

        try:
            handle = os.pread(fd, IPC_HANDLE_BYTES, 0)
        finally:
            os.close(fd)
        if len(handle) != IPC_HANDLE_BYTES:
            raise TransportError(f"expected a {IPC_HANDLE_BYTES}-byte CUDA IPC handle, got {len(handle)} bytes")
        cupy.cuda.Device(device_index(device)).use()
        ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle, _LAZY_PEER_ACCESS)
        return cls(pool, shape, device, ptr, owner=False, fd=-1)

    @property
    def fd(self) -> int:
        """The descriptor to pass to workers (owner only)."""
        if self._fd < 0:
            raise TransportError("expected the owner's device pool: only it keeps a descriptor to pass on")
        return self._fd

    def frame(self, slot: int) -> Any:
        """A CuPy view of one slot, for a decoder to write."""
        import cupy

        nbytes = self.plan.slot_bytes
        memory = cupy.cuda.UnownedMemory(self._ptr + self.plan.slot_offset(slot), nbytes, self)
        return cupy.ndarray(self.shape, cupy.uint8, cupy.cuda.MemoryPointer(memory, 0))

    def frames(self) -> Any:
        """Every slot as one torch tensor ``(n_slots, *shape)`` on the device (a view, no copy)."""
        if self._torch is None:
            import cupy
            import torch

            memory = cupy.cuda.UnownedMemory(self._ptr, self.plan.pool_bytes, self)
            flat = cupy.ndarray((self.plan.pool_bytes,), cupy.uint8, cupy.cuda.MemoryPointer(memory, 0))
            stride = self.plan.slot_stride_bytes
            rows = torch.from_dlpack(flat)[: stride * self.n_slots].view(self.n_slots, stride)
            self._torch = rows[:, : self.plan.slot_bytes].view(self.n_slots, *self.shape)
        return self._torch

    def gather(self, slots: Sequence[int], out: Any = None) -> Any:
        """``slots`` as one batch on the device (``index_select`` on the current stream)."""
        import torch

        index = torch.as_tensor(list(slots), dtype=torch.long).to(self.frames().device, non_blocking=True)
        return torch.index_select(self.frames(), 0, index, out=out)

    def close(self) -> None:
        """Close the handle (workers) or free the memory (owner). Safe to call twice."""
        if self._ptr:
            import cupy

            self._torch = None
            if self.owner:
                cupy.cuda.runtime.free(self._ptr)
            else:
                cupy.cuda.runtime.ipcCloseMemHandle(self._ptr)
            self._ptr = 0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_gpu(cfg: "PipelineConfig", plan: Plan, settings: GpuSettings = GpuSettings()) -> tuple[Plan, Any]:
    """The owner's side of a GPU job: the plan with its GPU part, and the pool it calls for.

    Where torch sees no such device, the plan and the host pool are those of a CPU job, so the
    inference process fails to load its engine exactly as before and says why.
    """
    from wanwu.pipeline.topology.shm import SlotPool
    from wanwu.stages.decoders.base import resolve_decoder_name

    facts = probe_facts(cfg.device)
    if facts is None:
        logger.warning("no CUDA device %s here: planning as on a CPU", cfg.device)
        return plan, SlotPool.create(plan.frame, plan.n_slots)
    from wanwu.stages.engines.base import resolve_engine_name
    from wanwu.stages.models.base import get_model_spec

    # The engine as the inference process will resolve it: an ONNX model on auto is ONNX Runtime,
    # which keeps the host path, not the torch engine's device pool.
    model = get_model_spec(cfg.model, **cfg.model_options())  # light: no framework import
    engine = resolve_engine_name(cfg.engine, cfg.device, model.format)
    plan = plan_gpu(plan, facts, resolve_decoder_name(cfg.decoder, cfg.device), engine, cfg.max_pixels,
                    settings, cfg.batch_size)
    assert plan.gpu is not None
    if plan.gpu.pool.placement == "device":
        return plan, DeviceSlotPool.create(plan.gpu.pool, plan.frame.shape, plan.gpu.device)
    return plan, SlotPool.create(plan.frame, plan.n_slots)


def attach_device_pool(fd: int, plan: Plan) -> DeviceSlotPool:
    """A worker's view of the owner's device pool."""
    assert plan.gpu is not None
    return DeviceSlotPool.attach(fd, plan.gpu.pool, plan.frame.shape, plan.gpu.device)


class PinnedRegistration:
    """The host pool's pages locked for DMA in this process (``cudaHostRegister``), until ``close``."""

    def __init__(self, array: Any, pool: PoolPlan) -> None:
        import torch

        self._cudart = torch.cuda.cudart()
        self._ptr = array.ctypes.data
        # cudaHostRegisterPortable: every context of this process may DMA from it.
        err = self._cudart.cudaHostRegister(self._ptr, pool.pool_bytes, 1)
        if int(err) != 0:
            raise TransportError(f"expected cudaHostRegister of {pool.pool_bytes} bytes to succeed, got error {err}")

    def close(self) -> None:
        """Unlock the pages. Safe to call twice."""
        if self._ptr:
            self._cudart.cudaHostUnregister(self._ptr)
            self._ptr = 0
