"""When the inference process runs a batch: the dynamic-batching policy.

Two clocks decide, as in Triton's dynamic batcher:

* ``max_queue_delay_ms``: the oldest waiting image runs within this long (the
  daemon's latency bound);
* ``idle_flush_ms``: a partial batch runs once no image has arrived for this
  long (the batch job: its input stream has paused or ended).

A full batch, or a preferred size reached, runs at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wanwu.errors import ConfigError


@dataclass(frozen=True)
class BatchPolicy:
    """Sizes and delays for coalescing decoded images into batches."""

    max_batch_size: int = 32  # never more images per engine call
    max_queue_delay_ms: float = math.inf  # oldest image's longest wait for company
    idle_flush_ms: float = 50.0  # run what is waiting once the input pauses this long
    preferred_batch_sizes: tuple[int, ...] = ()  # sizes worth running without waiting for more

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0:
            raise ConfigError(f"max_batch_size must be positive, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0 or self.idle_flush_ms < 0:
            raise ConfigError(
                f"delays must be >= 0, got max_queue_delay_ms={self.max_queue_delay_ms}, "
                f"idle_flush_ms={self.idle_flush_ms}"
            )
        bad = [p for p in self.preferred_batch_sizes if not 0 < p <= self.max_batch_size]
        if bad:
            raise ConfigError(f"preferred batch sizes must be in 1..{self.max_batch_size}, got {bad}")

    def take(self, pending: int, oldest_age_s: float, idle_s: float) -> int:
        """How many waiting images to run now (0: keep waiting).

        Args:
            pending: images waiting.
            oldest_age_s: how long the oldest has waited.
            idle_s: time since the last image arrived.
        """
        if pending <= 0:
            return 0
        if pending >= self.max_batch_size:
            return self.max_batch_size
        if (oldest_age_s * 1000.0 >= self.max_queue_delay_ms) or (idle_s * 1000.0 >= self.idle_flush_ms):
            return pending
        fitting = [p for p in self.preferred_batch_sizes if p <= pending]
        return max(fitting) if fitting else 0

    def wait_s(self, pending: int, oldest_age_s: float, idle_s: float) -> float:
        """How long to wait for more images before ``take`` could say yes on time alone."""
        if pending <= 0:
            return 0.2
        left = min(self.max_queue_delay_ms / 1000.0 - oldest_age_s, self.idle_flush_ms / 1000.0 - idle_s)
        return max(0.0, left)
