"""nwfilter: a network-filter engine and VM firewall manager speaking libvirt's nwfilter language."""

__version__ = "0.1.0"
