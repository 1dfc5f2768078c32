"""nwfilter: a network-filter engine and VM firewall manager for libvirt's nwfilter language."""

__version__ = "0.1.0"
