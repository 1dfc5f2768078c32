"""A real guest behind a filtered tap: Debian's kernel booted directly by the
`qemu` driver with a busybox initramfs built here, on an `<interface
type='network'>` of the root's default network with `clean-traffic` and no
IP, so the engine learns the guest's address from its DHCP lease
(`CTRL_IP_LEARNING=dhcp`).  The test drives the guest over its serial
console (a unix socket QEMU connects to) and checks what crosses the tap:
the lease, a ping to the host, and that the guest's own spoofing attempts
(another IP address, another MAC) are dropped while the lease's address and
MAC keep working.

The guest runs under TCG (`type='qemu'`) unless NWFILTER_TEST_KVM=1 asks
for KVM: on a nested KVM that passes on few CPU features (as here),
Debian's kernel does not get past its decompressor, while the firmware
runs (all `test_qemu.py` needs from KVM).  Boot takes 8-12 s under TCG on
2 shared cores (the NIC loads no option ROM: `<rom enabled='no'/>`)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.domain.qemuvm import KVM_DEVICE, QEMU_BINARY
from nwfilter.errors import ValidationError
from tests.integration import guestimage
from tests.integration.guestimage import CMDLINE, KERNEL, READY, Console, build_initramfs
from tests.integration.netstack import Stack, stack, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(180)]

if shutil.which(QEMU_BINARY) is None:
    pytestmark.append(pytest.mark.skip(reason=f"{QEMU_BINARY} is not installed"))
elif (why := guestimage.missing()) is not None:
    pytestmark.append(pytest.mark.skip(reason=why))

DTYPE = "kvm" if os.environ.get("NWFILTER_TEST_KVM") == "1" else "qemu"
if DTYPE == "kvm" and not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
    pytestmark.append(pytest.mark.skip(reason=f"NWFILTER_TEST_KVM=1, but no usable {KVM_DEVICE}"))
MAC = "52:54:00:20:00:01"
OTHER_MAC = "52:54:00:20:00:99"
HOST = "192.168.122.1"
BOOT_TIMEOUT = 90.0


def guest_xml(name: str, initrd: Path, console: Path) -> str:
    return (
        f"<domain type='{DTYPE}'><name>{name}</name><memory unit='MiB'>128</memory>"
        f"<os><type>hvm</type><kernel>{KERNEL}</kernel><initrd>{initrd}</initrd>"
        f"<cmdline>{CMDLINE}</cmdline></os><devices>"
        "<interface type='network'><source network='default'/>"
        f"<mac address='{MAC}'/><model type='virtio'/><rom enabled='no'/>"
        # dhcp: only a lease teaches the address (under the default `any`,
        # the guest's first ARP would, and a self-chosen address would pass).
        "<filterref filter='clean-traffic'>"
        "<parameter name='CTRL_IP_LEARNING' value='dhcp'/></filterref></interface>"
        f"<serial type='unix'><source mode='connect' path='{console}'/></serial>"
        "</devices></domain>"
    )


def host_echo_requests(st: Stack) -> int:
    """ICMP echo requests the host namespace's stack received (InEchos)."""
    lines = [ln.split() for ln in
             st.lab.run(st.host, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[tuple[Stack, Console, float]]:
    """The stack with its default network, and guest g1 booted: (stack,
    its console, seconds from `domain.start` to the guest's shell)."""
    initrd = build_initramfs(tmp_path / "initrd.gz")
    console = Console(tmp_path / "console.sock")
    try:
        with stack(tmp_path) as st:
            st.call("network.start", network="default")
            st.call("domain.define", xml=guest_xml("g1", initrd, console.path))
            began = time.monotonic()
            st.call("domain.start", domain="g1")
            console.accept()
            console.wait_for(READY, BOOT_TIMEOUT)
            yield st, console, time.monotonic() - began
    finally:
        console.close()


def test_a_real_guest_leases_pings_and_cannot_spoof(
    booted: tuple[Stack, Console, float],
) -> None:
    st, con, boot = booted
    print(f"guest boot: {boot:.1f}s from domain.start to its shell")
    assert con.check("cat /sys/class/net/eth0/address").strip() == MAC
    port = st.call("domain.iflist", domain="g1")[0]["interface"]

    # Before a lease only DHCP passes: a guest that picks an address itself
    # reaches nobody, and (learning from DHCP only) is not learnt from it.
    con.check("ip addr add 192.168.122.40/24 dev eth0")
    assert con.run(f"ping -c 1 -W 1 {HOST}")[0] != 0
    con.check("ip -4 addr flush dev eth0")

    # (a) DHCP from the network's dnsmasq, through the filtered tap; the
    # engine learns the address from the ACK.
    out = con.check("udhcpc -i eth0 -n -q -f -t 5 -T 2 -s /etc/udhcpc.script", timeout=30)
    leased = con.check("ip -4 -o addr show dev eth0").split()[3].split("/")[0]
    assert leased.startswith("192.168.122.") and f"lease of {leased} obtained" in out
    assert wait_for(lambda: [r["address"] for r in st.call("domain.ifaddr", domain="g1")]
                    == [leased])

    # (b) the guest pings the host's address on the bridge.
    before = host_echo_requests(st)
    assert con.run(f"ping -c 2 -W 2 {HOST}")[0] == 0
    assert host_echo_requests(st) >= before + 2

    # (c) spoofing from inside the VM: another IP address is dropped...
    con.check("ip -4 addr flush dev eth0 && ip addr add 192.168.122.250/24 dev eth0")
    before = host_echo_requests(st)
    assert con.run(f"ping -c 2 -W 1 {HOST}")[0] != 0
    assert host_echo_requests(st) == before
    # ... the leased one works again ...
    con.check(f"ip -4 addr flush dev eth0 && ip addr add {leased}/24 dev eth0")
    assert con.run(f"ping -c 1 -W 2 {HOST}")[0] == 0
    # ... so is an ARP request that claims another address (unfiltered, the
    # host answers it), while one with its own is answered ...
    con.check("ip addr add 192.168.122.251/24 dev eth0")  # arping binds to it
    assert con.run(f"arping -c 2 -w 2 -I eth0 -s 192.168.122.251 {HOST}")[0] != 0
    con.check("ip addr del 192.168.122.251/24 dev eth0")
    assert con.run(f"arping -c 1 -w 2 -I eth0 -s {leased} {HOST}")[0] == 0
    # ... another MAC is dropped, with the leased address ...
    con.check(f"ip link set eth0 address {OTHER_MAC}")
    before = host_echo_requests(st)
    assert con.run(f"ping -c 2 -W 1 {HOST}")[0] != 0
    assert host_echo_requests(st) == before
    # ... and the guest's own MAC works again.
    con.check(f"ip link set eth0 address {MAC}")
    before = host_echo_requests(st)
    assert con.run(f"ping -c 1 -W 2 {HOST}")[0] == 0
    assert host_echo_requests(st) == before + 1

    # The drops were the port's filter: its rules name the learnt address.
    assert st.call("binding.dumpxml", portdev=port)["learnt"][0]["address"] == leased
    st.call("domain.destroy", domain="g1")
    assert st.call("domain.info", domain="g1")["state"] == "shut off"


def test_a_missing_initrd_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    console = Console(tmp_path / "console.sock")
    try:
        with stack(tmp_path) as st:
            st.call("network.start", network="default")
            st.call("domain.define", xml=guest_xml("g2", tmp_path / "no-initrd.gz",
                                                   console.path))
            with pytest.raises(ValidationError) as err:
                st.call("domain.start", domain="g2")
            assert err.value.message == (
                f"domain 'g2': <initrd> '{tmp_path}/no-initrd.gz': No such file or directory")
            assert st.call("domain.info", domain="g2")["state"] == "shut off"
            assert not [ln for ln in st.links() if ln.startswith("vnet")]
            assert st.call("binding.list") == []
            assert not list(st.root.glob("run/hypervisor/qemu/g2.*"))
    finally:
        console.close()
