"""The restore/save tools: which variant the host has, and running them.

`variant()` tells iptables-nft from iptables-legacy (and the same for
ebtables) by where the tool's link leads, without running anything, so
`nwfilter --version` can say it cheaply.  `Runner` runs a tool with the
calling thread inside the backend's network namespace (the child inherits
the thread's namespace), never in the host's when a namespace is given,
and counts the processes it starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from nwfilter.errors import BackendError, UnavailableError
from nwfilter.netns import in_netns

TIMEOUT_S = 60.0
PACKAGES = {
    "iptables-restore": "iptables", "iptables-save": "iptables",
    "ip6tables-restore": "iptables", "ip6tables-save": "iptables",
    "ebtables-restore": "iptables (ebtables-nft) or ebtables (legacy)",
    "ebtables-save": "iptables (ebtables-nft) or ebtables (legacy)",
}


def _flavour(tool: str) -> str:
    path = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        return "missing"
    target = os.path.basename(os.path.realpath(path))
    if "legacy" in target:
        return "legacy"
    if "nft" in target:
        return "nf_tables"
    return f"unknown ({target})"


def variant() -> dict[str, str]:
    """{'iptables': 'nf_tables'|'legacy'|'missing'|..., 'ebtables': ...}"""
    return {"iptables": _flavour("iptables-restore"), "ebtables": _flavour("ebtables-restore")}


def describe() -> str:
    found = variant()
    return f"ebiptables backend: iptables {found['iptables']}, ebtables {found['ebtables']}"


class Runner:
    """Runs the tools in `netns` (None: where the caller is)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.processes = 0  # started so far

    def run(self, argv: Sequence[str],
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        with in_netns(self.netns):
            self.processes += 1
            try:
                return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                                      timeout=TIMEOUT_S, check=False)
            except FileNotFoundError as exc:
                package = PACKAGES.get(argv[0], argv[0])
                raise UnavailableError(
                    f"'{argv[0]}' is not installed: install the Debian package {package}"
                ) from exc
            except subprocess.TimeoutExpired as exc:
                raise BackendError(f"'{argv[0]}' did not finish in {TIMEOUT_S:.0f} s") from exc

    def save(self, tool: str, table: str, *, counters: bool = False) -> str:
        done = self.run([tool, *(("-c",) if counters else ()), "-t", table])
        if done.returncode != 0:
            raise BackendError(f"'{tool} -t {table}' failed in {self.where()}: "
                               f"{done.stderr.strip()}")
        return done.stdout

    def restore(self, tool: str, text: str) -> str | None:
        """Feed one restore file; None on success, else the tool's error."""
        argv = [tool, "--noflush"] if tool.startswith("eb") else [tool, "-w", "--noflush"]
        done = self.run(argv, text)
        return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")

    def where(self) -> str:
        return f"namespace '{self.netns}'" if self.netns else "the host's namespace"
