"""Group commit of binding creates: requests that arrive together share one
backend transaction, and each keeps its own outcome.

To make "arrive together" certain rather than likely, a test holds the
filter pool for writing (the first lock a commit takes): the leader then
waits for it with its request still queued, every other request queues
behind it, and releasing the pool lets one commit take them all.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from nwfilter.backends.memory import MemoryBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.domain.objects import DomainState
from nwfilter.engine import Engine
from nwfilter.errors import (
    BackendError,
    ConflictError,
    LockOrderError,
    NwfilterError,
    UnresolvedError,
)
from nwfilter.groupcommit import CommitQueue, Pending
from nwfilter.locks import CHECKER
from tests.unit.domain.conftest import domain_xml, make_world

STOCK = Path(__file__).resolve().parents[2] / "filters"
WAIT = 10.0  # seconds a test waits for threads to queue before it gives up


def make(n: int, filter_name: str = "clean-traffic", portdev: str | None = None) -> BindingDef:
    return BindingDef(
        f"vm{n}", uuid.UUID(int=n + 1), portdev or f"vnet{n}",
        f"52:54:00:00:{n // 256:02x}:{n % 256:02x}",
        FilterRef(filter_name, (Parameter("IP", f"10.0.{n // 256}.{n % 256}"),)),
    )


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    eng.start()
    yield eng
    eng.close()


def memory(engine: Engine) -> MemoryBackend:
    assert isinstance(engine.backend, MemoryBackend)
    return engine.backend


class Calls:
    """Calls run in threads; each one's exception (None: it succeeded)."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: dict[int, BaseException | None] = {}

    def start(self, key: int, call: Callable[[], object]) -> None:
        def run() -> None:
            try:
                call()
                self.errors[key] = None
            except BaseException as exc:
                self.errors[key] = exc

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self) -> dict[int, BaseException | None]:
        for thread in self.threads:
            thread.join(WAIT)
            assert not thread.is_alive(), "a call never returned"
        return self.errors


def wait_queued(queue: CommitQueue[tuple[BindingDef, ...]], count: int) -> None:
    deadline = time.monotonic() + WAIT
    while queue.pending() < count:
        assert time.monotonic() < deadline, f"only {queue.pending()} of {count} queued"
        time.sleep(0.005)


@contextmanager
def held_commit(engine: Engine) -> Iterator[None]:
    """Keep every commit waiting (for the pool) until the block ends."""
    with engine.pool.lock.write():
        yield


def start_in_order(engine: Engine, calls: Calls, items: Sequence[Callable[[], object]]) -> None:
    """Start `items` one after another, each queued before the next starts,
    so the batch holds them in this order."""
    for n, call in enumerate(items):
        calls.start(n, call)
        wait_queued(engine.create_queue, n + 1)


# -- many creates, one transaction -------------------------------------------------


def test_creates_that_arrive_together_share_one_transaction(engine: Engine) -> None:
    be = memory(engine)
    before = be.transactions
    calls = Calls()
    n = 32
    with held_commit(engine):
        for i in range(n):
            calls.start(i, lambda i=i: engine.create_bindings([make(i)]))  # type: ignore[misc]
        wait_queued(engine.create_queue, n)
    assert calls.join() == dict.fromkeys(range(n))
    assert be.transactions - before == 1  # 32 requests, one transaction
    assert engine.create_queue.requests == n and engine.create_queue.batches == 1
    assert set(be.ports()) == {f"vnet{i}" for i in range(n)}
    names = sorted(p.name for p in (engine.root / "run" / "bindings").glob("*.xml"))
    assert names == sorted(f"vnet{i}.xml" for i in range(n))


def test_a_burst_of_creates_takes_fewer_transactions_than_requests(engine: Engine) -> None:
    be = memory(engine)
    before = be.transactions
    n = 64
    barrier = threading.Barrier(n)
    calls = Calls()

    def create(i: int) -> None:
        barrier.wait(WAIT)
        engine.create_bindings([make(i)])

    for i in range(n):
        calls.start(i, lambda i=i: create(i))  # type: ignore[misc]
    assert calls.join() == dict.fromkeys(range(n))
    assert set(be.ports()) == {f"vnet{i}" for i in range(n)}
    # every batch is one transaction; how many batches form depends on timing
    assert be.transactions - before == engine.create_queue.batches <= n
    assert engine.create_queue.requests == n
    print(f"\n{n} concurrent creates: {engine.create_queue.batches} transactions")


def test_a_lone_create_commits_at_once(engine: Engine) -> None:
    be = memory(engine)
    before = be.transactions
    engine.create_bindings([make(1)])
    assert be.transactions - before == 1 and be.ports() == ("vnet1",)
    assert engine.create_queue.pending() == 0


# -- each request its own outcome -----------------------------------------------------


