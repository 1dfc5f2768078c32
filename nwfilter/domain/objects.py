"""Domain objects and the list that finds them.

A `DomainObj` is one domain of one driver: its definition (the live one
while it runs, plus the persistent one waiting for the next start), its
state, its id, its ports and its job slots.  It is guarded by its own mutex
(`Level.DOMAIN`) and kept alive by an explicit reference count, as in
libvirt's virDomainObj: a lookup returns the object locked and referenced,
and the caller ends with `end_api()` (unlock, unreference).

The `DomainObjList` indexes objects by name, UUID and id.  Its membership is
guarded by the driver lock it is given (`Level.DRIVER`); a lookup takes that
lock, finds the object, references and locks it, then drops the driver lock
at once, so the driver lock is never held while waiting for anything but a
short domain-lock hold.  Removing an object unlinks it (no new lookup finds
it) and marks it `removing` (a thread queued for its job gives up); the
object's release callback runs only when the last holder let go.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from uuid import UUID

from nwfilter.conf.model import DomainDef
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.jobs import DomainJobs
from nwfilter.errors import ConflictError, NotFoundError, StateError
from nwfilter.locks import Level, LevelledLock


class DomainState(Enum):
    """libvirt's virDomainState, valued as `virsh domstate` prints it."""

    NOSTATE = "no state"
    RUNNING = "running"
    BLOCKED = "idle"
    PAUSED = "paused"
    SHUTDOWN = "in shutdown"
    SHUTOFF = "shut off"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"


ACTIVE_STATES = frozenset(
    {DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED, DomainState.SHUTDOWN,
     DomainState.PMSUSPENDED}
)


class DomainObj:
    """One domain.  Fields other than `name`/`uuid`/`mutex` are read and
    written with `mutex` held."""

    def __init__(
        self,
        definition: DomainDef,
        *,
        persistent: bool,
        on_release: Callable[[DomainObj], None] | None = None,
    ) -> None:
        self.name = definition.name
        self.uuid = definition.uuid
        self.mutex = LevelledLock(f"domain:{definition.name}", Level.DOMAIN)
        self.definition = definition  # live definition while active
        self.new_def: DomainDef | None = None  # next persistent definition while active
        self.persistent = persistent
        self.autostart = False
        self.state = DomainState.SHUTOFF
        self.reason = "unknown"
        self.id = -1
        self.ports: tuple[PortPlan, ...] = ()
        self.removing = False
        self.job = DomainJobs(self)
        self._refs = 1
        self._refs_lock = threading.Lock()  # leaf: guards only the counter
        self._on_release = on_release

    # -- reference counting -------------------------------------------------

    def ref(self) -> DomainObj:
        with self._refs_lock:
            if self._refs <= 0:
                raise StateError(f"domain object '{self.name}' used after release")
            self._refs += 1
        return self

    def unref(self) -> None:
        with self._refs_lock:
            self._refs -= 1
            last = self._refs == 0
        if last and self._on_release is not None:
            self._on_release(self)

    @property
    def refs(self) -> int:
        with self._refs_lock:
            return self._refs

    # -- locking ---------------------------------------------------------------

    def lock(self) -> None:
        self.mutex.acquire()

    def unlock(self) -> None:
        self.mutex.release()

    def end_api(self) -> None:
        """Unlock and unreference: how every API call lets go of a lookup."""
        self.mutex.release()
        self.unref()

    @contextmanager
    def locked(self) -> Iterator[DomainObj]:
        self.mutex.acquire()
        try:
            yield self
        finally:
            self.mutex.release()

    # -- state -------------------------------------------------------------------

    def is_active(self) -> bool:
        return self.id >= 0

    def set_state(self, state: DomainState, reason: str) -> None:
        self.state = state
        self.reason = reason

    def persistent_def(self) -> DomainDef:
        """The definition the next start uses."""
        return self.new_def if self.new_def is not None else self.definition


