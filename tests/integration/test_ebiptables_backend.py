"""The ebiptables backend's transactions: batches, reconcile, failures, ownership."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.backends.base import Owner
from nwfilter.backends.ebiptables import EbiptablesBackend
from nwfilter.conf import parse_binding
from nwfilter.engine import Engine
from nwfilter.errors import BackendError, ConflictError
from nwfilter.ir import (
    Chain,
    Changes,
    Family,
    Field,
    Hook,
    IPSetMatch,
    Match,
    Port,
    Rule,
    Ruleset,
    Verdict,
)
from nwfilter.netlab import NetLab
from tests.integration.conftest import BridgeLab, build_bridge_lab

pytestmark = [pytest.mark.root, pytest.mark.netns]

STOCK_FILTERS = Path(__file__).resolve().parents[2] / "filters"
FOREIGN = "-A FORWARD -s 192.0.2.1/32 -j DROP"


@pytest.fixture
def elab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        yield build_bridge_lab(netlab)


def _binding(port: str, mac: str, ip: str) -> str:
    return (f"<filterbinding><owner><name>vm-{port}</name><uuid>{uuid.uuid4()}</uuid></owner>"
            f"<portdev name='{port}'/><mac address='{mac}'/>"
            f"<filterref filter='clean-traffic'><parameter name='IP' value='{ip}'/>"
            f"</filterref></filterbinding>")


def _save(lab: BridgeLab) -> str:
    return "".join(lab.run(lab.host, [tool, "-t", table]).stdout
                   for tool, table in (("ebtables-save", "nat"), ("iptables-save", "filter"),
                                       ("ip6tables-save", "filter")))


def test_restart_with_nothing_changed_runs_no_restore_and_repairs_a_flush(
        elab: BridgeLab, tmp_path: Path) -> None:
    elab.run(elab.host, ["iptables", "-A", "FORWARD", "-s", "192.0.2.1", "-j", "DROP"])
    eng = Engine(tmp_path, EbiptablesBackend(netns=elab.host), stock_dir=STOCK_FILTERS)
    eng.start()
    eng.define_filter("<filter name='web' chain='root'><filterref filter='clean-traffic'/>"
                      "<rule action='accept' direction='in'><tcp dstportstart='80'/></rule>"
                      "<rule action='drop' direction='inout'><all/></rule></filter>")
    eng.create_bindings([parse_binding(_binding("vnet0", "52:54:00:00:00:00", "10.77.0.10"))])
    eng.create_bindings([parse_binding(
        _binding("vnet1", "52:54:00:00:00:01", "10.77.0.11").replace("clean-traffic", "web"))])
    eng.close()
    before = _save(elab)
    assert "libvirt-I-vnet0" in before and "FO-vnet1" in before and FOREIGN in before
    again = EbiptablesBackend(netns=elab.host)
    eng = Engine(tmp_path, again, stock_dir=STOCK_FILTERS)
    eng.start()
    assert again.restores == 0  # nothing differed: no restore ran
    eng.close()
    # Another program flushes ebtables' nat table: the next start repairs it.
    elab.run(elab.host, ["ebtables", "-t", "nat", "-F"])
    elab.run(elab.host, ["iptables", "-F", "FI-vnet1"])
    third = EbiptablesBackend(netns=elab.host)
    eng = Engine(tmp_path, third, stock_dir=STOCK_FILTERS)
    eng.start()
    assert 0 < third.restores <= 3
    assert _lines(_save(elab)) == _lines(before)
    eng.delete_binding("vnet0")
    eng.delete_binding("vnet1")
    eng.close()
    after = _save(elab)
    assert "vnet" not in after and "nwfilter-owner" not in after and FOREIGN in after


def _lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if not line.startswith("#"))


def _drop_all(port: str) -> Ruleset:
    rule = Rule(Family.ETHER, (), Verdict.DROP)
    return Ruleset(port=Port(port, "52:54:00:00:00:00"),
                   l2={Hook.FROM_VM: (Chain("root", 0, (rule,)),)})


def test_a_refused_transaction_leaves_the_old_rules(elab: BridgeLab) -> None:
    backend = EbiptablesBackend(netns=elab.host)
    backend.apply(Changes(set=(_drop_all("vnet0"),)))
    before = _save(elab)
    # An iptables rule the kernel refuses (an ipset that does not exist) in
    # a transaction that also changes ebtables: the iptables part runs first
    # and fails, so nothing changes at all.
    bad = Ruleset(port=Port("vnet1", "52:54:00:00:00:01"), l2=_drop_all("vnet1").l2,
                  l3={Hook.FROM_VM: (Rule(Family.IPV4, (
                      Match(Field.IPSET, IPSetMatch("nosuchset", ("src",))),), Verdict.DROP),)})
    with pytest.raises(BackendError, match="iptables-restore"):
        backend.apply(Changes(set=(bad,), remove=("vnet0",)))
    assert _lines(_save(elab)) == _lines(before)
    assert backend.ports() == ("vnet0",)
    backend.clear_all()
    assert "vnet" not in _save(elab)


def test_another_root_is_refused(elab: BridgeLab) -> None:
    one = EbiptablesBackend(netns=elab.host)
    one.set_owner(Owner("/r1", "id-one"))
    one.apply(Changes(set=(_drop_all("vnet0"),)))
    two = EbiptablesBackend(netns=elab.host)
    two.set_owner(Owner("/r2", "id-two"))
    assert two.owner() == Owner("/r1", "id-one")
    with pytest.raises(ConflictError, match="id-one"):
        two.apply(Changes(set=(_drop_all("vnet1"),)))
    one.clear_all()
    assert one.owner() is None


def test_nwfilterd_repairs_a_flush_while_it_runs(elab: BridgeLab, tmp_path: Path) -> None:
    from nwfilter.daemon import close, serve
    from nwfilter.events import EventKind

    root = tmp_path / "root"
    server = serve(root, "ebiptables", elab.host, tmp_path / "d.sock")
    try:
        assert server.watch is not None
        server.watch.stop()  # looked at by hand below, not on a timer
        sub = server.engine.events.subscribe()
        server.engine.create_bindings(
            [parse_binding(_binding("vnet0", "52:54:00:00:00:00", "10.77.0.10"))])
        before = _save(elab)
        assert server.watch.check() == 0  # nothing changed: no restore
        elab.run(elab.host, ["ebtables", "-t", "nat", "-F"])
        elab.run(elab.host, ["iptables", "-F", "FORWARD"])
        assert server.watch.check() > 0
        assert _lines(_save(elab)) == _lines(before)
        events, _ended = sub.take()
        kinds = [event.kind for event in events]
        assert EventKind.DRIFT_REPAIRED in kinds
    finally:
        server.engine.backend.clear_all()
        close(server)
