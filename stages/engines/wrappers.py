"""The torch module every torch-based engine runs: uint8 NHWC pixels in, logits out.

The torch engine runs it directly and the ONNX Runtime engine exports it, so
both normalise identically. (OpenVINO builds the same steps with its own
``PrePostProcessor`` instead; see ``openvino.py``.)
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class NormalizedInput(nn.Module):
    """Wraps an image model so it takes uint8 NHWC batches.

    ``forward`` maps pixels ``p`` to ``(p / 255 - mean) / std`` per channel, as one
    multiply-add, and hands the model an NCHW tensor in channels_last memory
    format (the NHWC bytes, unmoved), which oneDNN and cuDNN convolve fastest.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
        # Shaped to broadcast over the trailing channel axis of NHWC.
        self.register_buffer("scale", scale.view(1, 1, 1, 3), persistent=False)
        self.register_buffer("shift", shift.view(1, 1, 1, 3), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for ``pixels``, a uint8 tensor of shape (n, h, w, 3)."""
        x = pixels.float() * self.scale + self.shift
        # permute is a view: NCHW shape over NHWC storage is exactly channels_last.
        x = x.permute(0, 3, 1, 2)
        return self.model(x)


def wrap_for_uint8(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``model`` wrapped in ``NormalizedInput``, eval mode, weights in channels_last."""
    wrapped = NormalizedInput(model, mean, std).eval()
    return wrapped.to(memory_format=torch.channels_last)