class DomainObjList:
    """Domains of one driver by name, UUID and id; membership guarded by
    the driver lock."""

    def __init__(self, lock: LevelledLock) -> None:
        self.lock = lock
        self._by_name: dict[str, DomainObj] = {}
        self._by_uuid: dict[UUID, DomainObj] = {}

    # -- membership (caller holds `lock` for the *_locked variants) --------

    def add_locked(
        self,
        definition: DomainDef,
        *,
        persistent: bool,
        on_release: Callable[[DomainObj], None] | None = None,
    ) -> tuple[DomainObj, bool]:
        """Find or create the object for `definition`; returned locked and
        referenced, with True if it was created.  A name or UUID held by a
        different domain is a conflict."""
        by_name = self._by_name.get(definition.name)
        by_uuid = self._by_uuid.get(definition.uuid)
        if by_name is not None and by_name.uuid != definition.uuid:
            raise ConflictError(
                f"domain '{definition.name}' already exists with uuid {by_name.uuid}"
            )
        if by_uuid is not None and by_uuid.name != definition.name:
            raise ConflictError(
                f"domain uuid {definition.uuid} is already used by domain '{by_uuid.name}'"
            )
        if by_name is not None:
            by_name.ref()
            by_name.lock()
            return by_name, False
        obj = DomainObj(definition, persistent=persistent, on_release=on_release)
        obj.ref()
        obj.lock()
        self._by_name[obj.name] = obj
        self._by_uuid[obj.uuid] = obj
        return obj, True

    def add(
        self,
        definition: DomainDef,
        *,
        persistent: bool,
        on_release: Callable[[DomainObj], None] | None = None,
    ) -> tuple[DomainObj, bool]:
        with self.lock:
            return self.add_locked(definition, persistent=persistent, on_release=on_release)

    def remove(self, obj: DomainObj) -> None:
        """Unlink a locked, inactive object.  The caller keeps its own
        reference (and lock); the list's reference is dropped, so the object
        is released once every other holder let go.  Takes the driver lock,
        so the caller must not hold the domain lock across it: it is given
        the object locked and unlocks, unlinks, re-locks."""
        if obj.is_active():
            raise StateError(f"cannot remove active domain '{obj.name}'")
        obj.removing = True
        obj.unlock()
        try:
            with self.lock:
                self.remove_locked(obj)
        finally:
            obj.lock()
        obj.job.wake_all()

    def remove_locked(self, obj: DomainObj) -> None:
        """Unlink `obj` (driver lock held, domain lock not held)."""
        obj.removing = True
        if self._by_name.get(obj.name) is obj:
            del self._by_name[obj.name]
            del self._by_uuid[obj.uuid]
            obj.unref()

    # -- lookups: returned locked and referenced ---------------------------

    def _found(self, obj: DomainObj | None, what: str) -> DomainObj:
        if obj is None:
            raise NotFoundError(f"domain not found: no domain with matching {what}")
        obj.ref()
        return obj

    def lookup_by_name(self, name: str) -> DomainObj:
        with self.lock:
            obj = self._found(self._by_name.get(name), f"name '{name}'")
            obj.lock()
        return obj

    def lookup_by_uuid(self, uuid: UUID) -> DomainObj:
        with self.lock:
            obj = self._found(self._by_uuid.get(uuid), f"uuid '{uuid}'")
            obj.lock()
        return obj

    def lookup_by_id(self, domid: int) -> DomainObj:
        with self.lock:
            match = None
            for obj in self._by_name.values():
                # reading `id` without the domain lock is a hint only; it is
                # confirmed below with the lock held
                if obj.id == domid:
                    match = obj
                    break
            found = self._found(match, f"id {domid}")
            found.lock()
        if found.id != domid:
            found.end_api()
            raise NotFoundError(f"domain not found: no domain with matching id {domid}")
        return found

    def find_locked(self, name: str) -> DomainObj | None:
        """The object called `name`, unreferenced and unlocked (driver lock held)."""
        return self._by_name.get(name)

    def snapshot(self) -> list[DomainObj]:
        """Every object, referenced and unlocked, sorted by name; the caller
        unrefs each."""
        with self.lock:
            return [obj.ref() for _, obj in sorted(self._by_name.items())]

    def __len__(self) -> int:
        return len(self._by_name)
