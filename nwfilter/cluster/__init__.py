"""One filter pool for many hosts, kept in etcd.

`config` says which etcd cluster and how to reach it, `store` speaks to it
(etcd3gw, the gRPC gateway's JSON API), `view` checks pool documents before
they are applied, and `member` is what `nwfilterd --cluster` runs: it
follows the pool from the last revision it applied, sends this host's
defines and undefines to etcd as transactions, and publishes this host's
state under a lease.  See docs/cluster.md.
"""
