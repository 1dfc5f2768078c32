"""Networks against the real kernel: the default NAT network with its own
dnsmasq in a throwaway namespace, ns guests leasing from it, and
net-destroy leaving nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwfilter.errors import StateError
from tests.integration.netstack import stack, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(120)]

OPEN = "<filterref filter='no-mac-spoofing'/>"  # a filter that needs no IP


def test_default_network_serves_dhcp_and_destroy_leaves_nothing(tmp_path: Path) -> None:
    with stack(tmp_path) as st:
        with pytest.raises(StateError, match="network 'default' is not active"):
            st.define_guest("g1", "52:54:00:10:00:01", filterref=OPEN)
            st.call("domain.start", domain="g1")
        st.call("network.start", network="default")
        info = st.call("network.info", network="default")
        assert info["active"] and info["bridge"] == "virbr0" and info["dnsmasq_pid"]
        assert "virbr0" in st.links()
        assert "table ip nwnet_default" in st.tables()
        st.call("domain.start", domain="g1")
        rows = st.call("domain.iflist", domain="g1")
        assert rows[0]["type"] == "network" and rows[0]["source"] == "default"
        done = st.udhcpc("g1")
        assert done.returncode == 0, done.stderr
        address = st.address("g1")
        assert address is not None and address.startswith("192.168.122.")
        assert st.lab.ping(st.guest_ns("g1"), "192.168.122.1", wait=2)
        st.call("domain.destroy", domain="g1")
        st.call("network.destroy", network="default")
        assert "virbr0" not in st.links()
        assert not any("nwnet_" in t for t in st.tables())
        assert st.dnsmasq_pids() == []
        assert st.call("network.info", network="default")["active"] is False


def test_dnsmasq_is_restarted_when_it_dies_and_autostart_runs_first(tmp_path: Path) -> None:
    with stack(tmp_path) as st:
        st.call("network.start", network="default")
        st.call("network.autostart", network="default", enable=True)
        st.define_guest("g2", "52:54:00:10:00:02", filterref=OPEN)
        st.call("domain.autostart", domain="g2", enable=True)
        first = st.dnsmasq_pids()
        assert len(first) == 1
        import os
        import signal

        os.kill(first[0], signal.SIGKILL)
        assert wait_for(lambda: len(st.dnsmasq_pids()) == 1 and st.dnsmasq_pids() != first)
        # A restart finds the network active; after a destroy, autostart
        # starts it again before the domain that needs it.
        st.down()
        st.up()
        assert st.call("domain.info", domain="g2")["state"] == "running"
        st.call("domain.destroy", domain="g2")
        st.call("network.destroy", network="default")
        st.down()
        st.up()
        assert st.call("network.info", network="default")["active"]
        assert st.call("domain.info", domain="g2")["state"] == "running"
