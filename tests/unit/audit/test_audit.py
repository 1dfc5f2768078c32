"""Each audit finding from a constructed case, and none from a clean setup
(memory backend, no root)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from nwfilter.audit.findings import sarif, worst_at_least
from nwfilter.audit.run import run_audit
from nwfilter.backends.memory import MemoryBackend
from nwfilter.conf import parse_filter
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.ir import Changes, drop_all

STOCK = Path(__file__).resolve().parents[3] / "filters"
# clean-traffic plus what it lets through: DHCP server replies, IPv6.
CLEAN = """<filter name='guest' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='-900'>
    <udp srcportstart='67' dstportstart='68'/></rule>
</filter>"""


def bind(portdev: str, flt: str, params: dict[str, str] | None = None) -> BindingDef:
    n = int(portdev.removeprefix("vnet"))
    given = params if params is not None else {"IP": f"10.0.0.{n + 2}"}
    return BindingDef(f"vm{n}", uuid.UUID(int=n + 1), portdev, f"52:54:00:00:00:{n:02x}",
                      FilterRef(flt, tuple(Parameter(k, v) for k, v in given.items())))


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    eng.start()
    eng.define_filter(CLEAN)
    eng.create_bindings([bind("vnet0", "guest"), bind("vnet1", "guest")])
    return eng


def kinds(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f in result["findings"]:
        out.setdefault(f["kind"], []).append(f)
    return out


def test_a_clean_setup_has_no_findings(engine: Engine) -> None:
    result = run_audit(engine, None)
    assert result["findings"] == []
    assert result["ports"] == 2
    assert not worst_at_least(result["findings"], "info")


def test_exposure_is_decided_from_the_rules(engine: Engine) -> None:
    engine.define_filter("<filter name='open' chain='root'>"
                         "<rule action='accept' direction='inout'><all/></rule></filter>")
    engine.create_bindings([bind("vnet2", "open")])
    found = {k: [f["port"] for f in v] for k, v in kinds(run_audit(engine, None)).items()}
    for kind in ("exposure.mac-spoofing", "exposure.ip-spoofing", "exposure.ipv6-spoofing",
                 "exposure.arp-spoofing", "exposure.dhcp-server", "exposure.ipv6-ra"):
        assert found.get(kind) == ["vnet2"], kind
    # A filter named like a safe one but that accepts everything is exposed too.
    engine.define_filter("<filter name='no-mac-spoofing-really' chain='mac'>"
                         "<rule action='return' direction='out'><mac/></rule></filter>")
    engine.create_bindings([bind("vnet3", "no-mac-spoofing-really")])
    found = {k: [f["port"] for f in v] for k, v in kinds(run_audit(engine, None)).items()}
    assert "vnet3" in found["exposure.mac-spoofing"]


def test_exposure_names_the_rule_that_lets_it_pass(engine: Engine) -> None:
    engine.create_bindings([bind("vnet2", "clean-traffic")])
    (dhcp,) = kinds(run_audit(engine, None))["exposure.dhcp-server"]
    assert dhcp["port"] == "vnet2" and dhcp["vm"] == "vm2"
    assert dhcp["filter"] == "clean-traffic" and dhcp["severity"] == "medium"


def test_shadowed_rule(engine: Engine) -> None:
    engine.define_filter("""<filter name='shadow' chain='root'>
      <rule action='drop' direction='out' priority='100'>
        <tcp dstportstart='1' dstportend='1000'/></rule>
      <rule action='accept' direction='out' priority='200'><tcp dstportstart='22'/></rule>
      <rule action='accept' direction='out' priority='300'><udp dstportstart='53'/></rule>
    </filter>""")
    engine.create_bindings([bind("vnet2", "shadow")])
    (finding,) = kinds(run_audit(engine, None))["hygiene.shadowed"]
    assert finding["filter"] == "shadow" and finding["rule"].startswith("rule 2 ")
    assert "filter 'shadow' rule 1" in finding["message"]


def test_unused_and_missing_filters_and_parameters(engine: Engine) -> None:
    engine.define_filter("<filter name='lonely' chain='root'>"
                         "<rule action='drop' direction='out'><all/></rule></filter>")
    engine.define_filter("<filter name='dangling' chain='root'/>")
    engine.define_filter("<filter name='needs-port' chain='root'/>")
    engine.create_bindings([
        bind("vnet2", "dangling"),
        bind("vnet3", "guest", {"IP": "10.0.0.9", "IPP": "10.0.0.9"}),
        bind("vnet4", "needs-port", {"IP": "10.0.0.10"}),
    ])
    # Filter files changed behind the engine's back (no rebuild): what a
    # start would then find.
    for name, body in (("dangling", "<filterref filter='not-there'/>"),
                       ("needs-port", "<rule action='accept' direction='out'>"
                                      "<tcp dstportstart='$PORT'/></rule>")):
        uid = engine.pool.lookup(name).uuid
        engine.pool.define(parse_filter(
            f"<filter name='{name}' chain='root'><uuid>{uid}</uuid>{body}</filter>"))
    found = kinds(run_audit(engine, None))
    assert [f["filter"] for f in found["hygiene.unused-filter"]] == ["lonely"]
    assert {(f["filter"], f["port"]) for f in found["hygiene.missing-filter"]} == {
        ("dangling", "")}
    (unused,) = found["hygiene.unused-parameter"]
    assert unused["port"] == "vnet3" and "IPP" in unused["message"]
    (undefined,) = found["hygiene.undefined-variable"]
    assert undefined["port"] == "vnet4" and "PORT" in undefined["message"]


def test_drift_of_recorded_rules_and_fix(engine: Engine) -> None:
    backend = engine.backend
    assert isinstance(backend, MemoryBackend)
    rs = engine.ruleset("vnet0")
    backend.apply(Changes(set=(drop_all(rs.port),)))
    (drift,) = kinds(run_audit(engine, None))["drift.altered-rule"]
    assert drift["port"] == "vnet0" and drift["severity"] == "high"
    assert engine.reconcile() > 0
    assert run_audit(engine, None)["findings"] == []


def test_subset_of_ports_and_outputs(engine: Engine) -> None:
    engine.create_bindings([bind("vnet2", "allow-ipv4")])
    result = run_audit(engine, None, ["vnet0"])
    assert result["findings"] == [] and result["ports"] == 1
    result = run_audit(engine, None)
    assert worst_at_least(result["findings"], "high")
    log = sarif(result["findings"])
    assert log["version"] == "2.1.0"
    assert {r["ruleId"] for r in log["runs"][0]["results"]} == {
        f["kind"] for f in result["findings"]}
    assert all(r["level"] in ("error", "warning", "note") for r in log["runs"][0]["results"])


@pytest.mark.parametrize("backend", ["nft", "ebiptables"])
def test_exposure_probes_walk_the_backends_own_semantics(engine: Engine, backend: str) -> None:
    """The probes find the same exposure of an open port and none of a
    clean one, walked as either backend applies the rules."""
    from nwfilter.audit.exposure import port_exposure

    engine.define_filter("<filter name='open' chain='root'>"
                         "<rule action='accept' direction='inout'><all/></rule></filter>")
    engine.create_bindings([bind("vnet2", "open")])
    recorded = engine.backend.recorded()
    open_kinds = {f.kind for f in port_exposure(recorded["vnet2"], "10.0.0.4", "vm2", backend)}
    assert {"exposure.mac-spoofing", "exposure.ip-spoofing", "exposure.arp-spoofing",
            "exposure.dhcp-server"} <= open_kinds
    clean = port_exposure(recorded["vnet0"], "10.0.0.2", "vm0", backend)
    assert [f.kind for f in clean] == []
