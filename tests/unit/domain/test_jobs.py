"""Job rules: exclusion, async masks, agent jobs, timeouts, monitor unlocking."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from nwfilter.conf.model import DomainDef
from nwfilter.domain.jobs import AgentJobKind, AsyncJobKind, JobKind
from nwfilter.domain.objects import DomainObj
from nwfilter.errors import JobTimeoutError, LockOrderError, NotFoundError, StateError
from nwfilter.locks import Level, LevelledLock


def make_obj(name: str = "vm1") -> DomainObj:
    return DomainObj(DomainDef("test", name, uuid.uuid4()), persistent=True)


def in_thread(fn: object) -> threading.Thread:
    assert callable(fn)
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_normal_jobs_exclude_each_other_and_timeout_names_holder() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin(JobKind.MODIFY, "start")
    errors: list[Exception] = []

    def other() -> None:
        with obj.locked():
            try:
                obj.job.begin(JobKind.QUERY, "dominfo", timeout=0.2)
            except JobTimeoutError as exc:
                errors.append(exc)

    in_thread(other).join(5)
    assert len(errors) == 1
    text = str(errors[0])
    assert "'modify'" in text and "'start'" in text and "vm1" in text
    with obj.locked():
        obj.job.end()


def test_waiter_gets_job_when_released_and_lock_is_free_while_waiting() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin(JobKind.MODIFY, "start")
    got = threading.Event()

    def waiter() -> None:
        with obj.locked():
            obj.job.begin(JobKind.MODIFY, "shutdown", timeout=5)
            got.set()
            obj.job.end()

    thread = in_thread(waiter)
    time.sleep(0.1)
    # the waiter sleeps with the domain lock released
    assert obj.mutex._lock.acquire(timeout=1)
    obj.mutex._lock.release()
    assert not got.is_set()
    with obj.locked():
        obj.job.end()
    thread.join(5)
    assert got.is_set()


def test_nowait_returns_false_at_once() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin(JobKind.MODIFY, "start")
        started = time.monotonic()
        assert obj.job.begin(JobKind.QUERY, "x", nowait=True) is False
        assert time.monotonic() - started < 0.1
        obj.job.end()
        assert obj.job.begin(JobKind.QUERY, "x", nowait=True) is True
        obj.job.end()


def test_async_job_mask_allows_destroy_and_query_only() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin_async(AsyncJobKind.MIGRATION_OUT, "migrate")
    results: dict[str, bool] = {}

    def attempt(kind: JobKind) -> None:
        with obj.locked():
            try:
                obj.job.begin(kind, kind.value, timeout=0.2)
                results[kind.value] = True
                obj.job.end()
            except JobTimeoutError as exc:
                assert "async job 'migration out'" in str(exc)
                results[kind.value] = False

    for kind in (JobKind.QUERY, JobKind.DESTROY, JobKind.MODIFY, JobKind.SUSPEND):
        in_thread(lambda k=kind: attempt(k)).join(5)
    assert results == {"query": True, "destroy": True, "modify": False, "suspend": False}
    with obj.locked():
        obj.job.end_async()


def test_second_async_job_waits_for_first() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin_async(AsyncJobKind.SAVE, "save")
    failed: list[str] = []

    def other() -> None:
        with obj.locked():
            try:
                obj.job.begin_async(AsyncJobKind.DUMP, "dump", timeout=0.2)
            except JobTimeoutError as exc:
                failed.append(str(exc))

    in_thread(other).join(5)
    assert failed and "'save'" in failed[0]
    with obj.locked():
        obj.job.end_async()


def test_nested_job_only_for_async_owner() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin_async(AsyncJobKind.START, "create")
        obj.job.begin_nested(AsyncJobKind.START)
        assert obj.job.active is JobKind.ASYNC_NESTED
        obj.job.end()
        with pytest.raises(StateError):
            obj.job.begin_nested(AsyncJobKind.DUMP)
    errors: list[Exception] = []

    def other() -> None:
        with obj.locked():
            try:
                obj.job.begin_nested(AsyncJobKind.START)
            except StateError as exc:
                errors.append(exc)

    in_thread(other).join(5)
    assert errors
    with obj.locked():
        obj.job.end_async()


def test_agent_job_overlaps_normal_job_but_not_another_agent_job() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin(JobKind.MODIFY, "setvcpus")
    seen: list[str] = []

    def agent() -> None:
        with obj.locked():
            obj.job.begin_agent(AgentJobKind.QUERY, "fsinfo", timeout=1)
            seen.append("agent")
            with obj.job.agent():
                assert not obj.mutex.locked()

    in_thread(agent).join(5)
    assert seen == ["agent"]

    def second_agent() -> None:
        with obj.locked():
            try:
                obj.job.begin_agent(AgentJobKind.MODIFY, "fsfreeze", timeout=0.2)
            except JobTimeoutError as exc:
                seen.append("timeout" if "agent job 'query'" in str(exc) else str(exc))

    in_thread(second_agent).join(5)
    assert seen == ["agent", "timeout"]
    with obj.locked():
        obj.job.end_agent()
        obj.job.end()


def test_monitor_releases_domain_lock_and_rechecks_active() -> None:
    obj = make_obj()
    obj.id = 1
    with obj.locked():
        obj.job.begin(JobKind.MODIFY, "suspend")
        obj.job.enter_monitor()
        # meanwhile someone can lock the domain, e.g. to read its state
        assert not obj.mutex.locked()
        obj.id = -1  # the guest died while the command ran
        with pytest.raises(StateError, match="no longer running"):
            obj.job.exit_monitor()
        assert obj.mutex.locked()
        obj.job.end()


def test_monitor_without_job_is_refused() -> None:
    obj = make_obj()
    with obj.locked(), pytest.raises(StateError):
        obj.job.enter_monitor()


def test_waiting_for_job_while_holding_a_lock_is_refused() -> None:
    obj = make_obj()
    driver = LevelledLock("driver:x", Level.DRIVER)
    with obj.locked():
        obj.job.begin(JobKind.MODIFY, "start")
    errors: list[Exception] = []

    def waiter() -> None:
        with driver, obj.locked():
            try:
                obj.job.begin(JobKind.MODIFY, "other", timeout=1)
            except LockOrderError as exc:
                errors.append(exc)

    in_thread(waiter).join(5)
    assert errors and "while holding 'driver:x'" in str(errors[0])
    from nwfilter.locks import CHECKER

    CHECKER.violations.clear()
    with obj.locked():
        obj.job.end()


def test_monitor_with_another_lock_held_is_refused() -> None:
    obj = make_obj()
    driver = LevelledLock("driver:y", Level.DRIVER)
    with driver, obj.locked():
        obj.job.begin(JobKind.MODIFY, "start")
        with pytest.raises(LockOrderError):
            obj.job.enter_monitor()
        obj.job.end()
    from nwfilter.locks import CHECKER

    CHECKER.violations.clear()


def test_removed_domain_fails_waiters_with_not_found() -> None:
    obj = make_obj()
    with obj.locked():
        obj.job.begin(JobKind.MODIFY, "undefine")
    errors: list[Exception] = []

    def waiter() -> None:
        with obj.locked():
            try:
                obj.job.begin(JobKind.MODIFY, "start", timeout=5)
            except NotFoundError as exc:
                errors.append(exc)

    thread = in_thread(waiter)
    time.sleep(0.05)
    with obj.locked():
        obj.removing = True
        obj.job.end()
    thread.join(5)
    assert errors


@pytest.mark.parametrize("holder", ["normal", "async"])
def test_waiter_gives_up_once_the_domain_is_removed_while_the_job_is_held(holder: str) -> None:
    obj = make_obj()
    with obj.locked():
        if holder == "async":
            obj.job.begin_async(AsyncJobKind.SAVE, "save")
        else:
            obj.job.begin(JobKind.MODIFY, "undefine")
    errors: list[Exception] = []

    def waiter() -> None:
        with obj.locked():
            try:
                obj.job.begin(JobKind.MODIFY, "start", timeout=5)
            except (NotFoundError, JobTimeoutError) as exc:
                errors.append(exc)

    thread = in_thread(waiter)
    deadline = time.monotonic() + 3
    while True:
        with obj.locked():
            if obj.job.waiters:
                break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    began = time.monotonic()
    with obj.locked():
        obj.removing = True
        obj.job.wake_all()  # what DomainObjList.remove() does; the job stays held
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], NotFoundError)
    assert time.monotonic() - began < 1
    with obj.locked():
        if holder == "async":
            obj.job.end_async()
        else:
            obj.job.end()
