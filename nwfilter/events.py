"""The event bus: what happened, told to whoever listens.

Publishers (the engine once the kernel and the files agree, the domain
drivers, the nft monitor, the daemon's periodic audit) call
`EventBus.publish`; subscribers (the daemon's `events.subscribe` streams)
read their own bounded queue.

Publishing never blocks and takes no lock of the documented lock order
(docs/locking.md): it takes the bus's own plain lock, a leaf under which
nothing else is taken, appends the event to each matching queue and
returns.  A subscriber whose queue is full when an event comes is dropped
at once: it gets one last `overflow` event and nothing more, so a reader
that stopped reading costs at most `queue_size` events (shared objects, not
copies) and never slows the publishers down.

An event is a kind, the kind of object it concerns and that object's name,
details (JSON data) and a wall-clock time; `seq` numbers the events the
bus published while anyone listened, from 1 (a subscriber of every kind
sees no gap unless it was dropped).  `to_json`/`from_json`
are the wire form; `text` is the line `nwfilter event` prints, worded like
`virsh event`'s.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nwfilter.errors import UnavailableError, ValidationError
from nwfilter.printable import printable


class EventKind(Enum):
    FILTER_DEFINED = "filter-defined"
    FILTER_UNDEFINED = "filter-undefined"
    BINDING_CREATED = "binding-created"
    BINDING_DELETED = "binding-deleted"
    LIFECYCLE = "lifecycle"
    REBUILD = "rebuild"
    DRIFT_REPAIRED = "drift-repaired"
    PRECONDITION = "precondition"
    AUDIT = "audit"
    OVERFLOW = "overflow"  # only ever the last event of a dropped subscriber


#: what a subscriber may ask for (overflow always comes, to the one dropped)
SUBSCRIBABLE = tuple(k.value for k in EventKind if k is not EventKind.OVERFLOW)


def parse_kinds(names: Iterable[str] | None) -> frozenset[EventKind] | None:
    """The kinds named (None: all); ValidationError names an unknown one."""
    if names is None:
        return None
    kinds: set[EventKind] = set()
    for name in names:
        if name not in SUBSCRIBABLE:
            raise ValidationError(
                f"unknown event kind {printable(name)!r}; known: {', '.join(SUBSCRIBABLE)}"
            )
        kinds.add(EventKind(name))
    return frozenset(kinds) if kinds else None


# virsh's words for libvirt's lifecycle events and their details
# (tools/virsh-domain-event.c); our drivers use a subset of them.
LIFECYCLE_EVENTS: dict[str, str] = {
    "defined": "Defined", "undefined": "Undefined", "started": "Started",
    "suspended": "Suspended", "resumed": "Resumed", "stopped": "Stopped",
    "shutdown": "Shutdown", "crashed": "Crashed",
}
LIFECYCLE_DETAILS: dict[str, dict[str, str]] = {
    "defined": {"added": "Added", "updated": "Updated"},
    "undefined": {"removed": "Removed"},
    "started": {"booted": "Booted"},
    "suspended": {"paused": "Paused"},
    "resumed": {"unpaused": "Unpaused"},
    "stopped": {"shutdown": "Shutdown", "destroyed": "Destroyed", "crashed": "Crashed",
                "failed": "Failed"},
    "shutdown": {"finished": "Finished"},
    "crashed": {"panicked": "Panicked"},
}


@dataclass(frozen=True)
class Event:
    kind: EventKind
    object: str  # what `name` names: filter, port, domain, namespace, stream
    name: str
    details: Mapping[str, Any] = field(default_factory=dict)
    time: float = 0.0
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "time": self.time, "kind": self.kind.value,
            "object": self.object, "name": self.name, "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: Any) -> Event:
        """The event `to_json` gave; ValidationError if `data` is not one."""
        try:
            details = data["details"]
            if not isinstance(details, dict):
                raise TypeError("details is not an object")
            return cls(
                EventKind(data["kind"]), str(data["object"]), str(data["name"]), details,
                float(data["time"]), int(data["seq"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"malformed event: {exc}") from exc

    def text(self) -> str:
        """`event 'KIND' for OBJECT 'NAME': WHAT`, as virsh prints events."""
        head = f"event '{self.kind.value}'"
        if self.name:
            head += f" for {self.object} '{printable(self.name)}'"
        return f"{head}: {printable(_describe(self))}"


def _ports(count: int) -> str:
    return f"{count} port{'' if count == 1 else 's'}"


def _describe(event: Event) -> str:
    d = event.details
    kind = event.kind
    if kind is EventKind.LIFECYCLE:
        what = str(d.get("event", ""))
        detail = str(d.get("detail", ""))
        words = LIFECYCLE_EVENTS.get(what, what)
        return f"{words} {LIFECYCLE_DETAILS.get(what, {}).get(detail, detail)}".rstrip()
    if kind is EventKind.FILTER_DEFINED:
        rebuilt = d.get("rebuilt", [])
        return f"{_ports(len(rebuilt))} rebuilt" if rebuilt else "no port rebuilt"
    if kind is EventKind.FILTER_UNDEFINED:
        return "undefined"
    if kind is EventKind.REBUILD:
        return f"{_ports(len(d.get('ports', [])))} rebuilt in {d.get('ms', 0)} ms"
    if kind is EventKind.BINDING_CREATED:
        owner = d.get("owner")
        return f"filter '{d.get('filter')}'" + (f" for domain '{owner}'" if owner else "")
    if kind is EventKind.BINDING_DELETED:
        return f"filter '{d.get('filter')}' removed"
    if kind is EventKind.DRIFT_REPAIRED:
        by = "; ".join(
            f"{c.get('command') or '?'} (tid {c.get('tid')}): {', '.join(c.get('changes', []))}"
            for c in d.get("by", [])
        )
        return "tables restored after " + (by or "lost kernel events")
    if kind is EventKind.PRECONDITION:
        if d.get("state") == "restored":
            return "layer-3 preconditions hold again"
        return "layer-3 rules are not enforced: " + "; ".join(d.get("problems", []))
    if kind is EventKind.AUDIT:
        finding = d.get("finding", {})
        what = f"{finding.get('kind', '?')} ({finding.get('severity', '?')})"
        if d.get("state") == "resolved":
            return f"finding {what} resolved: {finding.get('message', '')}"
        return f"new finding {what}: {finding.get('message', '')}"
    if kind is EventKind.OVERFLOW:
        return f"this subscriber fell behind ({d.get('queued', '?')} events unread); dropped"
    return ""


def lifecycle(name: str, event: str, detail: str) -> Event:
    """A domain lifecycle event (`event`, `detail`: keys of LIFECYCLE_DETAILS)."""
    return Event(EventKind.LIFECYCLE, "domain", name, {"event": event, "detail": detail})


class Subscription:
    """One subscriber's bounded queue of events.

    `notify` (set by `attach`) is called, outside the bus lock, when the
    queue goes from empty to not empty; it must not block.  After an
    overflow `ended` is true: the queue holds what was left, then the
    overflow event, and nothing more comes."""

    def __init__(self, bus: EventBus, kinds: frozenset[EventKind] | None, limit: int) -> None:
        self._bus = bus
        self.kinds = kinds
        self.limit = limit
        self._queue: deque[Event] = deque()
        self._notify: Callable[[], None] | None = None
        self._ready = threading.Condition(bus._lock)
        self.ended = False  # dropped (overflow) or closed: nothing more is added

    def attach(self, notify: Callable[[], None]) -> None:
        with self._bus._lock:
            self._notify = notify
            pending = bool(self._queue)
        if pending:
            notify()

    def wants(self, event: Event) -> bool:
        return self.kinds is None or event.kind in self.kinds

    def _offer(self, event: Event) -> bool:
        """Queue `event` (bus lock held); False when the subscriber is
        dropped instead (its queue was full)."""
        if len(self._queue) >= self.limit:
            self._queue.append(Event(
                EventKind.OVERFLOW, "stream", "", {"queued": len(self._queue)},
                event.time, event.seq,
            ))
            self.ended = True
            return False
        self._queue.append(event)
        return True

    def take(self, limit: int | None = None) -> tuple[list[Event], bool]:
        """Up to `limit` queued events (all with None), oldest first, and
        whether the subscription has ended with them (nothing more comes)."""
        with self._bus._lock:
            count = len(self._queue) if limit is None else min(limit, len(self._queue))
            taken = [self._queue.popleft() for _ in range(count)]
            return taken, self.ended and not self._queue

    def wait(self, timeout: float | None) -> list[Event]:
        """Every queued event, waiting up to `timeout` s for one; [] after
        the timeout, or when the subscription has ended and all was taken."""
        with self._ready:
            self._ready.wait_for(lambda: self._queue or self.ended, timeout)
            events = list(self._queue)
            self._queue.clear()
            return events

    @property
    def pending(self) -> int:
        with self._bus._lock:
            return len(self._queue)

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    """Publishers in, bounded subscriber queues out; see the module docstring.

    `queue_size` bounds each subscriber's queue; at most `max_subscribers`
    subscribe at once (a further one is refused with `UnavailableError`)."""

    def __init__(
        self,
        *,
        queue_size: int = 1024,
        max_subscribers: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if queue_size < 1 or max_subscribers < 1:
            raise ValidationError("event queue size and subscriber limit must be at least 1")
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self._clock = clock
        # A leaf outside the lock order: held for a few appends, never while
        # anything else is taken or waited for.
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._seq = 0
        self.dropped = 0  # subscribers dropped for falling behind

    def subscribe(self, kinds: frozenset[EventKind] | None = None) -> Subscription:
        with self._lock:
            if len(self._subscribers) >= self.max_subscribers:
                raise UnavailableError(
                    f"nwfilterd serves at most {self.max_subscribers} event subscribers; "
                    "retry later"
                )
            sub = Subscription(self, kinds, self.queue_size)
            self._subscribers.append(sub)
            return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
            sub.ended = True
            sub._ready.notify_all()

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def publish(
        self, kind: EventKind, obj: str, name: str, details: Mapping[str, Any] | None = None
    ) -> None:
        self.emit(Event(kind, obj, name, dict(details or {})))

    def emit(self, event: Event) -> None:
        """Publish `event` (its time and seq are set here).  Never blocks."""
        woken: list[Callable[[], None]] = []
        with self._lock:
            if not self._subscribers:
                return
            self._seq += 1
            event = Event(event.kind, event.object, event.name, event.details,
                          self._clock(), self._seq)
            for sub in list(self._subscribers):
                if not sub.wants(event):
                    continue
                was_empty = not sub._queue
                if not sub._offer(event):
                    self._subscribers.remove(sub)
                    self.dropped += 1
                if was_empty or sub.ended:
                    sub._ready.notify_all()
                    if sub._notify is not None:
                        woken.append(sub._notify)
        for notify in woken:
            notify()
