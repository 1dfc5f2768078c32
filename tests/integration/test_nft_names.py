"""Names that become nft objects, against a real kernel in throwaway namespaces.

A port name is a key of the dispatch maps; libnftables reads some names
specially (a trailing ``*`` is a wildcard, ``\\*`` its escape, ``*`` alone the
catch-all element, a leading ``@`` a set reference).  Every port is either
mapped exactly, which the backend proves by reading the key back, or refused
before anything reaches the kernel.  And what ``nft list ruleset`` prints of
our tables loads back with ``nft -f``.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from nwfilter.backends.nft import NftBackend
from nwfilter.backends.nft.backend import NftContext, default_nft_factory
from nwfilter.errors import BackendError, ValidationError
from nwfilter.ir import (
    Changes,
    CtState,
    Family,
    Field,
    IntRange,
    IPSetMatch,
    Match,
    Port,
    Rule,
    Ruleset,
    Verdict,
    drop_all,
)
from nwfilter.netlab import NetLab
from tests.integration.conftest import HOST_IP
from tests.nft_rulesets import clean_traffic, l3_rule, with_l3

pytestmark = [pytest.mark.root, pytest.mark.netns]


@dataclass(frozen=True)
class OddPort:
    portdev: str
    ns: str  # the guest's namespace
    ip: str


@dataclass
class OddLab:
    lab: NetLab
    host: str
    ports: tuple[OddPort, ...]


def _odd_lab(lab: NetLab, names: list[str]) -> OddLab:
    """A bridge `br0` in a host namespace with one guest per name, joined by a
    veth pair whose host end carries that (odd) name.  ip(8) gets each name as
    one argv element after the 'name'/'dev' keyword, so it takes it verbatim."""
    host = lab.add_ns("host")
    lab.add_bridge(host, "br0")
    lab.set_addr(host, "br0", f"{HOST_IP}/24")
    lab.enable_bridge_netfilter(host)
    ports = []
    for i, name in enumerate(names):
        ns = lab.add_ns(f"g{i}")
        ip = f"10.77.0.{20 + i}"
        lab.run(host, ["ip", "link", "add", "name", name, "type", "veth",
                       "peer", "name", "eth0", "netns", ns])
        lab.run(host, ["ip", "link", "set", "dev", name, "master", "br0", "up"])
        lab.set_addr(ns, "eth0", f"{ip}/24")
        lab.iproute.set_up(ns, "eth0")
        ports.append(OddPort(name, ns, ip))
    return OddLab(lab, host, tuple(ports))


@pytest.fixture
def odd_lab(request: pytest.FixtureRequest) -> Iterator[OddLab]:
    with NetLab() as lab:
        yield _odd_lab(lab, list(request.param))


def _drop_all(portdev: str) -> Ruleset:
    return drop_all(Port(portdev=portdev, mac="52:54:00:00:00:01"))


def _map_keys(lab: NetLab, ns: str, vmap: str) -> list[str]:
    out = lab.run(ns, ["nft", "-j", "list", "map", "bridge", "nwfilter", vmap]).stdout
    for item in json.loads(out)["nftables"]:
        if "map" in item:
            return sorted(elem[0] for elem in item["map"].get("elem", ()))
    return []


def _tables(lab: NetLab, ns: str) -> str:
    return lab.run(ns, ["nft", "list", "tables"]).stdout


@pytest.mark.parametrize("odd_lab", [["v\\*", "v*", "*", "@v"]], indirect=True)
def test_ports_nft_reads_specially_are_refused_before_the_kernel(odd_lab: OddLab) -> None:
    backend = NftBackend(netns=odd_lab.host)
    backend.probe()
    for port in odd_lab.ports:
        assert odd_lab.lab.ping(port.ns, HOST_IP)
        with pytest.raises(ValidationError) as info:
            backend.apply(Changes(set=(_drop_all(port.portdev),)))
        assert repr(port.portdev) in info.value.message or port.portdev in info.value.message
        assert "nwfilter" not in _tables(odd_lab.lab, odd_lab.host)
        # Nothing was bound, so nothing stands between the guests and the host.
        for other in odd_lab.ports:
            assert odd_lab.lab.ping(other.ns, HOST_IP), (port.portdev, other.portdev)
    assert backend.ports() == ()


@pytest.mark.parametrize("odd_lab", [["vnet0", "*"]], indirect=True)
def test_a_port_named_star_never_catches_other_ports(odd_lab: OddLab) -> None:
    plain, star = odd_lab.ports
    backend = NftBackend(netns=odd_lab.host)
    backend.probe()
    backend.apply(Changes(set=(clean_traffic(plain.portdev, "52:54:00:00:00:09", plain.ip),)))
    with pytest.raises(ValidationError, match="catch-all"):
        backend.apply(Changes(set=(_drop_all(star.portdev),)))
    # The plain port's own filter still decides its traffic (its guest's MAC
    # is not the allowed one, so nothing passes), the star port is untouched.
    assert not odd_lab.lab.ping(plain.ns, HOST_IP)
    assert odd_lab.lab.ping(star.ns, HOST_IP)
    assert _map_keys(odd_lab.lab, odd_lab.host, "from_vm") == ["vnet0"]
    backend.clear_all()


ODD_BUT_EXACT = ["v\\x", "v*x", "a$'#{", "*v", "x\\"]


@pytest.mark.parametrize("odd_lab", [ODD_BUT_EXACT], indirect=True)
def test_odd_names_nft_takes_verbatim_are_mapped_exactly_and_filtered(
    odd_lab: OddLab,
) -> None:
    backend = NftBackend(netns=odd_lab.host)
    backend.probe()
    for port in odd_lab.ports:
        assert odd_lab.lab.ping(port.ns, HOST_IP)
    backend.apply(Changes(set=tuple(_drop_all(p.portdev) for p in odd_lab.ports)))
    assert _map_keys(odd_lab.lab, odd_lab.host, "from_vm") == sorted(ODD_BUT_EXACT)
    for port in odd_lab.ports:
        assert not odd_lab.lab.ping(port.ns, HOST_IP), port.portdev
    backend.clear(odd_lab.ports[0].portdev)
    assert odd_lab.lab.ping(odd_lab.ports[0].ns, HOST_IP)
    assert not odd_lab.lab.ping(odd_lab.ports[1].ns, HOST_IP)
    backend.clear_all()


class _MangledKeys:
    """A real libnftables context that changes the key of the map elements it
    adds for the ports in `mangle`: what a libnftables reading those names
    differently from the kernel's interface names would do.  No name that
    passes the port-name rule is read differently by this libnftables, so the
    proof itself is tested this way."""

    def __init__(self, inner: NftContext, mangle: set[str]) -> None:
        self.inner = inner
        self.mangle = mangle

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        for cmd in json_root.get("nftables", ()):
            elem = cmd.get("add", {}).get("element")
            if elem is not None and elem["name"] in ("from_vm", "to_vm"):
                elem["elem"] = [[e[0] + "_" if e[0] in self.mangle else e[0], e[1]]
                                for e in elem["elem"]]
        return self.inner.json_cmd(json_root)

    def cmd(self, cmdline: str) -> tuple[int, str, str]:
        return self.inner.cmd(cmdline)

    def set_json_output(self, value: bool) -> bool:
        return self.inner.set_json_output(value)

    def set_dry_run(self, onoff: bool) -> bool:
        return self.inner.set_dry_run(onoff)


def test_a_key_read_back_different_undoes_the_transaction() -> None:
    mangle = {"vnet1", "vnet2"}
    with NetLab() as lab:
        host = lab.add_ns("host")
        backend = NftBackend(netns=host,
                             nft_factory=lambda: _MangledKeys(default_nft_factory(), mangle))
        backend.probe()
        with pytest.raises(BackendError, match="'vnet1' has no exact key"):
            backend.apply(Changes(set=(clean_traffic("vnet1", "52:54:00:00:00:02", "10.0.0.2"),)))
        assert backend.ports() == ()
        assert "nwfilter" not in _tables(lab, host)

        backend.apply(Changes(set=(clean_traffic("vnet0", "52:54:00:00:00:01", "10.0.0.1"),)))
        before = lab.run(host, ["nft", "list", "ruleset"]).stdout
        assert _map_keys(lab, host, "from_vm") == ["vnet0"]
        # One port: read back with one lookup per element.
        with pytest.raises(BackendError, match="'vnet1' has no exact key"):
            backend.apply(Changes(set=(clean_traffic("vnet1", "52:54:00:00:00:02", "10.0.0.2"),)))
        assert lab.run(host, ["nft", "list", "ruleset"]).stdout == before
        # Many ports: read back with one listing per map.
        many = [clean_traffic(f"vnet{i}", "52:54:00:00:00:02", "10.0.0.2") for i in range(2, 60)]
        with pytest.raises(BackendError, match="'vnet2' has no exact key"):
            backend.apply(Changes(set=tuple(many)))
        assert lab.run(host, ["nft", "list", "ruleset"]).stdout == before
        assert backend.ports() == ("vnet0",)
        # The records still say what the kernel holds: the next change works.
        backend.apply(Changes(set=tuple(many[1:]), remove=("vnet0",)))
        assert backend.ports() == tuple(sorted(f"vnet{i}" for i in range(3, 60)))
        backend.clear_all()


# -- the listing loads back ---------------------------------------------------


def _varied(portdev: str, mac: str, ip: str, comment: str) -> Ruleset:
    return with_l3(clean_traffic(portdev, mac, ip), from_vm=(
        l3_rule([Match(Field.CT_STATE, frozenset({CtState.ESTABLISHED, CtState.RELATED}))],
                Verdict.ACCEPT),
        l3_rule([Match(Field.IP_PROTO, 6), Match(Field.L4_DPORT, IntRange(22, 23)),
                 Match(Field.CONNLIMIT_ABOVE, 4)], Verdict.DROP),
        l3_rule([Match(Field.IPSET, IPSetMatch("trusted-hosts", ("src",)))], Verdict.ACCEPT),
        Rule(family=Family.IPV6, matches=(Match(Field.IP_SRC,
             ipaddress.IPv6Network("fd00::/64")),), verdict=Verdict.ACCEPT, comment=comment),
        Rule(family=Family.IPV4, matches=(), verdict=Verdict.DROP, comment=comment),
    ), to_vm=(
        l3_rule([Match(Field.IP_PROTO, 17)], Verdict.ACCEPT),
    ))


ODD_COMMENTS = [
    'say "hi"', "back\\slash\\", "tab\tnew\nline\r\x00bell\x07", "caf\u00e9 \u2603",
    "lone \udcff surrogate", "x" * 300, "'single' $var #hash {brace} ;semi",
]


def test_the_listing_of_our_tables_loads_back_unchanged() -> None:
    names = ["vnet0", "v\\x", "a$'#{", "*v", "0start", "br-lan.10", "_under", "x" * 15,
             "v*x", "fwd", "from_vm"]
    with NetLab() as lab:
        host = lab.add_ns("host")
        backend = NftBackend(netns=host)
        backend.probe()
        rulesets = [_varied(name, f"52:54:00:00:00:{i:02x}", f"10.0.0.{i + 1}",
                            ODD_COMMENTS[i % len(ODD_COMMENTS)])
                    for i, name in enumerate(names)]
        rulesets += [_drop_all(f"extra{i}") for i in range(40)]
        backend.apply(Changes(set=tuple(rulesets)))
        listing = lab.run(host, ["nft", "list", "ruleset"]).stdout
        assert "nwfilter" in listing
        lab.run(host, ["nft", "flush", "ruleset"])
        proc = subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=listing,
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr[:2000]
        assert lab.run(host, ["nft", "list", "ruleset"]).stdout == listing
        for vmap in ("from_vm", "to_vm"):
            keys = _map_keys(lab, host, vmap)
            assert set(names) <= set(keys)
        backend.clear_all()
