"""The small contract a hypervisor backend fulfils for the domain driver.

The generic driver (`nwfilter.domain.lifecycle`) owns everything that is the
same for every kind of VM: definitions on disk, runtime status, locking,
jobs and the filter bindings of the interfaces.  A hypervisor only makes a
guest exist or stop existing.  The domain XML `type` attribute picks it:
`KNOWN_HYPERVISORS` maps a type to the module providing it, and each such
module exposes `make_hypervisor(env: HypervisorEnv) -> Hypervisor`.

Start order, which gives fail-closed filtering (as libvirt does: tap device,
then filters, then the guest runs):

1. `prepare(dom, ports)` creates the host-side ports named in `ports`
   (the guest must not pass traffic yet);
2. the driver creates the filter bindings of every filtered port, all or
   nothing;
3. `launch(dom)` lets the guest run.

If any step fails the driver calls `stop(dom)`, which must cope with a
half-prepared domain and be idempotent.  Every call is a "monitor command":
the driver runs it with the domain object unlocked (its job keeps other
writers out), so a call may block for as long as it needs to.  Calls for
different domains may run concurrently; calls for one domain never do.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from nwfilter.conf.model import DomainDef
from nwfilter.errors import UnsupportedError

if TYPE_CHECKING:
    from nwfilter.domain.eventloop import EventLoop

KNOWN_HYPERVISORS: Mapping[str, str] = MappingProxyType(
    {
        "test": "nwfilter.domain.testvm",
        "ns": "nwfilter.domain.nsvm",
        "kvm": "nwfilter.domain.qemuvm",
        "qemu": "nwfilter.domain.qemuvm",
    }
)


@dataclass(frozen=True)
class PortPlan:
    """One interface of a domain as the driver resolved it for a start.

    `index` is the interface's position in `DomainDef.interfaces`; `portdev`
    is the host-side device name (the target dev, or a generated `vnetN`
    unique across all drivers); `mac` is the guest's MAC, always set;
    `filtered` says whether a filter binding guards the port;
    `dhcp_servers` are the addresses of the DHCP server of the network the
    interface attaches to (trusted when the guest's address is learnt).
    """

    index: int
    portdev: str
    mac: str
    bridge: str | None
    filtered: bool
    dhcp_servers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HypervisorEnv:
    """What a hypervisor gets when it is built.

    `run_dir` is a private runtime directory it may keep state in (it exists
    and was checked, except when the domains are loaded for queries only;
    open it with `nwfilter.fileio.SafeDir` or `DirHandle`, never by path);
    `netns` is the network namespace host-side ports live in (the one whose
    rules the firewall backend manages), `None` for the caller's own;
    `type` is the domain type it serves; `loop` is the domain core's event
    loop, where a hypervisor watches its guests (one that needs a loop and
    gets none runs its own).
    """

    run_dir: Path
    netns: str | None = None
    type: str = ""
    loop: EventLoop | None = None


class Hypervisor(Protocol):
    """Makes guests exist.  See the module docstring for the call order."""

    name: str

    def prepare(self, dom: DomainDef, ports: Sequence[PortPlan]) -> None:
        """Create the guest's host-side ports; the guest passes no traffic yet."""

    def launch(self, dom: DomainDef) -> None:
        """Let a prepared guest run."""

    def stop(self, dom: DomainDef) -> None:
        """Remove the guest and its ports; idempotent, copes with a partial prepare."""

    def suspend(self, dom: DomainDef) -> None:
        """Pause a running guest (its ports stay)."""

    def resume(self, dom: DomainDef) -> None:
        """Continue a paused guest."""

    def is_alive(self, dom: DomainDef) -> bool:
        """Whether the guest still exists (used to find guests again after a restart)."""


class HypervisorFactory(Protocol):
    def __call__(self, env: HypervisorEnv) -> Hypervisor: ...


# Optional methods a hypervisor may have, which the driver uses when present:
#   set_event_sink(sink)   sink(domain, kind, reason) for what a guest does by
#                          itself: 'paused', 'running', 'panicked', 'exited'
#                          (reason 'shutdown', 'crashed', 'destroyed'); called
#                          from the event loop, so it must not block
#   shutdown(dom)          a graceful stop (the guest powers down, or is killed
#                          after a timeout); `stop` follows it
#   kill(dom)              end the guest at once, without waiting (destroy)
#   reboot(dom)            reset the guest
#   guest_state(dom) -> str  'running' or 'paused' as the guest is now (checked
#                          when a 'paused' or 'running' event is handled)
#   reconnect(dom) -> str  take a running guest over after a restart of the
#                          engine; its state, 'running' or 'paused'


def load_hypervisor(name: str, env: HypervisorEnv) -> Hypervisor:
    """Build the hypervisor for a domain type, importing its module on demand."""
    module_name = KNOWN_HYPERVISORS.get(name)
    if module_name is None:
        known = ", ".join(sorted(KNOWN_HYPERVISORS))
        raise UnsupportedError(f"unknown domain type '{name}' (known: {known})")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UnsupportedError(
            f"domain type '{name}' is not available: module '{module_name}' is missing"
        ) from exc
    factory: HypervisorFactory = module.make_hypervisor
    return factory(env)
