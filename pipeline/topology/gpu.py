"""Planning the GPU data path: where the slot pool lives, its size, the stream order, the decoder chain.

Everything here is decided before any process starts and without CUDA: the
inputs are the ``Plan``, the stage names, and ``DeviceFacts`` (what the machine
offers, probed by ``gpu_pool.probe_facts`` on a GPU, written by hand in tests).
The code that runs the plan on a device (``gpu_pool.py``, ``workers/gpu_feed.py``,
the torch engine's device hooks) only executes these decisions, so every choice
is tested on a CPU.

The pool (``PoolPlan``):

* ``device``: the slots live in one ``cudaMalloc`` allocation made by the owner and
  opened by every worker through a CUDA IPC handle (CuPy's ``ipcGetMemHandle``).
  DALI's ``mixed`` decoder writes frames there and the inference process gathers
  a batch with one on-device ``index_select``: pixels never cross PCIe. Chosen
  when the decoder leaves frames on the device, CUDA IPC works and CuPy imports.
* ``pinned``: the host ``memfd`` pool as on a CPU, page-locked by the inference
  process with ``cudaHostRegister`` so that its host-to-device copies are real DMA
  on a copy stream, overlapping compute. Chosen when a producer writes host frames
  (the CPU decoder, a frame source), or IPC or CuPy is missing.

The order per batch (``batch_steps``), executed step by step by the inference
process with two device batch buffers: batch n is copied (pinned: H2D on the copy
stream; device: gathered on the compute stream) while batch n-1 still computes;
its slots are released once its copy is done; its results are read once its
compute event has fired, after batch n+1 has been enqueued.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from wanwu.errors import ConfigError, PlanError
from wanwu.stages.decoders.base import MixedOptions

from wanwu.pipeline.topology.plan import Plan

logger = logging.getLogger(__name__)

SLOT_ALIGN_BYTES = 256  # cudaMalloc's alignment: each device slot starts on it, for vector loads
DEVICE_POOL_GRANULE_BYTES = 2 << 20  # large cudaMalloc blocks come in 2 MiB pages; IPC maps whole blocks
HOST_PAGE_BYTES = 4096  # cudaHostRegister pins whole pages
BATCH_BUFFERS = 2  # device batch tensors: batch n+1 is copied into one while batch n computes in the other
# GPUs with NVJPG hardware JPEG engines that DALI's mixed decoder drives (A100/A30, H100/H200, B200).
HW_JPEG_CAPABILITIES = frozenset({80, 90, 100})
PLACEMENTS = ("auto", "device", "pinned")


@dataclass(frozen=True)
class DeviceFacts:
    """What the machine offers, probed once by the owner (``gpu_pool.probe_facts``)."""

    device: str  # "cuda:N"
    name: str = ""  # e.g. "NVIDIA H200"
    compute_capability: int = 0  # 90 for 9.0
    memory_bytes: int = 0  # total device memory
    ipc: bool = False  # CUDA IPC works between processes (Linux, not WSL)
    cupy: bool = False  # CuPy imports: it makes and opens the IPC handles
    dali: bool = False  # DALI imports: the mixed (nvJPEG) decoder exists

    @property
    def hw_jpeg(self) -> bool:
        """Whether the GPU has hardware JPEG decoders."""
        return self.compute_capability in HW_JPEG_CAPABILITIES


@dataclass(frozen=True)
class GpuSettings:
    """What the user may choose about the GPU path; the defaults are the planned path."""

    placement: str = "auto"  # auto | device | pinned: where the slot pool lives
    hw_decoder_load: float = 0.75  # share of JPEG work sent to the hardware decoder (DALI#5362 saw 75% on an A100)
    preallocate_width: int = 4032  # largest common input (a 12 MP phone photo): nvJPEG preallocates for it
    preallocate_height: int = 3024
    # Replay CUDA graphs for the batch sizes in graph_batch_sizes (other sizes run eagerly).
    # On by default: eager launches of a small model's ~250 kernels took ~9.6 ms of host
    # time per batch of 32 on an H200 whose compute took ~2 ms (gpu_check's trace).
    cuda_graphs: bool = True
    graph_batch_sizes: tuple[int, ...] = ()  # () means the job's batch size alone
    max_pool_share: float = 0.25  # refuse a device pool above this share of device memory

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"expected a pool placement among {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f"expected hw_decoder_load in [0, 1], got {self.hw_decoder_load}")
        if min(self.preallocate_width, self.preallocate_height) <= 0 or not 0 < self.max_pool_share <= 1:
            raise ConfigError(f"expected positive preallocation hints and 0 < max_pool_share <= 1, got "
                              f"{self.preallocate_width}x{self.preallocate_height}, {self.max_pool_share}")
        if any(n <= 0 for n in self.graph_batch_sizes):
            raise ConfigError(f"expected positive CUDA graph batch sizes, got {self.graph_batch_sizes}")


@dataclass(frozen=True)
class PoolPlan:
    """The slot pool of a GPU job."""

    placement: str  # "device" (CUDA IPC) or "pinned" (host memfd, cudaHostRegister'ed)
    slot_bytes: int  # one frame
    slot_stride_bytes: int  # from one slot's start to the next (device: aligned to SLOT_ALIGN_BYTES)
    n_slots: int
    pool_bytes: int  # what is allocated (device) or registered (pinned: whole pages)
    why: str  # the reason for the placement, for logs and the README

    def slot_offset(self, slot: int) -> int:
        """Byte offset of ``slot`` in the pool."""
        if not 0 <= slot < self.n_slots:
            raise PlanError(f"expected a slot in 0..{self.n_slots - 1}, got {slot}")
        return slot * self.slot_stride_bytes


@dataclass(frozen=True)
class DecodePlan:
    """The decoders of a GPU job: the fallback chain and DALI's mixed settings."""

    chain: tuple[str, ...]  # tried in order per JPEG: "hw-jpeg", "dali-mixed", "cpu"; an error then is a record
    decoder: str  # what create_decoder gets: "dali" (mixed on the device) or "turbo"
    mixed: MixedOptions | None  # DALI's mixed settings; None when no GPU decoder runs
    why: str


