"""Fixtures for the domain tests: an engine on the memory backend, a
manager with two test-hypervisor drivers, and small filters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nwfilter.backends.base import Backend
from nwfilter.backends.memory import MemoryBackend
from nwfilter.domain.hypervisor import Hypervisor
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.testvm import TestHypervisor
from nwfilter.engine import Engine


def filter_xml(name: str, port: int, ref: str | None = None) -> str:
    """A small filter; its UUID is derived from its name so it can be redefined."""
    inner = f"<filterref filter='{ref}'/>" if ref else ""
    fuuid = uuid.uuid5(uuid.NAMESPACE_URL, f"nwfilter-test:{name}")
    return (
        f"<filter name='{name}' chain='root'><uuid>{fuuid}</uuid>{inner}"
        f"<rule action='accept' direction='in' priority='500'>"
        f"<tcp dstportstart='{port}'/></rule>"
        f"<rule action='drop' direction='inout' priority='900'><all/></rule></filter>"
    )


def domain_xml(
    name: str, dtype: str = "test", filters: tuple[str | None, ...] = ("web",),
    target: str | None = None, mac: str | None = None,
) -> str:
    ifaces = []
    for filt in filters:
        parts = ["<interface type='bridge'><source bridge='br0'/>"]
        if mac:
            parts.append(f"<mac address='{mac}'/>")
        if target:
            parts.append(f"<target dev='{target}'/>")
        if filt:
            parts.append(f"<filterref filter='{filt}'><parameter name='IP' value='10.0.0.1'/>"
                         "</filterref>")
        parts.append("</interface>")
        ifaces.append("".join(parts))
    return (f"<domain type='{dtype}'><name>{name}</name><devices>{''.join(ifaces)}"
            f"</devices></domain>")


@dataclass
class World:
    root: Path
    engine: Engine
    backend: Any  # MemoryBackend, or a kernel backend in integration tests
    manager: DomainManager
    hv_a: TestHypervisor
    hv_b: TestHypervisor

    def restart(self) -> World:
        """A new engine and manager on the same root and guests (a daemon restart)."""
        self.engine.close()
        backend = self.backend  # the kernel keeps its rules across a restart
        engine = Engine(self.root, backend, stock_dir=self.root / "no-stock")
        engine.start()
        manager = DomainManager.for_engine(
            engine, hypervisors={"test": self.hv_a, "ns": self.hv_b}, job_timeout=5
        )
        manager.start()
        return World(self.root, engine, backend, manager, self.hv_a, self.hv_b)


def make_world(root: Path, backend: Backend | None = None, *,
               more: Mapping[str, Hypervisor] | None = None, netns: str | None = None) -> World:
    """Engine, manager and two test-hypervisor drivers on `backend`
    (a fresh MemoryBackend unless given), plus the hypervisors in `more`
    (real ones, in namespace `netns`, for the integration tests)."""
    backend = backend if backend is not None else MemoryBackend()
    (root / "no-stock").mkdir(exist_ok=True)
    engine = Engine(root, backend, stock_dir=root / "no-stock")
    engine.start()
    hv_a, hv_b = TestHypervisor(), TestHypervisor()
    hv_b.name = "ns"
    manager = DomainManager.for_engine(
        engine, hypervisors={"test": hv_a, "ns": hv_b, **(more or {})}, job_timeout=5,
        netns=netns,
    )
    manager.start()
    engine.define_filter(filter_xml("web", 80))
    engine.define_filter(filter_xml("db", 5432))
    return World(root, engine, backend, manager, hv_a, hv_b)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.engine.close()
