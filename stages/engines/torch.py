"""The PyTorch engine: eager mode, channels_last, bf16 autocast where it pays.

Slower than OpenVINO on CPUs, but it runs every model timm can build, and on
CUDA it is the default engine.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch

from wanwu.errors import EngineError

from wanwu.stages.engines.base import Engine
from wanwu.stages.engines.hw import cpu_count, cpu_precision, cpuinfo_text
from wanwu.stages.engines.wrappers import wrap_for_uint8

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine(Engine):
    """Runs ``model.build_torch()`` wrapped to take uint8 NHWC batches.

    Precision: on CPU, bf16 autocast when ``cfg.precision`` is ``bf16``, or
    ``auto`` and the CPU has native bf16; on CUDA, ``auto`` means bf16 where the
    GPU supports it, else fp16. Weights stay float32; autocast casts per op.
    With ``auto``, near ties are recomputed without autocast (see ``EngineConfig``).
    """

    name = "torch"

    def _load(self) -> None:
        self._device = self._resolve_device()
        # Threads are process-wide in torch; an inference process runs one engine.
        torch.set_num_threads(self.cfg.threads or cpu_count())
        self._compute = self._resolve_precision()  # what autocast runs in
        self._recheck = self._compute != "fp32" and self.cfg.precision == "auto"
        self.precision = f"{self._compute}+fp32" if self._recheck else self._compute
        pre = self.model.preprocess
        module = wrap_for_uint8(self.model.build_torch(), pre.mean, pre.std)
        self._module = module.to(self._device)
        logger.info(
            "torch engine: %s on %s, %s, %d threads",
            self.model.name, self._device, self.precision, torch.get_num_threads(),
        )

    def _resolve_device(self) -> torch.device:
        try:
            device = torch.device(self.cfg.device)
        except RuntimeError as exc:
            raise EngineError(f"expected a torch device like cpu or cuda:0, got {self.cfg.device!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"expected a CUDA device for {self.cfg.device!r}, torch sees none")
        if device.type not in ("cpu", "cuda"):
            raise EngineError(f"expected device cpu or cuda:N, got {self.cfg.device!r}")
        return device

    def _resolve_precision(self) -> str:
        wanted = self.cfg.precision
        if self._device.type == "cuda":
            if wanted == "fp32":
                return "fp32"
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return cpu_precision(wanted, cpuinfo_text())

    def _autocast(self) -> Any:
        if self._compute == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=_DTYPES[self._compute])

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, self._autocast())

    def _infer_exact(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, contextlib.nullcontext())

    def _run(self, batch: np.ndarray, precision: Any) -> np.ndarray:
        if not batch.flags.writeable:
            # torch.from_numpy warns on read-only arrays (e.g. a shared-memory view)
            # since it cannot promise not to write; a copy is 5 MB at batch 32.
            batch = batch.copy()
        pixels = torch.from_numpy(np.ascontiguousarray(batch))
        with torch.inference_mode(), precision:
            pixels = pixels.to(self._device, non_blocking=True)
            logits = self._module(pixels)
        return logits.float().cpu().numpy()

    # ---- the device feed (pipeline/workers/gpu_feed.py): batches already on the GPU, the caller's streams

    def capture_graphs(self, sizes: tuple[int, ...]) -> None:
        """Capture CUDA graphs of the autocast forward for these batch sizes (CUDA only)."""
        from wanwu.stages.engines.torch_cuda import CudaGraphs

        self._graphs = CudaGraphs(self._forward, self.input_spec().shape, self._device, sizes) if sizes else None

    def submit_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on the device) for a uint8 NHWC batch on the device, enqueued on the
        current stream without synchronising. Valid until the next call with the same batch size."""
        from wanwu.stages.engines.torch_cuda import check_device_batch

        check_device_batch(pixels, self.input_spec().shape, self._device, self.cfg.max_batch_size)
        graphs = getattr(self, "_graphs", None)
        return graphs.replay(pixels) if graphs is not None and pixels.shape[0] in graphs else self._forward(pixels)

    def warm_recheck(self, max_batch: int) -> None:
        """Run the fp32 recheck once at each row count it can take (CUDA: before the first batch).

        cuDNN and cuBLAS choose (and may compile) their kernels on a shape's first run, which
        can cost far more than the run itself; without this the first batches of a job would
        each pay for a new shape. No-op without a recheck.
        """
        if not self._recheck:
            return
        from wanwu.stages.engines.torch_cuda import recheck_sizes

        shape = self.input_spec().shape
        with torch.inference_mode():
            for n in recheck_sizes(max_batch):
                self._module(torch.zeros((n, *shape), dtype=torch.uint8, device=self._device))

    def recheck_device(self, pixels: torch.Tensor, logits: np.ndarray) -> np.ndarray:
        """``logits`` of ``pixels`` with the near ties recomputed in fp32 (as ``infer`` does on the host)."""
        from wanwu.stages.engines.torch_cuda import padded_rows, recheck_rows

        self.last_exact = recheck_rows(logits, self.cfg.margin_for(self._compute)) if self._recheck else \
            np.empty(0, np.intp)
        if self.last_exact.size:
            k = self.last_exact.size
            rows = torch.as_tensor(padded_rows(self.last_exact, pixels.shape[0]), device=self._device)
            with torch.inference_mode():
                exact = self._module(pixels.index_select(0, rows))[:k].float().cpu().numpy()
            logits = np.array(logits)
            logits[self.last_exact] = exact
            self.rechecked += int(self.last_exact.size)
        return logits

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return self._module(pixels).float()

    def _shutdown(self) -> None:
        self._graphs = None
        self._module = None
        if getattr(self, "_device", None) is not None and self._device.type == "cuda":
            torch.cuda.empty_cache()
