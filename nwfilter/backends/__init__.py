"""Backends: turn IR rulesets into kernel state (or a record of it).

`get_backend(name, netns)` is the one place that maps a backend name to its
implementation, imported lazily so that a missing optional dependency of one
backend never breaks the others.
"""

from __future__ import annotations

from nwfilter.backends.base import Backend
from nwfilter.errors import ValidationError

BACKEND_NAMES = ("memory", "nft", "ebiptables")


def get_backend(name: str, netns: str | None = None) -> Backend:
    if name == "memory":
        from nwfilter.backends.memory import MemoryBackend

        return MemoryBackend(netns)
    if name == "nft":
        from nwfilter.backends.nft import NftBackend

        return NftBackend(netns=netns)
    if name == "ebiptables":
        from nwfilter.backends.ebiptables import EbiptablesBackend

        return EbiptablesBackend(netns=netns)
    raise ValidationError(f"unknown backend '{name}' (choose from {', '.join(BACKEND_NAMES)})")
