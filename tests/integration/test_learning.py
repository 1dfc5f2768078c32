"""IP address learning with real traffic: ns guests that run busybox's DHCP
client on the default network (the engine's own dnsmasq), all in
throwaway namespaces."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.integration.netstack import Stack, stack, wait_for
from tests.nft_rulesets import uncounted

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(180)]

DHCP_ONLY = ("<filterref filter='clean-traffic'>"
             "<parameter name='CTRL_IP_LEARNING' value='dhcp'/></filterref>")
G1 = "52:54:00:20:00:01"


def ping(st: Stack, name: str, address: str, *, source: str | None = None) -> bool:
    argv = ["ping", "-n", "-q", "-c", "1", "-W", "2"]
    if source is not None:
        argv += ["-I", source]
    return st.lab.run(st.guest_ns(name), [*argv, address], check=False,
                      timeout=10).returncode == 0


def learnt(st: Stack, portdev: str = "vnet0") -> str | None:
    assert st.server is not None
    found = st.server.engine.learnt("vnet0").get("IP")
    return found[0] if found else None


def send_frame(st: Stack, ns: str, iface: str, frame_code: str) -> None:
    code = ("from scapy.all import *\n"
            "from tests.unit.learn import frames as f\n"
            f"sendp({frame_code}, iface='{iface}', verbose=False)\n")
    st.lab.run(ns, [sys.executable, "-c", code], timeout=60)


def nft(st: Stack, *words: str) -> str:
    return st.lab.run(st.host, ["nft", *words]).stdout


def port_chains(st: Stack) -> list[str]:
    """The chains that use IP, with rule handles: a rewrite changes them
    (counter values are left out: traffic moves them)."""
    return [uncounted(nft(st, "-a", "list", "chain", "bridge", "nwfilter", f"vnet0/{name}"))
            for name in ("from/root", "from/ipv4-ip", "from/arp-ip", "to/root")]


def test_dhcp_learning_end_to_end(tmp_path: Path) -> None:
    with stack(tmp_path) as st:
        st.call("network.start", network="default")
        st.define_guest("g1", G1, filterref=DHCP_ONLY)
        st.call("domain.start", domain="g1")
        ns = st.guest_ns("g1")
        # Before the lease only DHCP passes: a made-up address gets nowhere.
        st.lab.run(ns, ["ip", "addr", "add", "192.168.122.50/24", "dev", "eth0"])
        assert not ping(st, "g1", "192.168.122.1")
        st.lab.run(ns, ["ip", "addr", "flush", "dev", "eth0"])
        chains = port_chains(st)
        done = st.udhcpc("g1")
        assert done.returncode == 0, done.stderr
        leased = st.address("g1")
        assert leased is not None and leased.startswith("192.168.122.")
        assert wait_for(lambda: learnt(st) == leased)
        # Learning added set elements with the lease as timeout; the chains stayed.
        assert f"{leased} timeout" in nft(st, "list", "set", "bridge", "nwfilter",
                                          "learn4_vnet0")
        assert '"vnet0" timeout' in nft(st, "list", "set", "bridge", "nwfilter",
                                        "learnt_vnet0")
        assert port_chains(st) == chains
        assert ping(st, "g1", "192.168.122.1")
        # Any other source address is dropped.
        st.lab.run(ns, ["ip", "addr", "add", "192.168.122.51/24", "dev", "eth0"])
        assert not ping(st, "g1", "192.168.122.1", source="192.168.122.51")
        st.lab.run(ns, ["ip", "addr", "del", "192.168.122.51/24", "dev", "eth0"])
        # A rogue DHCP server on the bridge, and the guest forging an ACK for itself.
        st.define_guest("rogue", "52:54:00:20:00:99", filterref="")
        st.call("domain.start", domain="rogue")
        rogue = f"f.dhcp_reply('ack', '192.168.122.77', '192.168.122.250', chaddr='{G1}')"
        send_frame(st, st.guest_ns("rogue"), "eth0", rogue)
        forged = f"f.dhcp_reply('ack', '192.168.122.78', '192.168.122.1', chaddr='{G1}')"
        send_frame(st, ns, "eth0", forged)
        assert st.server is not None
        counters = st.server.learner.counters if st.server.learner else {}
        assert wait_for(lambda: counters["untrusted"] >= 1 and counters["forged"] >= 1)
        assert learnt(st) == leased
        rows = st.call("domain.ifaddr", domain="g1")
        assert [(r["address"], r["source"]) for r in rows] == [(leased, "dhcp")]
        assert "expires" in rows[0] and rows[0]["expires"]
        dump = st.call("binding.dumpxml", portdev="vnet0")
        assert dump["learnt"][0]["address"] == leased
        # The lease survives a restart of the daemon.
        st.down()
        assert f"{leased} timeout" in nft(st, "list", "set", "bridge", "nwfilter",
                                          "learn4_vnet0")
        st.up()
        assert learnt(st) == leased
        assert f"{leased} timeout" in nft(st, "list", "set", "bridge", "nwfilter",
                                          "learn4_vnet0")
        assert ping(st, "g1", "192.168.122.1")
        # A release withdraws it: back to the learning rules.
        send_frame(st, ns, "eth0", f"f.dhcp_request('release', '{leased}', mac='{G1}')")
        assert wait_for(lambda: learnt(st) is None)
        st.lab.run(ns, ["ip", "addr", "replace", f"{leased}/24", "dev", "eth0"])
        assert not ping(st, "g1", "192.168.122.1")


UDHCPD_CONF = """start 10.88.0.10
end 10.88.0.20
interface br0
lease_file {dir}/udhcpd.leases
pidfile {dir}/udhcpd.pid
min_lease 3
option subnet 255.255.255.0
option lease 3
"""


def test_lease_expiry_returns_the_port_to_learning(tmp_path: Path) -> None:
    with stack(tmp_path) as st:
        xml = ("<domain type='ns'><name>g2</name><devices><interface type='bridge'>"
               f"<source bridge='br0'/><mac address='{G1}'/>"
               "<filterref filter='clean-traffic'>"
               "<parameter name='CTRL_IP_LEARNING' value='dhcp'/>"
               "<parameter name='DHCPSERVER' value='10.88.0.1'/></filterref>"
               "</interface></devices></domain>")
        st.call("domain.define", xml=xml)
        st.call("domain.start", domain="g2")
        st.lab.run(st.host, ["ip", "addr", "add", "10.88.0.1/24", "dev", "br0"])
        conf = tmp_path / "udhcpd.conf"
        conf.write_text(UDHCPD_CONF.format(dir=tmp_path))
        (tmp_path / "udhcpd.leases").write_bytes(b"")
        server = st.lab.popen(st.host, ["busybox", "udhcpd", "-f", str(conf)])
        try:
            done = st.udhcpc("g2")
            assert done.returncode == 0, done.stderr
            leased = st.address("g2")
            assert leased is not None and leased.startswith("10.88.0.")
            assert wait_for(lambda: learnt(st) == leased)
            assert ping(st, "g2", "10.88.0.1")
            # udhcpc -q does not renew: the lease (3 s) ends.
            assert wait_for(lambda: learnt(st) is None, timeout=15)
            assert not ping(st, "g2", "10.88.0.1")
            time.sleep(0.1)
        finally:
            server.kill()
            server.wait()


def test_any_mode_learns_a_static_address_from_the_guests_first_packets(
        tmp_path: Path) -> None:
    with stack(tmp_path) as st:
        st.call("network.start", network="default")
        st.define_guest("g3", "52:54:00:20:00:03")  # clean-traffic, CTRL_IP_LEARNING any
        st.call("domain.start", domain="g3")
        ns = st.guest_ns("g3")
        st.lab.run(ns, ["ip", "addr", "add", "192.168.122.60/24", "dev", "eth0"])
        ping(st, "g3", "192.168.122.1")  # its ARP request is dropped, but seen
        assert wait_for(lambda: learnt(st) == "192.168.122.60")
        rows = st.call("domain.ifaddr", domain="g3")
        assert [(r["address"], r["source"], r["expires"]) for r in rows] == [
            ("192.168.122.60", "arp", None)]
        assert wait_for(lambda: ping(st, "g3", "192.168.122.1"), timeout=15)
        st.lab.run(ns, ["ip", "addr", "add", "192.168.122.61/24", "dev", "eth0"])
        assert not ping(st, "g3", "192.168.122.1", source="192.168.122.61")
