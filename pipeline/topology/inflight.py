"""The feeder's ledger: every input sent into the topology and not yet answered.

One feeder per topology sends work and receives every record: the loader of
``wanwu run``, the dispatcher of ``wanwu serve``. Both keep this ledger, so both
follow the same rules when a worker dies:

* A decoder says which inputs it takes (``Taken``) before it decodes them; when
  it dies, exactly those inputs are sent again, once. An input sent again is
  decoded alone (``WorkItem.attempt``), so if it kills its second decoder too it
  alone is blamed: it gets an error record, and a poison image that crashes a
  codec cannot stop a job or a daemon.
* When the inference process dies, everything in flight is lost: inputs that
  can be read again are sent again (an attempt each); frames from a frame source
  cannot, and get error records.
* Inputs queued towards a decoder that died before it took them are lost in its
  socket, and no decoder ever says it took them: after a death, inputs still
  unclaimed a while later are sent again, free the first few times.
* A record is matched to its input by ticket, not key; the first record of a
  ticket wins and later ones (the answer of an input sent again) are dropped.

Not thread-safe: the feeder serialises calls.
"""

from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator

MAX_ATTEMPTS = 2  # an input whose holder dies this many times gets an error record
MAX_UNCLAIMED_RESENDS = 3  # free re-sends of an input no decoder said it took
RESWEEP_S = 1.0  # after a death, inputs unclaimed for half this long are sent again this much later

Holder = tuple[int, int]  # (producer, generation)


@dataclass(eq=False)
class Entry:
    """One input in flight."""

    ticket: int
    key: str
    source: str
    t0: float  # time.time() its bytes or frame were read
    payload: Any = None  # what sending it again takes (bytes, or how to read them); None: it cannot be sent again
    context: Any = None  # the feeder's own (the daemon's request and position in it)
    attempts: int = 1
    sent_at: float = 0.0  # time.monotonic() it was last sent; 0 while it waits in the outbox
    holder: Holder | None = None  # the producer incarnation that said it holds it
    unclaimed_resends: int = 0
    discarded: bool = False  # nobody waits for it any more (its request timed out)


class InFlight:
    """Inputs in flight, the outbox of inputs to (re)send, and the rules above."""

    def __init__(self, max_attempts: int = MAX_ATTEMPTS, max_unclaimed_resends: int = MAX_UNCLAIMED_RESENDS,
                 resweep_s: float = RESWEEP_S) -> None:
        self.max_attempts = max_attempts
        self.max_unclaimed_resends = max_unclaimed_resends
        self.resweep_s = resweep_s
        self._entries: dict[int, Entry] = {}
        self._outbox: collections.deque[Entry] = collections.deque()
        self._tickets = itertools.count()
        self._dead: set[Holder] = set()  # incarnations known to be gone: their late Taken is ignored
        self._resweeps: collections.deque[float] = collections.deque()  # monotonic times of due sweeps

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ticket: int) -> bool:
        return ticket in self._entries

    def entries(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def add(self, key: str, source: str, t0: float, payload: Any = None, context: Any = None,
            queue: bool = True) -> Entry:
        """A new input with a fresh ticket; ``queue`` puts it in the outbox (else the caller sends it now)."""
        entry = Entry(next(self._tickets), key, source, t0, payload, context)
        self._entries[entry.ticket] = entry
        if queue:
            self._outbox.append(entry)
        return entry

    def has_outbox(self) -> bool:
        """Whether an input waits to be (re)sent."""
        while self._outbox and (self._outbox[0].discarded or self._outbox[0].ticket not in self._entries):
            self._outbox.popleft()
        return bool(self._outbox)

    def peek(self) -> Entry | None:
        """The next input to send, left in the outbox until ``sent``."""
        return self._outbox[0] if self.has_outbox() else None

    def sent(self, entry: Entry, now: float, holder: Holder | None = None) -> None:
        """``entry`` left (by its producer ``holder`` if that is known already, as for frames)."""
        if self._outbox and self._outbox[0] is entry:
            self._outbox.popleft()
        entry.sent_at = now
        entry.holder = holder

    def taken(self, tickets: tuple[int, ...], holder: Holder) -> None:
        """A producer says it holds these inputs."""
        if holder in self._dead:
            return  # a message from before its death, read late: what it held is already re-sent
        for ticket in tickets:
            entry = self._entries.get(ticket)
            if entry is not None and entry.sent_at:
                entry.holder = holder

    def complete(self, ticket: int) -> Entry | None:
        """The record of ``ticket`` came: forget it. None if it was answered already (or discarded)."""
        entry = self._entries.pop(ticket, None)
        return None if entry is None or entry.discarded else entry

    def discard(self, tickets: list[int]) -> list[Entry]:
        """Nobody waits for these any more; their records will be dropped. Returns those still in flight."""
        gone = []
        for ticket in tickets:
            entry = self._entries.pop(ticket, None)
            if entry is not None:
                entry.discarded = True
                gone.append(entry)
        return gone

    def lost(self, dead: set[Holder], everything: bool, now: float) -> list[Entry]:
        """Workers died: queue what they held to be sent again; return the inputs that failed for good.

        Args:
            dead: the producer incarnations that are gone.
            everything: the inference process died, so every input in flight is lost.
            now: time.monotonic(); a sweep for inputs lost unclaimed is due ``resweep_s`` later.
        """
        self._dead |= dead
        self._resweeps.append(now + self.resweep_s)
        return self._resend(lambda e: everything or e.holder in dead, math.inf)

    def sweep(self, now: float) -> list[Entry]:
        """Due after a death: send again what no producer took; return the inputs that failed for good."""
        if not self._resweeps or now < self._resweeps[0]:
            return []
        self._resweeps.popleft()
        return self._resend(lambda e: False, now - self.resweep_s / 2)

    def _resend(self, lost, unclaimed_before: float) -> list[Entry]:
        failed: list[Entry] = []
        again: list[Entry] = []
        for entry in self._entries.values():
            if not entry.sent_at:
                continue  # still in the outbox
            unclaimed = entry.holder is None and entry.sent_at <= unclaimed_before
            if unclaimed and entry.payload is not None and entry.unclaimed_resends < self.max_unclaimed_resends:
                entry.unclaimed_resends += 1
            elif lost(entry) or unclaimed:
                # An input that kills its decoder before the Taken leaves still runs out of
                # re-sends here, so a poisonous input cannot crash decoders forever.
                if entry.payload is None or entry.attempts >= self.max_attempts:
                    failed.append(entry)
                    continue
                entry.attempts += 1
            else:
                continue
            entry.sent_at, entry.holder = 0.0, None
            again.append(entry)
        for entry in failed:
            del self._entries[entry.ticket]
        self._outbox.extendleft(reversed(again))  # before new inputs, in their original order
        return failed
