"""libvirt networks: the bridges `<interface type='network'>` attaches to.

`model` parses and formats libvirt network XML; `dnsmasq` writes a
network's dnsmasq configuration and runs it as a supervised process;
`nat` holds the nft tables of a NAT network; `manager` is the set of
networks of one state root (define, start, destroy, autostart).
"""
