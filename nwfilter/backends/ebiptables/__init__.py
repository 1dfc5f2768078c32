"""libvirt's ebtables/iptables layout, applied in batches with the restore tools."""

from nwfilter.backends.ebiptables.backend import EbiptablesBackend

__all__ = ["EbiptablesBackend"]
