"""Domain management: domain objects and their list, jobs, an event loop,
the generic domain core (`registry`, `status`, `bindings`, `lifecycle`,
`guestevents`, `reconnect`, `manager`; docs/domains.md) and its hypervisor
backends (`test`, `ns`, `qemu`/`kvm`) with their link work (`links`).

Submodules are imported on demand; importing this package does no work.
"""
