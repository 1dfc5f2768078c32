"""Domain objects and the domain list: lookups, references, removal."""

from __future__ import annotations

import threading
import uuid

import pytest

from nwfilter.conf.model import DomainDef
from nwfilter.domain.objects import DomainObj, DomainObjList
from nwfilter.errors import ConflictError, NotFoundError, StateError
from nwfilter.locks import Level, LevelledLock


def make_list() -> DomainObjList:
    return DomainObjList(LevelledLock("driver:t", Level.DRIVER))


def test_lookup_returns_locked_and_referenced() -> None:
    doms = make_list()
    obj, created = doms.add(DomainDef("test", "a", uuid.uuid4()), persistent=True)
    assert created
    obj.end_api()
    found = doms.lookup_by_name("a")
    assert found is obj and obj.mutex.locked() and obj.refs == 2
    found.end_api()
    assert obj.refs == 1
    assert doms.lookup_by_uuid(obj.uuid) is obj
    obj.end_api()
    with pytest.raises(NotFoundError):
        doms.lookup_by_name("b")


def test_lookup_by_id_only_for_active() -> None:
    doms = make_list()
    obj, _ = doms.add(DomainDef("test", "a", uuid.uuid4()), persistent=True)
    obj.id = 1
    obj.end_api()
    found = doms.lookup_by_id(1)
    assert found is obj
    found.end_api()
    with pytest.raises(NotFoundError):
        doms.lookup_by_id(2)


def test_name_and_uuid_conflicts() -> None:
    doms = make_list()
    u = uuid.uuid4()
    obj, _ = doms.add(DomainDef("test", "a", u), persistent=True)
    obj.end_api()
    with pytest.raises(ConflictError):
        doms.add(DomainDef("test", "a", uuid.uuid4()), persistent=True)
    with pytest.raises(ConflictError):
        doms.add(DomainDef("test", "b", u), persistent=True)
    again, created = doms.add(DomainDef("test", "a", u), persistent=True)
    assert not created and again is obj
    again.end_api()


def test_remove_refuses_active_and_releases_after_last_holder() -> None:
    released: list[str] = []
    doms = make_list()
    obj, _ = doms.add(
        DomainDef("test", "a", uuid.uuid4()), persistent=True,
        on_release=lambda o: released.append(o.name),
    )
    obj.end_api()
    holder = doms.lookup_by_name("a")  # some other API still holds it
    holder.unlock()
    mine = doms.lookup_by_name("a")
    mine.id = 3
    with pytest.raises(StateError):
        doms.remove(mine)
    mine.id = -1
    doms.remove(mine)
    assert mine.removing and len(doms) == 0
    mine.end_api()
    assert released == []  # the other holder has not let go
    with pytest.raises(NotFoundError):
        doms.lookup_by_name("a")
    holder.unref()
    assert released == ["a"]
    with pytest.raises(StateError):
        holder.ref()


def test_concurrent_lookups_and_removal_keep_counts_right() -> None:
    released: list[DomainObj] = []
    doms = make_list()
    obj, _ = doms.add(DomainDef("test", "a", uuid.uuid4()), persistent=True,
                      on_release=released.append)
    obj.end_api()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                found = doms.lookup_by_name("a")
            except NotFoundError:
                return
            found.end_api()

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    victim = doms.lookup_by_name("a")
    doms.remove(victim)
    victim.end_api()
    stop.set()
    for t in threads:
        t.join(5)
    assert released == [obj]
