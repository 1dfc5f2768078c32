"""The lock-order checker, and the deadlock the lock order exists to prevent.

The last tests reproduce libvirt's original deadlock: a VM start holding
driver → domain while it instantiates filters (pool), racing a filter
update holding the pool while it takes driver → domain.  With the naive
order the two threads hang (and the checker, when on, names the inversion
at once); with our order the same race completes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from nwfilter.conf.model import BindingDef
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.testvm import TestHypervisor
from nwfilter.errors import JobTimeoutError, LockOrderError
from nwfilter.locks import CHECKER, Level, LevelledLock, RWLock
from nwfilter.rebuild import RebuildCoordinator
from tests.unit.domain.conftest import World, domain_xml, filter_xml, make_world


@pytest.fixture
def quiet_checker() -> Iterator[None]:
    """Violations provoked on purpose are not failures of the test."""
    yield
    CHECKER.violations.clear()


def test_inversion_raises_naming_both_locks_and_stacks(quiet_checker: None) -> None:
    pool = RWLock("filter-pool", Level.POOL)
    driver = LevelledLock("driver:x", Level.DRIVER)
    with pool.read(), pytest.raises(LockOrderError) as info:
        driver.acquire()
    text = str(info.value)
    assert "taking 'driver:x' (level 2)" in text and "holding 'filter-pool' (level 3)" in text
    assert "--- held since:" in text and "--- acquiring at:" in text
    assert "test_locking.py" in text


def test_same_level_needs_increasing_rank(quiet_checker: None) -> None:
    a = LevelledLock("driver:a", Level.DRIVER, rank=1)
    b = LevelledLock("driver:b", Level.DRIVER, rank=2)
    with a, b:
        pass
    with b, pytest.raises(LockOrderError, match="rank 1"):
        a.acquire()
    plain = LevelledLock("domain:x", Level.DOMAIN)
    other = LevelledLock("domain:y", Level.DOMAIN)
    with plain, pytest.raises(LockOrderError):
        other.acquire()


def test_taking_a_lock_twice_is_reported(quiet_checker: None) -> None:
    lock = LevelledLock("domain:z", Level.DOMAIN)
    with lock, pytest.raises(LockOrderError, match="twice"):
        lock.acquire()


def test_blocking_with_a_lock_held_is_reported(quiet_checker: None) -> None:
    driver = LevelledLock("driver:q", Level.DRIVER)
    CHECKER.check_may_block("a sleep")
    with driver, pytest.raises(LockOrderError, match="blocking on a sleep while holding"):
        CHECKER.check_may_block("a sleep")


def test_condition_wait_releases_and_retakes(quiet_checker: None) -> None:
    lock = LevelledLock("domain:c", Level.DOMAIN)
    cond = lock.condition()
    flag: list[bool] = []

    def notifier() -> None:
        with lock:
            flag.append(True)
            cond.notify_all()

    with lock:
        threading.Thread(target=notifier).start()
        deadline = time.monotonic() + 3
        while not flag:
            assert cond.wait_until(deadline, "test")
        assert CHECKER.held_names() == ("domain:c",)
    assert CHECKER.held_names() == ()


def test_observed_order_records_lock_classes() -> None:
    CHECKER.reset_observed()
    driver = LevelledLock("driver:o", Level.DRIVER)
    dom = LevelledLock("domain:o1", Level.DOMAIN)
    with driver, dom:
        pass
    assert ("driver", 2, "domain", 4) in CHECKER.observed_order()


# -- libvirt's deadlock -----------------------------------------------------------

HANG = 3.0  # a thread still blocked after this long is deadlocked


def _naive_filter_update(world: World, hold: float, lock_timeout: float) -> None:
    """The update path before the fix: filter (pool) → driver → domain."""
    names = [name for name, _ in world.manager.names.domain_names()]
    with world.engine.pool.lock.write():
        time.sleep(hold)
        for driver in world.manager.drivers():
            driver.lock.acquire(timeout=lock_timeout)  # gives up so the test can end
            try:
                for name in names:
                    obj = driver.domains.find_locked(name)
                    if obj is not None:
                        with obj.mutex:
                            pass
            finally:
                driver.lock.release()


def _race(world: World, start: object, update: object) -> tuple[list[str], list[str], float]:
    assert callable(start) and callable(update)
    world.hv_a.set_delay("prepare", 0.3)  # the start sits inside its locks for a while
    done: list[str] = []
    failed: list[str] = []

    def run(name: str, fn: object) -> None:
        assert callable(fn)
        try:
            fn()
            done.append(name)
        except (JobTimeoutError, LockOrderError) as exc:
            failed.append(f"{name}: {type(exc).__name__}")

    threads = [
        threading.Thread(target=run, args=("start", start), daemon=True),
        threading.Thread(target=run, args=("update", update), daemon=True),
    ]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    began = time.monotonic()
    for t in threads:
        t.join(max(0.0, began + HANG - time.monotonic()))
    hung_for = time.monotonic() - began
    stuck = [n for n, t in zip(("start", "update"), threads, strict=True) if t.is_alive()]
    for t in threads:
        t.join(15)  # the update's lock timeout breaks the deadlock eventually
    return stuck, failed, hung_for


def test_naive_order_deadlocks(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.manager.define_xml(domain_xml("vm1"))
    driver = world.manager.driver("test")
    driver.legacy_lock_order = True
    CHECKER.enabled = False  # let the naive order run into the real hang
    try:
        stuck, failed, hung_for = _race(
            world,
            lambda: world.manager.run("start", "vm1"),
            lambda: _naive_filter_update(world, hold=0.2, lock_timeout=HANG + 1.5),
        )
    finally:
        CHECKER.enabled = True
    assert sorted(stuck) == ["start", "update"], f"expected both threads to hang: {stuck} {failed}"
    assert hung_for >= HANG - 0.1
    # only the update's lock timeout ended it: the pair never makes progress on its own
    assert failed == ["update: JobTimeoutError"]


def test_naive_order_is_named_by_the_checker(tmp_path: Path, quiet_checker: None) -> None:
    world = make_world(tmp_path)
    with pytest.raises(LockOrderError, match=r"taking 'driver:.*holding 'filter-pool'"):
        world.manager.driver("test")
        _naive_filter_update(world, hold=0.0, lock_timeout=1)


def test_our_order_completes_the_same_race(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.manager.define_xml(domain_xml("vm1"))
    began = time.monotonic()
    stuck, failed, _ = _race(
        world,
        lambda: world.manager.run("start", "vm1"),
        lambda: world.engine.define_filter(filter_xml("web", 443)),
    )
    assert stuck == [] and failed == []
    assert time.monotonic() - began < 2
    assert "443" in world.backend.read_back("vnet0")


def test_driver_lock_has_its_rank_before_a_filter_change_can_take_it(tmp_path: Path) -> None:
    class Bindings:
        def create_bindings(self, defs: Sequence[BindingDef]) -> object:
            return None

        def delete_binding(self, portdev: str) -> object:
            return None

    coordinator = RebuildCoordinator()
    register = coordinator.register_driver
    seen: list[tuple[int, tuple[str, ...], int | None]] = []

    def spy(
        name: str, lock: Callable[[], None], unlock: Callable[[], None], *,
        set_rank: Callable[[int], None] | None = None,
    ) -> int:
        def recording(rank: int) -> None:
            assert set_rank is not None
            set_rank(rank)
            # runs under the coordinator's mutex: which drivers could a
            # filter change take right now, and what rank has the new lock?
            visible = tuple(d.name for d in coordinator._drivers)
            taken_by = getattr(lock, "__self__", None)
            assert isinstance(taken_by, LevelledLock)
            seen.append((rank, visible, taken_by.rank))

        return register(name, lock, unlock, set_rank=recording)

    hv_a, hv_b = TestHypervisor(), TestHypervisor()
    hv_b.name = "ns"
    manager = DomainManager(tmp_path, Bindings(), coordinator,
                            hypervisors={"test": hv_a, "ns": hv_b})
    coordinator.register_driver = spy  # type: ignore[method-assign]
    first = manager.driver("test")
    second = manager.driver("ns")
    assert [(r, v) for r, v, _ in seen] == [(1, ()), (2, (coordinator.drivers()[0].name,))]
    assert [rank for _, _, rank in seen] == [1, 2]  # set before the lock became visible
    assert (first.lock.rank, second.lock.rank) == (1, 2)
    with coordinator.filter_change() as taken:
        assert len(taken) == 2 and first.lock.locked() and second.lock.locked()