@dataclass(frozen=True)
class GpuPlan:
    """Everything the GPU path executes; carried to each worker inside ``Plan.gpu``."""

    device: str  # "cuda:N"
    pool: PoolPlan
    decode: DecodePlan
    feed: str  # "device": the inference process runs batches through streams (torch engine); "host": as on a CPU
    graph_batch_sizes: tuple[int, ...] = field(default=())  # CUDA graphs captured for these sizes; () none
    batch_buffers: int = BATCH_BUFFERS

    def graph_for(self, n: int) -> int:
        """The captured batch size a batch of ``n`` replays (the smallest that holds it), or 0 to run it eagerly."""
        return min((s for s in self.graph_batch_sizes if s >= n), default=0)


@dataclass(frozen=True)
class Step:
    """One operation of the per-batch order; the inference process executes them as listed."""

    stream: str  # "copy", "compute" or "host" (the inference process's thread)
    op: str  # wait | copy | gather | record | compute | sync | release | results
    batch: int  # which batch (0, 1, ...)
    buffer: int = -1  # device batch buffer (copy, gather, compute)
    event: str = ""  # "copied" or "computed" (wait, record, sync)
    event_batch: int = -1  # whose event


def round_up(n: int, to: int) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return -(-n // to) * to


def plan_pool(plan: Plan, facts: DeviceFacts, device_frames: bool, settings: GpuSettings,
              engine_reads_device: bool = True) -> PoolPlan:
    """Place and size the slot pool.

    Args:
        plan: the CPU plan (its frame and slot count are kept).
        facts: what the machine offers.
        device_frames: every producer can leave its frames on the device (DALI mixed, no frame source).
        settings: the user's choice of placement.
        engine_reads_device: the engine takes frames in device memory (the torch engine); others
            (ONNX Runtime) take host arrays.

    Raises:
        PlanError: a device pool was asked for where it cannot work, or would take more than
            ``max_pool_share`` of the device's memory.
    """
    slot, n = plan.frame.nbytes, plan.n_slots
    missing = [why for ok, why in ((device_frames, "a producer writes host frames (CPU decoder or frame source)"),
                                   (engine_reads_device, "the engine reads host arrays (use --engine torch)"),
                                   (facts.ipc, "CUDA IPC is unavailable here"),
                                   (facts.cupy, "CuPy (the 'gpu' extra) is not installed")) if not ok]
    if settings.placement == "device" and missing:
        raise PlanError(f"expected a device pool to be possible, got: {'; '.join(missing)}")
    if settings.placement == "pinned" or missing:
        why = "asked for" if settings.placement == "pinned" else "; ".join(missing)
        return PoolPlan("pinned", slot, slot, n, round_up(slot * n, HOST_PAGE_BYTES), f"pinned host pool: {why}")
    stride = round_up(slot, SLOT_ALIGN_BYTES)
    size = round_up(stride * n, DEVICE_POOL_GRANULE_BYTES)
    if facts.memory_bytes and size > settings.max_pool_share * facts.memory_bytes:
        raise PlanError(f"expected a device pool within {settings.max_pool_share:.0%} of {facts.memory_bytes} bytes "
                        f"of {facts.name or facts.device}, got {size} bytes ({n} slots); use fewer --slots")
    return PoolPlan("device", slot, stride, n, size,
                    "device pool shared by CUDA IPC: frames decoded on the device stay there")


def plan_decode(decoder: str, facts: DeviceFacts, settings: GpuSettings, max_pixels: int) -> DecodePlan:
    """The decoder fallback chain and DALI's mixed settings.

    ``decoder`` is the resolved name (``dali`` or ``turbo``). A JPEG goes to the hardware
    decoder (a ``hw_decoder_load`` share of them, where there is one), else nvJPEG on CUDA
    cores, else the CPU decoder; an input the last one refuses becomes an error record.

    Raises:
        PlanError: ``dali`` was asked for but DALI does not import.
    """
    if decoder != "dali":
        return DecodePlan(("cpu",), decoder, None, f"decoder {decoder!r} runs on the CPU")
    if not facts.dali:
        raise PlanError(f"expected DALI (the 'dali' extra) for --decoder dali on {facts.device}, got none installed")
    width, height = settings.preallocate_width, settings.preallocate_height
    if width * height > max_pixels:  # never preallocate for an image the pixel limit refuses
        scale = (max_pixels / (width * height)) ** 0.5
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    hw = facts.hw_jpeg and settings.hw_decoder_load > 0
    decoded = round_up(width * height * 3, 1 << 20)  # one decoded RGB image, in whole MiB
    mixed = MixedOptions(
        hw_decoder_load=settings.hw_decoder_load if hw else 0.0,
        preallocate_width_hint=width, preallocate_height_hint=height,
        # nvJPEG grows its buffers by these steps: one large image's worth avoids regrowing per image.
        device_memory_padding=max(16 << 20, decoded),
        host_memory_padding=max(8 << 20, round_up(decoded // 4, 1 << 20)),  # JPEG data is well under 1/4 of RGB
    )
    chain = ("hw-jpeg", "dali-mixed", "cpu") if hw else ("dali-mixed", "cpu")
    why = (f"hardware JPEG decoder for {settings.hw_decoder_load:.0%} of JPEGs" if hw else
           "no hardware JPEG decoder" if not facts.hw_jpeg else "hardware JPEG decoder turned off")
    return DecodePlan(chain, "dali", mixed, f"DALI mixed (nvJPEG); {why}; CPU decoder for the rest")


def next_decoder(decode: DecodePlan, fmt: str, failed: tuple[str, ...] = ()) -> str:
    """Which decoder of the chain takes an input of format ``fmt`` after ``failed`` refused it.

    Returns:
        A member of ``decode.chain``, or ``"error"``: the input becomes an error record.
        Only JPEG goes to the GPU decoders; DALI decodes other formats on its CPU threads
        inside the mixed decoder, which the chain counts as ``dali-mixed``.
    """
    for step in decode.chain:
        if step in failed:
            continue
        if step == "hw-jpeg" and fmt != "JPEG":
            continue
        return step
    return "error"


def plan_gpu(plan: Plan, facts: DeviceFacts, decoder: str, engine: str, max_pixels: int,
             settings: GpuSettings = GpuSettings(), batch_size: int = 32) -> Plan:
    """``plan`` with its GPU part (``Plan.gpu``) decided.

    Args:
        plan: the CPU plan from ``make_plan``.
        facts: the device, probed.
        decoder: the resolved decoder name.
        engine: the resolved engine name ("torch" runs batches through the device feed).
        max_pixels: the decoders' pixel limit (bounds the preallocation hints).
        settings: the user's choices.
        batch_size: the job's batch size (the default CUDA graph size).

    Raises:
        PlanError: the settings cannot be met on this machine; the message says why.
    """
    if not facts.device.startswith("cuda"):
        raise PlanError(f"expected a CUDA device for the GPU plan, got {facts.device!r}")
    decode = plan_decode(decoder if plan.decoders else "turbo", facts, settings, max_pixels)
    device_frames = decode.decoder == "dali" and not plan.frame_producer
    feed = "device" if engine == "torch" else "host"
    # Other engines (ONNX Runtime) take host arrays: their frames go to the pinned host pool.
    pool = plan_pool(plan, facts, device_frames, settings, engine_reads_device=feed == "device")
    graphs = (settings.graph_batch_sizes or (batch_size,)) if settings.cuda_graphs and feed == "device" else ()
    if any(n > batch_size for n in graphs):
        raise PlanError(f"expected CUDA graph batch sizes up to the batch size {batch_size}, got {graphs}")
    gpu = GpuPlan(facts.device, pool, decode, feed, tuple(sorted(set(graphs))))
    logger.info("GPU plan on %s: %s; %s; feed %s", facts.device, pool.why, decode.why, feed)
    return replace(plan, gpu=gpu)


def batch_steps(pool: PoolPlan, n: int, buffers: int = BATCH_BUFFERS, previous_pending: bool = True
                ) -> tuple[Step, ...]:
    """The operations of batch ``n``, in the order the inference process runs them.

    ``previous_pending`` says whether batch n-1 still waits for its results: it does not
    once :func:`flush_steps` answered it (the input paused), and then batch n finishes
    nothing but itself.

    Enqueue batch n, free its slots once copied, then finish batch n-1, so that n's copy
    and n's compute are queued behind n-1's compute and the GPU never waits for the host.
    Buffer ``n % buffers`` is reused only after batch ``n - buffers`` computed.

    * pinned: copy stream waits ``computed[n-buffers]``, copies H2D, records ``copied[n]``;
      the compute stream waits ``copied[n]``, computes, records ``computed[n]``.
    * device: the compute stream gathers (a device-to-device ``index_select``), records
      ``copied[n]``, computes, records ``computed[n]``; one stream orders it all.
    Then the host syncs ``copied[n]`` and releases n's slots, syncs ``computed[n-1]`` and
    sends n-1's results.
    """
    if n < 0 or buffers < 2:
        raise PlanError(f"expected batch >= 0 and at least 2 buffers, got {n} and {buffers}")
    b = n % buffers
    if pool.placement == "pinned":
        steps = [Step("copy", "wait", n, b, "computed", n - buffers), Step("copy", "copy", n, b),
                 Step("copy", "record", n, b, "copied", n), Step("compute", "wait", n, b, "copied", n)]
    else:
        steps = [Step("compute", "gather", n, b), Step("compute", "record", n, b, "copied", n)]
    steps += [Step("compute", "compute", n, b), Step("compute", "record", n, b, "computed", n),
              Step("host", "sync", n, b, "copied", n), Step("host", "release", n, b)]
    if n > 0 and previous_pending:
        steps += [Step("host", "sync", n - 1, (n - 1) % buffers, "computed", n - 1),
                  Step("host", "results", n - 1, (n - 1) % buffers)]
    return tuple(s for s in steps if s.event_batch >= 0 or not s.event)


def flush_steps(n: int, buffers: int = BATCH_BUFFERS) -> tuple[Step, ...]:
    """Finish the last batch ``n`` when no batch follows (the input paused or ended)."""
    return (Step("host", "sync", n, n % buffers, "computed", n), Step("host", "results", n, n % buffers))
