"""The names every domain driver of a state root shares: domain names and
UUIDs (one name, one UUID, one type), domain ids, and the host port names
the running domains hold (`<target dev>` or a generated `vnetN`, unique
across all drivers and never one the engine binds for someone else).

Also the checks a domain name and a definition's target devices pass
before any driver keeps them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from uuid import UUID

from nwfilter.conf.model import BindingDef, DomainDef
from nwfilter.errors import ConflictError, ValidationError
from nwfilter.locks import Level, LevelledLock

_DOMAIN_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,199}\Z")
_PORTDEV_PREFIX = "vnet"

#: the binding the engine has for a port name, if any (takes no lock)
BindingLookup = Callable[[str], BindingDef | None]


def validate_domain_name(name: str) -> str:
    """Return `name` if it is safe as a domain name and as a file name."""
    if not _DOMAIN_NAME_RE.match(name):
        raise ValidationError(
            f"invalid domain name {name!r}: use 1-200 letters, digits and '_.+:-', "
            "not starting with '.' or '-'"
        )
    return name


def check_target_devs(dom: DomainDef) -> None:
    """Refuse a definition that gives one target device to two interfaces:
    the second would share the first one's port and its rules."""
    first: dict[str, int] = {}
    for index, iface in enumerate(dom.interfaces):
        dev = iface.target_dev
        if dev is None:
            continue
        if dev in first:
            raise ValidationError(
                f"domain '{dom.name}': interfaces {first[dev]} and {index} both have"
                f" target dev '{dev}'"
            )
        first[dev] = index


def random_mac() -> str:
    """A MAC in QEMU's locally administered range 52:54:00:xx:xx:xx."""
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


# -- names shared by all drivers ---------------------------------------------


class SharedNames:
    """Domain names/UUIDs and host port names in use across every driver.

    Its lock is a leaf: nothing is taken while it is held."""

    def __init__(self) -> None:
        self._lock = LevelledLock("names", Level.LEAF)
        self._domains: dict[str, tuple[str, UUID]] = {}  # name -> (type, uuid)
        self._ports: dict[str, str] = {}  # portdev -> domain name
        self._last_id = 0

    def new_id(self) -> int:
        """A fresh domain id, unique across drivers and never reused."""
        with self._lock:
            self._last_id += 1
            return self._last_id

    def seen_id(self, domid: int) -> None:
        """Hand out only ids above `domid` from now on (after a restart)."""
        with self._lock:
            self._last_id = max(self._last_id, domid)

    def claim_domain(self, name: str, uuid: UUID, dtype: str) -> None:
        with self._lock:
            have = self._domains.get(name)
            if have is not None and have != (dtype, uuid):
                raise ConflictError(
                    f"domain '{name}' already exists (type '{have[0]}', uuid {have[1]})"
                )
            for other, (otype, ouuid) in self._domains.items():
                if ouuid == uuid and other != name:
                    raise ConflictError(
                        f"domain uuid {uuid} is already used by domain '{other}' ({otype})"
                    )
            self._domains[name] = (dtype, uuid)

    def release_domain(self, name: str) -> None:
        with self._lock:
            self._domains.pop(name, None)

    def domain_type(self, name: str) -> str | None:
        with self._lock:
            have = self._domains.get(name)
            return None if have is None else have[0]

    def domain_names(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted((n, t) for n, (t, _) in self._domains.items())

    def reserve_ports(
        self, owner: str, wanted: Sequence[str | None], bound: BindingLookup | None = None
    ) -> list[str]:
        """Reserve host port names for `owner`: the given ones, or the lowest
        free `vnetN` for `None`.  All or nothing.

        A name is taken once; one held by another domain, or bound (per
        `bound`, which must take no lock) for another owner, is refused, and
        a generated name skips it."""
        with self._lock:
            taken = dict(self._ports)
            out: list[str] = []
            for name in wanted:
                if name is not None:
                    if name in out:
                        raise ValidationError(
                            f"domain '{owner}': target dev '{name}' is given to more than"
                            " one interface"
                        )
                    holder = taken.get(name)
                    if holder is not None and holder != owner:
                        raise ConflictError(
                            f"domain '{owner}': interface '{name}' is already used by"
                            f" domain '{holder}'"
                        )
                    binding = bound(name) if bound is not None else None
                    if binding is not None and binding.owner_name != owner:
                        raise ConflictError(
                            f"domain '{owner}': interface '{name}' is already bound to filter"
                            f" '{binding.filterref.filter}' for '{binding.owner_name}'"
                        )
                    taken[name] = owner
                    out.append(name)
            result: list[str] = []
            explicit = iter(out)
            counter = 0
            for name in wanted:
                if name is not None:
                    result.append(next(explicit))
                    continue
                while f"{_PORTDEV_PREFIX}{counter}" in taken or (
                    bound is not None and bound(f"{_PORTDEV_PREFIX}{counter}") is not None
                ):
                    counter += 1
                generated = f"{_PORTDEV_PREFIX}{counter}"
                taken[generated] = owner
                result.append(generated)
            self._ports = taken
            return result

    def port_holder(self, portdev: str) -> tuple[str, UUID] | None:
        """The name and UUID of the domain that holds `portdev`, if any."""
        with self._lock:
            owner = self._ports.get(portdev)
            if owner is None:
                return None
            have = self._domains.get(owner)
            return None if have is None else (owner, have[1])

    def release_ports(self, owner: str, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                if self._ports.get(name) == owner:
                    del self._ports[name]

