"""Domain jobs: who may change a domain, and how long others wait for it.

This follows libvirt's QEMU threading rules (docs/kbase/internals/
qemu-threads.rst, src/hypervisor/domain_job.c):

* A job is taken with the domain object locked.  While a thread waits for
  it, the domain lock is released (the wait is on a condition bound to the
  domain lock) and the thread must hold no other lock (the checker refuses
  it): a job is held for long periods, so waiting for one while holding a
  lock would hold that lock for as long.
* A *normal* job (query, destroy, suspend, modify, abort, ...) excludes
  every other normal job.  An *async* job (start, save, migration, ...)
  excludes other async jobs; while it runs, only the normal jobs in its
  mask may start (by default query, destroy and abort), and its owner runs
  monitor commands under a *nested* job.  An *agent* job excludes only other
  agent jobs, so a guest-agent call may overlap a normal job.
* A wait gives up after `timeout` (30 s by default, as libvirt's
  VIR_JOB_WAIT_TIME) with `JobTimeoutError` naming the job in the way and
  the API that holds it.  `nowait=True` gives up at once (libvirt's
  BeginJobNowait), for callers that only want to look.
* While a monitor (or agent) command runs, the domain lock is released
  (`enter_monitor()` / `exit_monitor()`); the job keeps other writers out.
  After re-locking, `exit_monitor()` re-checks that the domain is still
  active, since a destroy allowed by an async job's mask may have run
  meanwhile.
* A thread waiting for the job of a domain that is removed gives up with
  `NotFoundError` as soon as it is woken, even while the job is still held.
* Query-only calls (list, state, XML) take no job at all: they read the
  object under its lock and never wait for a job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Protocol

from nwfilter.errors import JobTimeoutError, NotFoundError, StateError
from nwfilter.locks import LevelledLock

JOB_WAIT_TIME = 30.0


class JobKind(Enum):
    NONE = "none"
    QUERY = "query"
    DESTROY = "destroy"
    SUSPEND = "suspend"
    MODIFY = "modify"
    ABORT = "abort"
    MIGRATION_OP = "migration operation"
    ASYNC = "async"  # marks a begin of an async job; never stored as `active`
    ASYNC_NESTED = "async nested"


class AsyncJobKind(Enum):
    NONE = "none"
    MIGRATION_OUT = "migration out"
    MIGRATION_IN = "migration in"
    SAVE = "save"
    DUMP = "dump"
    SNAPSHOT = "snapshot"
    START = "start"
    BACKUP = "backup"


class AgentJobKind(Enum):
    NONE = "none"
    QUERY = "query"
    MODIFY = "modify"


DEFAULT_ASYNC_MASK: frozenset[JobKind] = frozenset(
    {JobKind.QUERY, JobKind.DESTROY, JobKind.ABORT}
)


class JobOwner(Protocol):
    """What the job machinery needs of the object it guards."""

    name: str
    mutex: LevelledLock
    removing: bool

    def is_active(self) -> bool: ...


class DomainJobs:
    """The job slots of one domain object.  Every method expects the
    object's mutex to be held by the caller."""

    def __init__(self, owner: JobOwner) -> None:
        self._owner = owner
        self._cond = owner.mutex.condition()
        self._async_cond = owner.mutex.condition()
        self.active = JobKind.NONE
        self.owner_thread: int | None = None
        self.owner_api: str | None = None
        self.started = 0.0
        self.agent_active = AgentJobKind.NONE
        self.agent_thread: int | None = None
        self.agent_api: str | None = None
        self.agent_started = 0.0
        self.async_job = AsyncJobKind.NONE
        self.async_thread: int | None = None
        self.async_api: str | None = None
        self.async_started = 0.0
        self.mask: frozenset[JobKind] = frozenset()
        self.in_monitor = False
        self.in_agent = False
        self.waiters = 0

    # -- rules -------------------------------------------------------------

    def nested_allowed(self, kind: JobKind) -> bool:
        return self.async_job is AsyncJobKind.NONE or kind is JobKind.NONE or kind in self.mask

    def can_set(self, kind: JobKind, agent: AgentJobKind) -> bool:
        return (kind is JobKind.NONE or self.active is JobKind.NONE) and (
            agent is AgentJobKind.NONE or self.agent_active is AgentJobKind.NONE
        )

    # -- begin / end -------------------------------------------------------

    def begin(
        self,
        kind: JobKind,
        api: str,
        *,
        timeout: float = JOB_WAIT_TIME,
        nowait: bool = False,
    ) -> bool:
        """Take a normal job; False only with `nowait` when it is busy."""
        if kind in (JobKind.NONE, JobKind.ASYNC, JobKind.ASYNC_NESTED):
            raise ValueError(f"not a normal job: {kind.value}")
        return self._begin(kind, AgentJobKind.NONE, AsyncJobKind.NONE, api, timeout, nowait)

    def begin_agent(
        self, kind: AgentJobKind, api: str, *, timeout: float = JOB_WAIT_TIME
    ) -> None:
        if kind is AgentJobKind.NONE:
            raise ValueError("not an agent job")
        self._begin(JobKind.NONE, kind, AsyncJobKind.NONE, api, timeout, False)

    def begin_async(
        self,
        kind: AsyncJobKind,
        api: str,
        *,
        timeout: float = JOB_WAIT_TIME,
        mask: frozenset[JobKind] = DEFAULT_ASYNC_MASK,
    ) -> None:
        if kind is AsyncJobKind.NONE:
            raise ValueError("not an async job")
        self._begin(JobKind.ASYNC, AgentJobKind.NONE, kind, api, timeout, False)
        self.mask = mask | {JobKind.DESTROY}

    def begin_nested(self, kind: AsyncJobKind, *, timeout: float = JOB_WAIT_TIME) -> None:
        """The async job's owner takes the normal slot for a monitor command."""
        if kind is not self.async_job:
            raise StateError(
                f"unexpected async job '{kind.value}', domain '{self._owner.name}' runs "
                f"'{self.async_job.value}'"
            )
        if self.async_thread != threading.get_ident():
            raise StateError(f"this thread does not own the async job of '{self._owner.name}'")
        self._begin(
            JobKind.ASYNC_NESTED,
            AgentJobKind.NONE,
            AsyncJobKind.NONE,
            self.async_api or "",
            timeout,
            False,
        )

    def _begin(
        self,
        kind: JobKind,
        agent: AgentJobKind,
        async_kind: AsyncJobKind,
        api: str,
        timeout: float,
        nowait: bool,
    ) -> bool:
        nested = kind is JobKind.ASYNC_NESTED
        deadline = time.monotonic() + timeout
        what = f"job of domain '{self._owner.name}'"
        # an async job competes with other async jobs and with normal jobs
        slot = JobKind.MODIFY if kind is JobKind.ASYNC else kind
        self.waiters += 1
        try:
            # `removing` is checked after every wake-up: a removed domain's
            # job may stay held for a while, and its waiters must not sit
            # out their whole timeout for an object nobody can find any more.
            while True:
                self._check_not_removed()
                while not nested and not self._async_free_for(kind):
                    if nowait:
                        return False
                    if not self._async_cond.wait_until(deadline, what):
                        self._timeout(kind, agent, async_kind, api, timeout)
                    self._check_not_removed()
                while not self.can_set(slot, agent):
                    if nowait:
                        return False
                    if not self._cond.wait_until(deadline, what):
                        self._timeout(kind, agent, async_kind, api, timeout)
                    self._check_not_removed()
                # an async job may have started while we slept on `_cond`
                if nested or self._async_free_for(kind):
                    break
        finally:
            self.waiters -= 1
        now = time.monotonic()
        me = threading.get_ident()
        if kind is JobKind.ASYNC:
            self.async_job = async_kind
            self.async_thread = me
            self.async_api = api
            self.async_started = now
        elif kind is not JobKind.NONE:
            self.active = kind
            self.owner_thread = me
            self.owner_api = api
            self.started = now
        if agent is not AgentJobKind.NONE:
            self.agent_active = agent
            self.agent_thread = me
            self.agent_api = api
            self.agent_started = now
        return True

    def _check_not_removed(self) -> None:
        if self._owner.removing:
            raise NotFoundError(f"domain '{self._owner.name}' no longer exists")

    def _async_free_for(self, kind: JobKind) -> bool:
        if kind is JobKind.ASYNC:
            return self.async_job is AsyncJobKind.NONE
        return self.nested_allowed(kind)

    def _timeout(
        self,
        kind: JobKind,
        agent: AgentJobKind,
        async_kind: AsyncJobKind,
        api: str,
        timeout: float,
    ) -> None:
        now = time.monotonic()
        holders = []
        if self.async_job is not AsyncJobKind.NONE and (
            kind is JobKind.ASYNC or not self.nested_allowed(kind)
        ):
            holders.append(
                f"async job '{self.async_job.value}' of API '{self.async_api}' "
                f"for {now - self.async_started:.1f}s"
            )
        if self.active is not JobKind.NONE and kind is not JobKind.NONE:
            holders.append(
                f"job '{self.active.value}' of API '{self.owner_api}' "
                f"for {now - self.started:.1f}s"
            )
        if self.agent_active is not AgentJobKind.NONE and agent is not AgentJobKind.NONE:
            holders.append(
                f"agent job '{self.agent_active.value}' of API '{self.agent_api}' "
                f"for {now - self.agent_started:.1f}s"
            )
        wanted = async_kind.value if kind is JobKind.ASYNC else (
            kind.value if kind is not JobKind.NONE else f"agent {agent.value}"
        )
        held = "; ".join(holders) or "another job"
        raise JobTimeoutError(
            f"cannot acquire state change lock of domain '{self._owner.name}' for job "
            f"'{wanted}' of API '{api}' within {timeout:g}s (held by {held})"
        )

    def end(self) -> None:
        """End the normal (or nested) job and wake every waiter."""
        self.active = JobKind.NONE
        self.owner_thread = None
        self.owner_api = None
        self.in_monitor = False
        self._cond.notify_all()

    def end_agent(self) -> None:
        self.agent_active = AgentJobKind.NONE
        self.agent_thread = None
        self.agent_api = None
        self.in_agent = False
        self._cond.notify_all()

    def end_async(self) -> None:
        if self.active is JobKind.ASYNC_NESTED:
            self.end()
        self.async_job = AsyncJobKind.NONE
        self.async_thread = None
        self.async_api = None
        self.mask = frozenset()
        self._async_cond.notify_all()
        self._cond.notify_all()

    def wake_all(self) -> None:
        """Wake every waiter so it re-checks (e.g. the domain is being removed)."""
        self._cond.notify_all()
        self._async_cond.notify_all()

    def owns_job(self) -> bool:
        return self.active is not JobKind.NONE and self.owner_thread == threading.get_ident()

    # -- monitor / agent ---------------------------------------------------

    def enter_monitor(self) -> None:
        """Unlock the domain for a monitor command; the caller owns the job."""
        if not self.owns_job():
            raise StateError(
                f"monitor of domain '{self._owner.name}' used without owning a job"
            )
        self._owner.mutex.checker.check_may_block(
            f"monitor command of domain '{self._owner.name}'", allowed=(self._owner.mutex,)
        )
        self.in_monitor = True
        self._owner.mutex.release()

    def exit_monitor(self) -> None:
        """Re-lock the domain; raise `StateError` (the domain stays locked)
        if it stopped while the command ran."""
        self._relock()
        self._check_active()

    @contextmanager
    def monitor(self, *, require_active: bool = True) -> Iterator[None]:
        """`enter_monitor()` … `exit_monitor()` around the body.  Without
        `require_active` the domain is only re-locked, not re-checked: for a
        start, where the domain becomes active only afterwards, and for a
        stop, which marks it inactive itself."""
        self.enter_monitor()
        try:
            yield
        finally:
            self._relock()
        if require_active:
            self._check_active()

    def _relock(self) -> None:
        self._owner.mutex.acquire()
        self.in_monitor = False

    def _check_active(self) -> None:
        if not self._owner.is_active():
            raise StateError(f"domain '{self._owner.name}' is no longer running")

    @contextmanager
    def agent(self) -> Iterator[None]:
        """Unlock the domain for a guest-agent command; the caller owns an agent job."""
        if self.agent_active is AgentJobKind.NONE or self.agent_thread != threading.get_ident():
            raise StateError(f"agent of domain '{self._owner.name}' used without an agent job")
        self._owner.mutex.checker.check_may_block(
            f"agent command of domain '{self._owner.name}'", allowed=(self._owner.mutex,)
        )
        self.in_agent = True
        self._owner.mutex.release()
        try:
            yield
        finally:
            self._owner.mutex.acquire()
            self.in_agent = False
