"""The nftables backend: libnftables JSON, in-process, one transaction per apply.

`render` (pure IR → JSON), `backend` (the applier, `NftBackend`) and
`monitor` (self-healing, `NftMonitor`).
"""

from nwfilter.backends.nft.backend import NftBackend
from nwfilter.backends.nft.monitor import NftMonitor

__all__ = ["NftBackend", "NftMonitor"]
