"""Domain management: domain objects and their list, jobs, an event loop,
the generic domain driver and its hypervisor backends (`test`, `ns`).

Submodules are imported on demand; importing this package does no work.
"""
