"""NVIDIA DALI decoder: one pipeline run decodes, orients, resizes and crops a whole batch.

On a GPU (``device="cuda:N"``) DALI decodes JPEG with nvJPEG ("mixed" backend); on a
CPU it uses its own thread pool. Headers are probed first (``probe.py``) so that
non-images, truncated headers and decompression bombs never reach DALI, where one
bad sample fails the whole batch. Formats or features DALI gets wrong or lacks
(GIF, alpha that must be composited over white) go to ``TurboDecoder``.

DALI itself is imported when the first pipeline is built, so planning a job can
ask this decoder what it produces without loading DALI.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from wanwu.errors import ConfigError, DecodeError, InputError
from wanwu.kernels.geometry import resize_crop_box
from wanwu.specs import ImageInfo
from wanwu.stages.decoders.base import DecodeConfig, Decoder
from wanwu.stages.decoders.probe import Probe, probe
from wanwu.stages.decoders.turbo import TurboDecoder

logger = logging.getLogger(__name__)

# What fn.decoders.image reads correctly as RGB; the rest goes to TurboDecoder.
_DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM"})
# Where it also applies EXIF orientation (it ignores TIFF's Orientation tag).
_DALI_ORIENTS = frozenset({"JPEG", "PNG", "WEBP"})


class DaliDecoder(Decoder):
    """Decodes batches with one DALI pipeline run; per-item errors never fail the batch.

    Args:
        cfg: geometry, pixel limit and device ("cpu" or "cuda:N").
        max_batch_size: largest batch one pipeline run takes; larger batches are split.
        num_threads: DALI worker threads; defaults to the cores this process may use.
    """

    name = "dali"

    def __init__(
        self, cfg: DecodeConfig, max_batch_size: int = 32, num_threads: int | None = None
    ) -> None:
        super().__init__(cfg)
        import nvidia.dali  # noqa: F401  (fail here, at construction, not on the first image)

        if max_batch_size <= 0:
            raise ConfigError(f"max_batch_size must be positive, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads or len(os.sched_getaffinity(0))
        self._device_id = _device_id(cfg.device)
        self._pipe = None  # nvidia.dali.Pipeline, built on first use, rebuilt after a failure
        self._turbo = TurboDecoder(cfg)

    def _decode(self, data: bytes | memoryview, out: np.ndarray) -> ImageInfo:
        result = self._decode_batch([data], [out])[0]
        if isinstance(result, InputError):
            raise result
        return result

    def _decode_batch(
        self, datas: Sequence[bytes | memoryview], outs: Sequence[np.ndarray]
    ) -> list[ImageInfo | InputError]:
        results: list[ImageInfo | InputError | None] = [None] * len(datas)
        probes: dict[int, Probe] = {}
        for i, data in enumerate(datas):
            try:
                found = _probe(data, self.cfg.max_pixels)
            except InputError as exc:
                results[i] = exc
                continue
            if _dali_can(found):
                probes[i] = found
            else:
                results[i] = self._with_turbo(datas[i], outs[i])
        todo = list(probes)
        for start in range(0, len(todo), self.max_batch_size):
            chunk = todo[start : start + self.max_batch_size]
            self._run_chunk(chunk, datas, outs, probes, results)
        return results  # type: ignore[return-value]  # every slot is filled above

    def _run_chunk(
        self,
        chunk: list[int],
        datas: Sequence[bytes | memoryview],
        outs: Sequence[np.ndarray],
        probes: dict[int, Probe],
        results: list[ImageInfo | InputError | None],
    ) -> None:
        """Decode ``chunk`` in one run; on failure retry each item alone, then with turbo."""
        try:
            self._run(
                [datas[i] for i in chunk], [probes[i] for i in chunk], [outs[i] for i in chunk]
            )
        except RuntimeError as exc:  # DALI reports every failure as RuntimeError
            self._pipe = None  # DALI declares a pipeline invalid after an error
            if len(chunk) > 1:
                logger.debug("DALI failed on a batch of %d; decoding one by one", len(chunk))
                for i in chunk:
                    self._run_chunk([i], datas, outs, probes, results)
                return
            # DALI alone failed: turbo either decodes it (a DALI gap) or names the problem.
            (i,) = chunk
            logger.debug("DALI failed on one %s image (%s); trying turbo", probes[i].format, exc)
            results[i] = self._with_turbo(datas[i], outs[i])
            return
        for i in chunk:
            width, height = probes[i].display_size
            results[i] = ImageInfo(width, height, probes[i].format)

    def _run(
        self, datas: list[bytes | memoryview], found: list[Probe], outs: list[np.ndarray]
    ) -> None:
        """One pipeline run over ``datas``; fills ``outs`` or raises RuntimeError."""
        if self._pipe is None:
            self._pipe = self._build()
        pre = self.cfg.preprocess
        # DALI orients before resizing, so the box is in displayed coordinates; its
        # ROI order follows the HWC layout: (y, x).
        boxes = [resize_crop_box(*p.display_size, pre.resize_shorter, pre.crop) for p in found]
        self._pipe.feed_input("encoded", [np.frombuffer(d, np.uint8) for d in datas])
        self._pipe.feed_input("roi_start", [np.array([b[1], b[0]], np.float32) for b in boxes])
        self._pipe.feed_input("roi_end", [np.array([b[3], b[2]], np.float32) for b in boxes])
        (images,) = self._pipe.run()
        if _on_device(outs[0]):
            for k, out in enumerate(outs):
                # Synchronous per frame: the slot is complete before its Decoded message leaves.
                images[k].copy_to_external(out.__cuda_array_interface__["data"][0], non_blocking=False)
            return
        if self._device_id is not None:
            images = images.as_cpu()  # host slots (the pinned pool): back across PCIe
        for k, out in enumerate(outs):
            out[...] = np.asarray(images[k])

    def _build(self):  # -> nvidia.dali.Pipeline
        """The pipeline: encoded bytes + ROI in, crop x crop x 3 uint8 RGB out."""
        from nvidia.dali import Pipeline, fn, types

        crop = self.cfg.preprocess.crop
        pipe = Pipeline(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self._device_id,
            exec_dynamic=True,
            prefetch_queue_depth=1,  # run() is synchronous: nothing to prefetch
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image(
                encoded,
                device="cpu" if self._device_id is None else "mixed",
                output_type=types.RGB,
                adjust_orientation=True,
                jpeg_fancy_upsampling=True,  # as libjpeg-turbo and Pillow do by default
                **self._mixed_options(),
            )
            # Resizing only the box that survives the center crop is both exact
            # (torchvision's rounding, done in resize_crop_box) and cheaper than
            # resize_shorter + crop, which rounds the offsets differently.
            images = fn.resize(
                images,
                size=(crop, crop),
                roi_start=roi_start,
                roi_end=roi_end,
                antialias=True,
                interp_type=types.INTERP_LINEAR,
            )
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _mixed_options(self) -> dict:
        """The GPU plan's nvJPEG settings (hardware decoder share, preallocation, padding) on the device."""
        m = self.cfg.mixed
        if self._device_id is None or m is None:
            return {}
        return dict(hw_decoder_load=m.hw_decoder_load, preallocate_width_hint=m.preallocate_width_hint,
                    preallocate_height_hint=m.preallocate_height_hint,
                    device_memory_padding=m.device_memory_padding, host_memory_padding=m.host_memory_padding)

    def _with_turbo(self, data: bytes | memoryview, out) -> ImageInfo | InputError:
        try:
            if not _on_device(out):
                return self._turbo.decode_into(data, out)
            # A device slot: decode on the CPU into host memory, then one upload (out is a CuPy array).
            host = np.empty(out.shape, np.uint8)
            info = self._turbo.decode_into(data, host)
            out.set(host)
            return info
        except InputError as exc:
            return exc

    def _shutdown(self) -> None:
        self._pipe = None  # DALI frees its threads and buffers when the pipeline is collected
        self._turbo.shutdown()


def _on_device(out) -> bool:
    """Whether ``out`` is device memory (a CUDA array: the GPU plan's device pool)."""
    return hasattr(out, "__cuda_array_interface__")


def _dali_can(found: Probe) -> bool:
    """Whether DALI decodes this input as our contract says (else TurboDecoder does).

    DALI drops alpha instead of compositing over white, and orients only some formats.
    """
    if found.format not in _DALI_FORMATS or found.has_alpha:
        return False
    return found.orientation == 1 or found.format in _DALI_ORIENTS


def _probe(data: bytes | memoryview, max_pixels: int) -> Probe:
    if len(data) == 0:
        raise DecodeError("expected encoded image bytes, got 0 bytes (empty input)")
    return probe(data, max_pixels)


def _device_id(device: str) -> int | None:
    """``None`` (DALI's CPU-only mode) for "cpu", ``N`` for "cuda:N" or "cuda"."""
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    try:
        return int(index or 0)
    except ValueError:
        raise ConfigError(f"expected a device like 'cuda:0', got {device!r}") from None
