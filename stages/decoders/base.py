"""Decoders turn encoded bytes into model-ready uint8 RGB pixels in a buffer they are handed.

Contract: ``decode_into(data, out)`` fills ``out`` (shape ``output_spec().shape``,
uint8, HWC RGB) with the image resized so its shorter side is
``preprocess.resize_shorter`` and center-cropped to ``preprocess.crop``, after EXIF
orientation and conversion of grayscale/CMYK/palette/alpha/16-bit to 8-bit RGB.
It returns the original size as ``ImageInfo`` or raises an ``InputError`` subclass;
it never leaves ``out`` half-described: on error the caller discards the slot.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from wanwu.errors import ConfigError, DecodeError, InputError, StageError
from wanwu.registry import Registry
from wanwu.specs import FrameSpec, ImageInfo, Preprocess

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
# No image within a pixel limit needs more encoded bytes than 16-bit RGBA stored raw (TIFF,
# uncompressed PNG): 8 a pixel, plus room for headers, metadata and an embedded thumbnail.
# A larger file is not such an image, and reading it whole could take all the memory.
MAX_ENCODED_BYTES_PER_PIXEL = 8
ENCODED_SLACK_BYTES = 64 << 20


def max_encoded_bytes(max_pixels: int) -> int:
    """The most bytes an encoded image within ``max_pixels`` may have; larger inputs are refused unread."""
    return max_pixels * MAX_ENCODED_BYTES_PER_PIXEL + ENCODED_SLACK_BYTES


@dataclass(frozen=True)
class MixedOptions:
    """DALI's ``mixed`` (nvJPEG) decoder settings, decided by the GPU plan (``pipeline/topology/gpu.py``)."""

    hw_decoder_load: float = 0.0  # share of JPEGs sent to the hardware decoder (0: none)
    preallocate_width_hint: int = 0  # nvJPEG preallocates for images this wide (0: DALI's default)
    preallocate_height_hint: int = 0  # ...and this high
    device_memory_padding: int = 16 << 20  # bytes nvJPEG's device buffers grow by
    host_memory_padding: int = 8 << 20  # bytes its pinned host buffers grow by
    device_output: bool = False  # frames are left in device memory (outs are CUDA arrays, not NumPy)


@dataclass(frozen=True)
class DecodeConfig:
    """Everything a decoder needs to know, passed explicitly."""

    preprocess: Preprocess = Preprocess()  # geometry of the output
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images before allocating them
    device: str = "cpu"  # "cpu", or "cuda:N" for a GPU decoder (DALI "mixed")
    mixed: MixedOptions | None = None  # DALI mixed settings on a GPU; None: DALI's defaults

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ConfigError(f"max_pixels must be positive, got {self.max_pixels}")


class Decoder(ABC):
    """Base of every decoder. Subclasses implement ``_decode`` (and may ``_decode_batch``)."""

    name: ClassVar[str] = "base"

    def __init__(self, cfg: DecodeConfig) -> None:
        self.cfg = cfg
        self._closed = False

    @classmethod
    def declare_output(cls, cfg: DecodeConfig) -> FrameSpec:
        """Shape, dtype, layout and device of one decoded item, known before anything is built.

        Every decoder here leaves crop x crop x 3 uint8 HWC pixels in host memory
        (the DALI decoder on a GPU copies its frames back); one that leaves them in
        device memory declares so by overriding this.
        """
        return cfg.preprocess.frame

    def output_spec(self) -> FrameSpec:
        """What ``decode_into`` fills (``declare_output`` of this decoder)."""
        return self.declare_output(self.cfg)

    def decode_into(self, data: bytes | memoryview, out: np.ndarray) -> ImageInfo:
        """Decode ``data`` into ``out``. Do not override: implement ``_decode``.

        Raises:
            InputError: ``data`` is not a decodable image within the pixel limit.
            StageError: ``out`` does not match ``output_spec()``.
        """
        self._check_out(out)
        if len(data) == 0:
            raise DecodeError("expected encoded image bytes, got 0 bytes (empty input)")
        try:
            return self._decode(data, out)
        except InputError:
            raise
        except (MemoryError, StageError):
            raise
        except Exception as exc:  # a codec's own error type: the input is bad
            raise DecodeError(f"could not decode image: {type(exc).__name__}: {exc}") from exc

    def decode_batch_into(
        self, datas: Sequence[bytes | memoryview], outs: Sequence[np.ndarray]
    ) -> list[ImageInfo | InputError]:
        """Decode many inputs; one bad input yields its error and spares the others.

        Returns one entry per input, in order: its ``ImageInfo`` or the ``InputError``.
        """
        if len(datas) != len(outs):
            raise StageError(f"expected one output per input, got {len(datas)} and {len(outs)}")
        for out in outs:
            self._check_out(out)
        return self._decode_batch(datas, outs)

    def _decode_batch(
        self, datas: Sequence[bytes | memoryview], outs: Sequence[np.ndarray]
    ) -> list[ImageInfo | InputError]:
        """Hook for decoders that are faster on batches; the default loops."""
        results: list[ImageInfo | InputError] = []
        for data, out in zip(datas, outs):
            try:
                results.append(self.decode_into(data, out))
            except InputError as exc:
                results.append(exc)
        return results

    @abstractmethod
    def _decode(self, data: bytes | memoryview, out: np.ndarray) -> ImageInfo:
        """Decode one input into ``out``; see the module docstring for the contract."""

    def shutdown(self) -> None:
        """Release codec resources. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        """Hook for subclasses holding resources."""

    def _check_out(self, out: np.ndarray) -> None:
        spec = self.output_spec()
        if out.shape != spec.shape or out.dtype != np.uint8:
            raise StageError(
                f"expected an output buffer of shape {spec.shape} uint8, "
                f"got {out.shape} {out.dtype}"
            )


DECODERS: Registry[Decoder] = Registry("decoder")
DECODERS.register("turbo", "wanwu.stages.decoders.turbo:TurboDecoder")
DECODERS.register("dali", "wanwu.stages.decoders.dali:DaliDecoder")


def dali_installed() -> bool:
    """Whether ``nvidia.dali`` can be found (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no "nvidia" package at all, or a module set to None
        return False


def resolve_decoder_name(name: str, device: str = "cpu") -> str:
    """Map ``auto`` to a concrete decoder for ``device``.

    On a CPU libjpeg-turbo with DCT-domain downscaling is about twice DALI's CPU
    decoder on camera-size JPEGs; on a GPU DALI's nvJPEG ("mixed") wins where DALI
    is installed, and without it the CPU decoders feed the GPU (a pinned pool), as
    ``auto`` engines fall back to one whose backend imports.
    """
    if name != "auto":
        return name
    return "dali" if device.startswith("cuda") and dali_installed() else "turbo"


def declare_decoder_output(name: str, cfg: DecodeConfig) -> FrameSpec:
    """What the decoder registered as ``name`` produces for ``cfg``, without building it.

    Imports the decoder's module (each keeps its heavy backend out of module scope).
    """
    return DECODERS.get(resolve_decoder_name(name, cfg.device)).declare_output(cfg)


def create_decoder(name: str, cfg: DecodeConfig) -> Decoder:
    """Build the decoder registered as ``name`` (``auto`` resolved for ``cfg.device``)."""
    return DECODERS.create(resolve_decoder_name(name, cfg.device), cfg)
