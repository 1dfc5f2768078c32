"""How a host joins the cluster: etcd endpoints, TLS files, names, timings."""

from __future__ import annotations

import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from nwfilter.errors import ValidationError

DEFAULT_PREFIX = "/nwfilter/"
#: seconds a dead host's lease outlives it (its keep-alives come every third of it)
DEFAULT_TTL = 10
#: seconds one request to an etcd member may take before the next is tried
DEFAULT_TIMEOUT = 3.0

_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PREFIX = re.compile(r"^/[A-Za-z0-9._/-]{0,200}/$")


@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client URL."""

    scheme: str  # http or https
    host: str
    port: int

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """`URL[,URL...]` of etcd members (http or https, a host and a port)."""
    out: list[Endpoint] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        parsed = urllib.parse.urlsplit(part)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if (
            parsed.scheme not in ("http", "https")
            or not parsed.hostname
            or port is None
            or parsed.path not in ("", "/")
            or parsed.query
            or parsed.username
        ):
            raise ValidationError(
                f"etcd endpoint {part[:80]!r} is not http(s)://HOST:PORT"
            )
        out.append(Endpoint(parsed.scheme, parsed.hostname, port))
    if not out:
        raise ValidationError("--cluster needs at least one etcd endpoint URL")
    return tuple(out)


def check_host_name(name: str) -> str:
    if not _HOST_NAME.match(name):
        raise ValidationError(
            f"cluster host name {name[:80]!r} must be 1-63 letters, digits, '.', '_' or '-'"
        )
    return name


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix) or "//" in prefix:
        raise ValidationError(
            f"cluster key prefix {prefix[:80]!r} must start and end with '/' "
            "(letters, digits, '.', '_', '-', '/')"
        )
    return prefix


@dataclass(frozen=True)
class ClusterConfig:
    """Everything `nwfilterd --cluster` needs to join."""

    endpoints: tuple[Endpoint, ...]
    host: str = field(default_factory=socket.gethostname)
    prefix: str = DEFAULT_PREFIX
    ttl: int = DEFAULT_TTL
    timeout: float = DEFAULT_TIMEOUT
    ca_cert: Path | None = None  # CA that signed the members' certificates
    cert: Path | None = None  # this host's client certificate ...
    key: Path | None = None  # ... and its key

    def __post_init__(self) -> None:
        check_host_name(self.host)
        check_prefix(self.prefix)
        if self.ttl < 2:
            raise ValidationError("the cluster lease TTL must be at least 2 seconds")
        if (self.cert is None) != (self.key is None):
            raise ValidationError("a client certificate needs its key, and a key its certificate")
        for path in (self.ca_cert, self.cert, self.key):
            if path is not None and not path.is_file():
                raise ValidationError(f"TLS file '{path}' does not exist")

    def urls(self) -> str:
        return ",".join(e.url() for e in self.endpoints)
