"""The names the domain core had when it was one module, for older imports.

The core is split by job: `registry` (names, UUIDs, ports), `status`
(files), `bindings` (ports and their filters), `lifecycle` (`DomainDriver`
and the `LIFECYCLE` table), `guestevents`, `reconnect` (after a restart)
and `manager` (`DomainManager`, routing by type).
"""

from nwfilter.domain.bindings import binding_for, with_ports
from nwfilter.domain.lifecycle import DomainDriver
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.registry import SharedNames, random_mac, validate_domain_name
from nwfilter.domain.status import DomainFiles
from nwfilter.domain.summary import DomainSummary, InterfaceRow

__all__ = [
    "DomainDriver",
    "DomainFiles",
    "DomainManager",
    "DomainSummary",
    "InterfaceRow",
    "SharedNames",
    "binding_for",
    "random_mac",
    "validate_domain_name",
    "with_ports",
]
