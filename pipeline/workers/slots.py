"""The slots a producer (a decoder, or the loader reading a frame source) owns, and which are free."""

from __future__ import annotations

from collections import deque

import zmq

from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.messages import Release
from wanwu.pipeline.topology.plan import Plan


class ProducerSlots:
    """Producer ``producer``'s slots in its current generation (``Plan.slot_range``).

    A producer writes only into a slot it holds free; a slot becomes free again when
    the inference process releases it. Releases of another generation's slots (a
    predecessor's, or the half left behind by a reset) are not ours to reuse.
    """

    def __init__(self, plan: Plan, producer: int, generation: int) -> None:
        self.plan = plan
        self.producer = producer
        self.reset(generation)

    def reset(self, generation: int) -> None:
        """Move on to ``generation``'s half, every slot of it free."""
        self.generation = generation
        self.mine = self.plan.slot_range(self.producer, generation)
        self.free: deque[int] = deque(self.mine)

    def __len__(self) -> int:
        return len(self.free)

    def take(self) -> int:
        """A free slot, now held (raises IndexError when none is free)."""
        return self.free.popleft()

    def give_back(self, slot: int) -> None:
        """A slot taken but not handed over (its input failed)."""
        self.free.append(slot)

    def take_releases(self, sock: zmq.Socket) -> None:
        """Free the slots the inference process released (waiting on ``sock``)."""
        for msg in transport.waiting(sock):
            assert isinstance(msg, Release)
            self.free.extend(s for s in msg.slots if s in self.mine)
