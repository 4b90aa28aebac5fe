"""The feeder's ledger, driven by hand: what is sent again when a worker dies, and what fails."""

from __future__ import annotations

from wanwu.pipeline.topology.inflight import InFlight


def send_all(ledger: InFlight, now: float = 1.0) -> list:
    sent = []
    while (entry := ledger.peek()) is not None:
        ledger.sent(entry, now)
        sent.append(entry)
    return sent


def test_first_record_wins_and_later_ones_are_dropped():
    ledger = InFlight()
    a = ledger.add("a.jpg", "src", 0.0, payload=b"a")
    send_all(ledger)
    assert ledger.complete(a.ticket) is a
    assert ledger.complete(a.ticket) is None  # the answer of a copy sent again
    assert len(ledger) == 0


def test_a_dead_decoder_resends_exactly_what_it_held_once_then_fails_it():
    ledger = InFlight()
    a, b, c = (ledger.add(k, "src", 0.0, payload=k.encode()) for k in ("a", "b", "c"))
    send_all(ledger)
    ledger.taken((a.ticket, b.ticket), (0, 0))
    ledger.taken((c.ticket,), (1, 0))
    assert ledger.lost({(0, 0)}, everything=False, now=2.0) == []
    again = send_all(ledger, now=2.0)
    assert [e.key for e in again] == ["a", "b"] and all(e.attempts == 2 for e in again)
    ledger.taken((a.ticket,), (0, 1))
    ledger.taken((b.ticket,), (0, 1))
    failed = ledger.lost({(0, 1)}, everything=False, now=3.0)
    assert sorted(e.key for e in failed) == ["a", "b"]  # their second holder died too
    assert ledger.peek() is None and len(ledger) == 1 and c.ticket in ledger


def test_a_taken_message_read_after_its_senders_death_is_ignored():
    ledger = InFlight()
    a = ledger.add("a", "src", 0.0, payload=b"a")
    send_all(ledger)
    ledger.taken((a.ticket,), (0, 0))
    ledger.lost({(0, 0)}, everything=False, now=2.0)
    send_all(ledger, now=2.0)
    ledger.taken((a.ticket,), (0, 0))  # late: from the dead incarnation
    assert a.holder is None
    ledger.taken((a.ticket,), (0, 1))
    assert a.holder == (0, 1)


def test_inference_death_resends_bytes_and_fails_frames():
    ledger = InFlight()
    image = ledger.add("photo.jpg", "src", 0.0, payload=b"jpeg")
    frame = ledger.add("cam/000001", "cam", 0.0, queue=False)  # a frame: nothing to send again
    send_all(ledger)
    ledger.taken((image.ticket,), (0, 0))
    ledger.sent(frame, 1.0, holder=(2, 0))
    failed = ledger.lost({(0, 0), (2, 0)}, everything=True, now=2.0)
    assert failed == [frame]
    assert ledger.peek() is image and image.attempts == 2


def test_unclaimed_inputs_are_sent_again_free_a_few_times_after_a_death():
    ledger = InFlight(max_unclaimed_resends=2, resweep_s=1.0)
    a = ledger.add("a", "src", 0.0, payload=b"a")
    send_all(ledger, now=10.0)  # no decoder says it took it: it may sit in the dead decoder's queue
    assert ledger.lost(set(), everything=False, now=10.0) == []
    assert ledger.peek() is a and (a.attempts, a.unclaimed_resends) == (1, 1)  # sent again, free
    send_all(ledger, now=10.7)
    assert ledger.sweep(10.9) == [] and ledger.peek() is None  # the sweep is not due yet
    assert ledger.sweep(11.0) == [] and ledger.peek() is None  # due, but sent too recently to count as lost
    ledger.lost(set(), everything=False, now=11.5)  # another death: still unclaimed, sent again, free
    assert ledger.peek() is a and (a.attempts, a.unclaimed_resends) == (1, 2)
    send_all(ledger, now=13.0)
    ledger.lost(set(), everything=False, now=14.0)  # free re-sends used up: now it costs an attempt
    assert (a.attempts, a.unclaimed_resends) == (2, 2)
    send_all(ledger, now=14.0)
    assert ledger.sweep(15.0) == [a]  # unclaimed again after its last attempt: it fails
    assert len(ledger) == 0


def test_discarded_inputs_leave_the_outbox_and_their_records_are_dropped():
    ledger = InFlight()
    a = ledger.add("a", "src", 0.0, payload=b"a")
    b = ledger.add("b", "src", 0.0, payload=b"b")
    ledger.discard([a.ticket])
    assert ledger.peek() is b
    assert ledger.complete(a.ticket) is None and len(ledger) == 1


def test_resent_inputs_go_before_new_ones_in_their_order():
    ledger = InFlight()
    first = [ledger.add(k, "src", 0.0, payload=b"x") for k in ("a", "b")]
    send_all(ledger)
    for e in first:
        ledger.taken((e.ticket,), (0, 0))
    late = ledger.add("c", "src", 0.0, payload=b"c")
    ledger.lost({(0, 0)}, everything=False, now=2.0)
    assert [e.key for e in send_all(ledger)] == ["a", "b", "c"] and late.attempts == 1
