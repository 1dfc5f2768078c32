"""The bridge-netfilter sysctls every backend's layer-3 rules depend on.

Bridged frames reach the inet/iptables hooks only while
net.bridge.bridge-nf-call-iptables/-ip6tables are 1 (per network
namespace, once br_netfilter is loaded).  Both backends set them at start
where they manage them, and report (or repair) them when asked for their
preconditions.  Callers run these in the namespace the sysctls belong to.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nwfilter.errors import UnavailableError

log = logging.getLogger(__name__)

BR_NF_SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")
_DIR = Path("/proc/sys/net/bridge")


def available() -> bool:
    """Whether br_netfilter is there (its sysctls exist) in this namespace."""
    return (_DIR / BR_NF_SYSCTLS[0]).exists()


def ensure(where: str) -> None:
    """Set both sysctls to 1; UnavailableError if one cannot be set."""
    for key in BR_NF_SYSCTLS:
        path = _DIR / key
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
                log.info("set net.bridge.%s=1 in %s", key, where)
        except OSError as exc:
            raise UnavailableError(
                f"net.bridge.{key} cannot be set (is br_netfilter loaded?): {exc}"
            ) from exc


def problem(key: str, value: str, where: str) -> str | None:
    """What a sysctl's value means for the rules; None when it is 1."""
    if value == "1":
        return None
    return (
        f"net.bridge.{key} is {value or 'unreadable'} in {where}: bridged "
        f"{'IPv6' if 'ip6' in key else 'IPv4'} frames skip every layer-3 rule"
    )


def problems(where: str, *, repair: bool) -> list[str]:
    """The sysctls that are not 1; with `repair`, each readable one is set
    back to 1 (and logged) instead of reported."""
    found: list[str] = []
    for key in BR_NF_SYSCTLS:
        path = _DIR / key
        try:
            value = path.read_text().strip()
        except OSError:
            value = ""
        text = problem(key, value, where)
        if text is None:
            continue
        if repair and value:
            try:
                path.write_text("1\n")
                log.warning("%s; set it back to 1", text)
                continue
            except OSError as exc:
                text += f" (cannot set it: {exc.strerror})"
        found.append(text)
    return found
