"""The `test` hypervisor: guests that exist only as records.

Each guest is a small record (prepared, running or paused, with its ports).
Every call is a simulated monitor command: it may be made slow
(`set_delay`) or made to fail once (`fail_next`), which is how tests put a
thread inside a monitor command for as long as they need and check that no
lock is held meanwhile (the lock-order checker refuses a monitor command
run with a lock held).

With a `state_dir` the records are also kept as files, so a guest outlives
the process that started it, as a real guest outlives a restarted daemon:
the next process finds it with `is_alive()`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nwfilter.conf.model import DomainDef
from nwfilter.domain.hypervisor import HypervisorEnv, PortPlan
from nwfilter.errors import BackendError, StateError
from nwfilter.fileio import SafeDir
from nwfilter.locks import CHECKER, LockOrderChecker


@dataclass
class Guest:
    name: str
    state: str  # 'prepared', 'running', 'paused'
    ports: tuple[PortPlan, ...] = ()


@dataclass
class _Faults:
    delays: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)


class TestHypervisor:
    """In-memory guests with a simulated, optionally slow, monitor."""

    __test__ = False  # not a pytest test class despite the name

    name = "test"

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        checker: LockOrderChecker = CHECKER,
    ) -> None:
        self._state_dir = (
            SafeDir.open(state_dir, what="test hypervisor directory")
            if state_dir is not None else None
        )
        self._sleep = sleep
        self._checker = checker
        self._lock = threading.Lock()  # leaf: guards the records only
        self._guests: dict[str, Guest] = {}
        self._faults = _Faults()
        self.calls: list[tuple[str, str]] = []  # (operation, domain), for tests
        if self._state_dir is not None:
            for name in self._state_dir.names(".json"):
                data = json.loads(self._state_dir.read(name))
                self._guests[data["name"]] = Guest(data["name"], data["state"])

    # -- fault injection ---------------------------------------------------

    def set_delay(self, operation: str, seconds: float) -> None:
        """Make every `operation` ('prepare', 'launch', 'stop', ...) take `seconds`."""
        with self._lock:
            self._faults.delays[operation] = seconds

    def fail_next(self, operation: str, count: int = 1) -> None:
        with self._lock:
            self._faults.failures[operation] = count

    def guests(self) -> dict[str, str]:
        with self._lock:
            return {name: g.state for name, g in sorted(self._guests.items())}

    def guest(self, name: str) -> Guest | None:
        with self._lock:
            return self._guests.get(name)

    # -- the monitor ---------------------------------------------------------

    def _command(self, operation: str, dom: DomainDef) -> None:
        self._checker.check_may_block(f"test monitor '{operation}' of '{dom.name}'")
        with self._lock:
            delay = self._faults.delays.get(operation, 0.0)
            fail = self._faults.failures.get(operation, 0)
            if fail:
                self._faults.failures[operation] = fail - 1
            self.calls.append((operation, dom.name))
        if delay:
            self._sleep(delay)
        if fail:
            raise BackendError(f"test monitor: '{operation}' of domain '{dom.name}' failed")

    def _save(self, guest: Guest | None, name: str) -> None:
        if self._state_dir is None:
            return
        if guest is None:
            self._state_dir.remove(f"{name}.json")
        else:
            self._state_dir.write(
                f"{name}.json", json.dumps({"name": guest.name, "state": guest.state})
            )

    def prepare(self, dom: DomainDef, ports: Sequence[PortPlan]) -> None:
        self._command("prepare", dom)
        with self._lock:
            if dom.name in self._guests:
                raise StateError(f"test guest '{dom.name}' already exists")
            guest = Guest(dom.name, "prepared", tuple(ports))
            self._guests[dom.name] = guest
        self._save(guest, dom.name)

    def _transition(self, dom: DomainDef, want: tuple[str, ...], to: str) -> None:
        with self._lock:
            guest = self._guests.get(dom.name)
            if guest is None or guest.state not in want:
                have = "absent" if guest is None else guest.state
                raise StateError(f"test guest '{dom.name}' is {have}, not {'/'.join(want)}")
            guest.state = to
        self._save(guest, dom.name)

    def launch(self, dom: DomainDef) -> None:
        self._command("launch", dom)
        self._transition(dom, ("prepared",), "running")

    def stop(self, dom: DomainDef) -> None:
        self._command("stop", dom)
        with self._lock:
            self._guests.pop(dom.name, None)
        self._save(None, dom.name)

    def suspend(self, dom: DomainDef) -> None:
        self._command("suspend", dom)
        self._transition(dom, ("running",), "paused")

    def resume(self, dom: DomainDef) -> None:
        self._command("resume", dom)
        self._transition(dom, ("paused",), "running")

    def is_alive(self, dom: DomainDef) -> bool:
        with self._lock:
            guest = self._guests.get(dom.name)
            return guest is not None and guest.state in ("running", "paused")

    def crash(self, name: str) -> None:
        """Make a guest vanish behind the driver's back (tests)."""
        with self._lock:
            self._guests.pop(name, None)
        self._save(None, name)


def make_hypervisor(env: HypervisorEnv) -> TestHypervisor:
    return TestHypervisor(env.run_dir)
