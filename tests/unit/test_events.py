"""The event bus: order, kinds, bounded queues, dropping a subscriber that
falls behind, and the words `nwfilter event` prints."""

from __future__ import annotations

import threading

import pytest

from nwfilter.errors import UnavailableError, ValidationError
from nwfilter.events import Event, EventBus, EventKind, lifecycle, parse_kinds
from nwfilter.locks import Level, LevelledLock


def test_subscribers_get_every_event_in_order_with_seq_and_time() -> None:
    bus = EventBus(clock=lambda: 1234.5)
    first, second = bus.subscribe(), bus.subscribe()
    for name in ("a", "b", "c"):
        bus.publish(EventKind.FILTER_DEFINED, "filter", name, {"rebuilt": []})
    for sub in (first, second):
        events, ended = sub.take()
        assert [(e.seq, e.name, e.time) for e in events] == [
            (1, "a", 1234.5), (2, "b", 1234.5), (3, "c", 1234.5)]
        assert not ended


def test_a_subscriber_gets_only_the_kinds_it_asked_for() -> None:
    bus = EventBus()
    sub = bus.subscribe(parse_kinds(["lifecycle"]))
    bus.publish(EventKind.FILTER_DEFINED, "filter", "web")
    bus.emit(lifecycle("vm1", "started", "booted"))
    assert [e.kind for e in sub.take()[0]] == [EventKind.LIFECYCLE]


def test_unknown_kinds_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="unknown event kind 'nope'"):
        parse_kinds(["lifecycle", "nope"])
    with pytest.raises(ValidationError):
        parse_kinds(["overflow"])  # told to the one dropped, never asked for
    assert parse_kinds(None) is None


def test_a_subscriber_that_falls_behind_is_dropped_with_a_last_overflow_event() -> None:
    bus = EventBus(queue_size=3)
    slow, fast = bus.subscribe(), bus.subscribe()
    seen: list[int] = []
    for i in range(10):
        bus.publish(EventKind.BINDING_CREATED, "port", f"vnet{i}")
        seen.extend(e.seq for e in fast.take()[0])
    assert seen == list(range(1, 11))  # the others keep receiving
    assert bus.subscriber_count == 1 and bus.dropped == 1
    events, ended = slow.take()
    assert [e.kind for e in events] == [EventKind.BINDING_CREATED] * 3 + [EventKind.OVERFLOW]
    assert [e.seq for e in events[:3]] == [1, 2, 3]
    assert ended and slow.take() == ([], True)
    assert "fell behind" in events[-1].text()


def test_publishing_never_waits_for_a_reader_and_takes_no_ordered_lock() -> None:
    bus = EventBus(queue_size=10)
    sub = bus.subscribe()
    # The highest level of the lock order is held, as a publisher may hold
    # any of them: the checker (on in every test) would refuse a levelled lock.
    leaf = LevelledLock("names", Level.LEAF)
    with leaf:
        for _ in range(1000):
            bus.publish(EventKind.REBUILD, "filter", "web", {"ports": ["vnet0"], "ms": 1})
    assert sub.pending == 11  # ten and the overflow notice: bounded


def test_notify_is_called_when_the_queue_becomes_non_empty() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    calls: list[int] = []
    bus.publish(EventKind.FILTER_UNDEFINED, "filter", "early")
    sub.attach(lambda: calls.append(sub.pending))
    assert calls == [1]  # queued before attach: told at once
    bus.publish(EventKind.FILTER_UNDEFINED, "filter", "second")
    assert calls == [1]  # not empty in between: no second call
    sub.take()
    bus.publish(EventKind.FILTER_UNDEFINED, "filter", "third")
    assert calls == [1, 1]


def test_wait_returns_events_from_another_thread_and_ends_on_close() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    thread = threading.Thread(
        target=bus.publish, args=(EventKind.FILTER_DEFINED, "filter", "web"))
    thread.start()
    got: list[Event] = []
    while not got:
        got = sub.wait(5)
    thread.join()
    assert got[0].name == "web"
    sub.close()
    assert sub.wait(5) == [] and bus.subscriber_count == 0


def test_the_number_of_subscribers_is_capped() -> None:
    bus = EventBus(max_subscribers=2)
    subs = [bus.subscribe(), bus.subscribe()]
    with pytest.raises(UnavailableError, match="at most 2 event subscribers"):
        bus.subscribe()
    subs[0].close()
    bus.subscribe()


def test_no_subscriber_costs_no_sequence_number() -> None:
    bus = EventBus()
    bus.publish(EventKind.FILTER_DEFINED, "filter", "unseen")
    sub = bus.subscribe()
    bus.publish(EventKind.FILTER_DEFINED, "filter", "seen")
    assert [e.seq for e in sub.take()[0]] == [1]


@pytest.mark.parametrize(("event", "text"), [
    (lifecycle("vm1", "started", "booted"), "event 'lifecycle' for domain 'vm1': Started Booted"),
    (lifecycle("vm1", "stopped", "destroyed"),
     "event 'lifecycle' for domain 'vm1': Stopped Destroyed"),
    (lifecycle("vm1", "suspended", "paused"),
     "event 'lifecycle' for domain 'vm1': Suspended Paused"),
    (lifecycle("vm1", "defined", "added"), "event 'lifecycle' for domain 'vm1': Defined Added"),
    (Event(EventKind.FILTER_DEFINED, "filter", "web", {"rebuilt": ["a", "b", "c"]}),
     "event 'filter-defined' for filter 'web': 3 ports rebuilt"),
    (Event(EventKind.REBUILD, "filter", "web", {"ports": ["a"], "ms": 2.5}),
     "event 'rebuild' for filter 'web': 1 port rebuilt in 2.5 ms"),
    (Event(EventKind.DRIFT_REPAIRED, "namespace", "lab",
           {"by": [{"command": "nft", "tid": 7, "changes": ["delete table"]}]}),
     "event 'drift-repaired' for namespace 'lab': tables restored after nft (tid 7): "
     "delete table"),
    (Event(EventKind.BINDING_CREATED, "port", "vnet\n0", {"filter": "web", "owner": "vm1"}),
     "event 'binding-created' for port 'vnet\\n0': filter 'web' for domain 'vm1'"),
])
def test_event_lines_are_worded_like_virsh(event: Event, text: str) -> None:
    assert event.text() == text


def test_the_wire_form_round_trips_and_malformed_data_is_refused() -> None:
    event = Event(EventKind.LIFECYCLE, "domain", "vm1", {"event": "started", "detail": "booted"},
                  12.5, 3)
    assert Event.from_json(event.to_json()) == event
    with pytest.raises(ValidationError, match="malformed event"):
        Event.from_json({"kind": "lifecycle"})
    with pytest.raises(ValidationError, match="malformed event"):
        Event.from_json({**event.to_json(), "kind": "nope"})
