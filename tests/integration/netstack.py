"""A root served by nwfilterd in a throwaway namespace, for network and
learning tests: API calls in process (the daemon's method table), ns
guests that run busybox's DHCP client, and a look at what is left."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nwfilter import api
from nwfilter.daemon import Server, close, serve
from nwfilter.netlab import UDHCPC_SCRIPT, NetLab


@dataclass
class Stack:
    lab: NetLab
    host: str
    root: Path
    tmp: Path
    server: Server | None = None

    def up(self) -> Server:
        self.server = serve(self.root, "nft", self.host, self.tmp / "d.sock")
        return self.server

    def down(self) -> None:
        if self.server is not None:
            close(self.server)
            self.server = None

    def call(self, method: str, **params: Any) -> Any:
        assert self.server is not None
        return api.invoke(self.server.context, method, params)

    def guest_ns(self, name: str) -> str:
        return f"{self.host}.vm.{name}"

    def define_guest(self, name: str, mac: str, *, network: str = "default",
                     filterref: str = "<filterref filter='clean-traffic'/>") -> None:
        xml = (f"<domain type='ns'><name>{name}</name><devices>"
               f"<interface type='network'><source network='{network}'/>"
               f"<mac address='{mac}'/><model type='virtio'/>{filterref}</interface>"
               "</devices></domain>")
        self.call("domain.define", xml=xml)

    def udhcpc(self, name: str, *, tries: int = 4, extra: tuple[str, ...] = ()
               ) -> subprocess.CompletedProcess[str]:
        """One DHCP exchange by the guest (`-q`: quit once bound)."""
        script = self.tmp / "udhcpc.sh"
        if not script.exists():
            script.write_text(UDHCPC_SCRIPT)
            os.chmod(script, 0o700)
        return self.lab.run(
            self.guest_ns(name),
            ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", str(tries), "-T", "1",
             "-A", "1", "-s", str(script), *extra],
            timeout=tries * 3 + 10, check=False,
        )

    def address(self, name: str) -> str | None:
        out = self.lab.run(self.guest_ns(name),
                           ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        for line in out.splitlines():
            return line.split()[3].split("/")[0]
        return None

    def links(self) -> list[str]:
        out = self.lab.run(self.host, ["ip", "-o", "link", "show"]).stdout
        return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]

    def tables(self) -> list[str]:
        return self.lab.run(self.host, ["nft", "list", "tables"]).stdout.split("\n")

    def dnsmasq_pids(self) -> list[int]:
        """Live (not zombie) dnsmasq processes of this root."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if b"dnsmasq" in cmdline and str(self.root).encode() in cmdline and state != "Z":
                found.append(int(entry.name))
        return found


def wait_for(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


@contextmanager
def stack(tmp_path: Path) -> Iterator[Stack]:
    with NetLab() as lab:
        host = lab.add_ns("host")
        lab.enable_bridge_netfilter(host)
        st = Stack(lab, host, tmp_path / "root", tmp_path)
        st.up()
        try:
            yield st
        finally:
            if st.server is None:
                st.up()
            assert st.server is not None
            st.server.domains.stop_all()
            for name in st.server.networks.active_names():
                st.server.networks.destroy(name)
            st.server.engine.backend.clear_all()
            st.down()
