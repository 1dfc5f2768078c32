"""IP address learning for ports whose binding gives no `IP` (libvirt's
CTRL_IP_LEARNING = any | dhcp | none, DHCPSERVER).

`policy` decides per binding (mode, trusted servers) and builds the
restrictive ruleset a port has until its address is known; `packets`
parses what the guest and the DHCP servers send; `bpf` is the kernel filter
of the capture sockets; `store` keeps learnt addresses with their leases;
`listener` follows every learning port on the domain core's event loop and
hands what it learns to the engine (`Engine.set_learnt_many`).
"""