def test_a_bad_request_fails_alone_with_its_own_error(engine: Engine) -> None:
    be = memory(engine)
    engine.create_bindings([make(40)])
    before = be.transactions
    calls = Calls()
    with held_commit(engine):
        start_in_order(engine, calls, [
            lambda: engine.create_bindings([make(1)]),
            lambda: engine.create_bindings([make(2, filter_name="no-such-filter")]),
            lambda: engine.create_bindings([make(3)]),
            # two ports, one of them bad: the whole request fails, nothing of it stays
            lambda: engine.create_bindings([make(4), make(5, filter_name="no-such-filter")]),
            lambda: engine.create_bindings([make(6, portdev="vnet40")]),  # bound before
            lambda: engine.create_bindings([make(7, portdev="vnet3")]),  # bound by #2 above
            lambda: engine.create_bindings([make(8)]),
        ])
    errors = calls.join()
    assert be.transactions - before == 1
    assert {k for k, e in errors.items() if e is None} == {0, 2, 6}
    assert isinstance(errors[1], UnresolvedError) and "vnet2" in str(errors[1])
    assert isinstance(errors[3], UnresolvedError) and "vnet5" in str(errors[3])
    assert isinstance(errors[4], ConflictError) and "'vnet40' is already bound" in str(errors[4])
    assert isinstance(errors[5], ConflictError) and "'vnet3' is already bound" in str(errors[5])
    assert set(be.ports()) == {"vnet40", "vnet1", "vnet3", "vnet8"}
    assert {b.portdev for b in engine.list_bindings()} == set(be.ports())
    assert engine.binding("vnet3").owner_name == "vm3"


def test_a_refused_batch_is_applied_request_by_request(engine: Engine) -> None:
    be = memory(engine)
    be.fail_on.add("vnet3")
    attempts, before = be.attempts, be.transactions
    n = 6
    calls = Calls()
    with held_commit(engine):
        for i in range(n):
            calls.start(i, lambda i=i: engine.create_bindings([make(i)]))  # type: ignore[misc]
        wait_queued(engine.create_queue, n)
    errors = calls.join()
    assert [k for k, e in errors.items() if e is not None] == [3]
    assert isinstance(errors[3], BackendError) and "vnet3" in str(errors[3])
    # the batch once, then each request alone
    assert be.attempts - attempts == 1 + n and be.transactions - before == n - 1
    assert set(be.ports()) == {f"vnet{i}" for i in range(n) if i != 3}
    assert "vnet3" not in {b.portdev for b in engine.list_bindings()}
    assert not (engine.root / "run" / "bindings" / "vnet3.xml").exists()


def test_a_create_out_of_order_leaves_nothing_queued(engine: Engine) -> None:
    with engine.bindings.lock, pytest.raises(LockOrderError):
        engine.create_bindings([make(1)])
    CHECKER.violations.clear()  # provoked on purpose
    assert engine.create_queue.pending() == 0
    engine.create_bindings([make(2)])
    assert memory(engine).ports() == ("vnet2",)


def test_a_fault_of_the_commit_fails_what_it_left_undecided() -> None:
    committed: list[list[int]] = []
    release = threading.Event()

    @contextmanager
    def hold() -> Iterator[None]:
        assert release.wait(WAIT)  # the first leader waits here, its request still queued
        yield

    def commit(batch: list[Pending[int]]) -> None:
        items = [p.item for p in batch]
        if 13 in items:
            batch[0].succeed()  # committed before the fault: keeps its success
            raise RuntimeError("bug")
        committed.append(items)
        for p in batch:
            p.succeed()

    queue: CommitQueue[int] = CommitQueue("t", commit, hold)
    calls = Calls()
    for i, item in enumerate((1, 13, 14)):
        calls.start(i, lambda item=item: queue.submit(item))  # type: ignore[misc]
        deadline = time.monotonic() + WAIT
        while queue.pending() < i + 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    release.set()
    errors = calls.join()
    assert errors[0] is None
    for k in (1, 2):
        assert isinstance(errors[k], NwfilterError)
        assert "internal error while committing: RuntimeError('bug')" in str(errors[k])
    assert queue.batches == 1 and queue.pending() == 0
    queue.submit(15)
    assert committed == [[15]]


# -- domain starts ----------------------------------------------------------------------


def test_domain_starts_that_arrive_together_share_one_transaction(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    try:
        names = [f"vm{i}" for i in range(8)]
        for name in names:
            world.manager.define_xml(domain_xml(name))
        world.manager.define_xml(domain_xml("broken", filters=("no-such-filter",)))
        before = world.backend.transactions
        calls = Calls()
        with held_commit(world.engine):
            for i, name in enumerate([*names, "broken"]):
                calls.start(i, lambda name=name: world.manager.run("start", name))  # type: ignore[misc]
            wait_queued(world.engine.create_queue, len(names) + 1)
        errors = calls.join()
        assert world.backend.transactions - before == 1
        assert [k for k, e in errors.items() if e is not None] == [len(names)]
        assert isinstance(errors[len(names)], UnresolvedError)
        states = {s.name: s.state for s in world.manager.list_domains(all_domains=True)}
        assert all(states[name] == DomainState.RUNNING for name in names)
        assert states["broken"] == DomainState.SHUTOFF
        assert len(world.backend.ports()) == len(names)
    finally:
        world.manager.stop_all()
        world.engine.close()
