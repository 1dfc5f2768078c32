"""Drift: what the kernel holds against what the bindings compile to now.

For the nft backend the two tables are listed once (`NftBackend.listing`,
the same read-back a start reconciles from) and each port's fresh compile is
rendered as a start would render it; per chain, the digest sequence the
kernel's rule comments carry is compared with the rendered one, so a rule
deleted, added, reordered or changed by hand is found, with the filter and
rule of the XML its comment (or the rendered rule) names.  A foreign edit
that keeps one of our comments on a changed rule passes, as it passes a
start (docs/backends.md, Trust boundary).  Other backends are compared by
what they recorded.  `--fix` is the engine's reconcile.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from nwfilter.audit.findings import Finding
from nwfilter.ir import Hook, Ruleset

_FIX_RECONCILE = "run 'nwfilter audit --fix' (re-applies the compiled rules in one transaction)"


def _strip(comment: str) -> str:
    from nwfilter.backends.nft import render

    return comment.split(render.DIGEST_TAG)[0]


def nft_drift(backend: Any, wanted: Mapping[str, Ruleset], vms: Mapping[str, str],
              listing: Any = None) -> list[Finding]:
    """Drift findings of the nft backend for the ports of `wanted`, from
    `listing` (read from the kernel now when None)."""
    from nwfilter.backends.base import compiled
    from nwfilter.backends.nft import readback, render

    if listing is None:
        listing = backend.listing()
    caps = backend.capabilities()
    out: list[Finding] = []
    if not listing.tables:
        if wanted:
            out.append(Finding("drift.base", "critical",
                               "the nwfilter tables are not in the kernel: no port is filtered",
                               _FIX_RECONCILE))
        for port in sorted(wanted):
            out.append(Finding("drift.no-rules", "critical", "the port has no rules in the kernel",
                               _FIX_RECONCILE, port=port, vm=vms.get(port, "")))
        return out
    problem = readback.layout_problem(listing)
    if problem is not None:
        out.append(Finding("drift.layout", "high", problem, _FIX_RECONCILE))
    for family, name in sorted(readback.base_drift(listing)):
        out.append(Finding("drift.base", "critical",
                           f"base chain or map {family} {name} is missing or altered: "
                           "dispatch to the ports' chains is broken", _FIX_RECONCILE))
    ids = readback.port_ids(listing, wanted)
    records = backend.records()
    needed: set[tuple[str, str]] = set()
    for port in sorted(wanted):
        rs = wanted[port]
        vm = vms.get(port, "")
        tag = render.port_tag(port)
        held = set(listing.by_tag.get(tag, ()))
        port_id = ids.get(port)
        known = records.get(port)
        if known is not None and known[1].port_id == port_id and known[1].contents \
                and compiled(known[0]) == rs:
            record = known[1]  # what was rendered for exactly this ruleset
        else:
            _batch, record = render.render_port(rs, port_id or 1, None, caps)
        needed.update(record.digests)
        if port_id is None and not held and record.digests:
            out.append(Finding("drift.no-rules", "critical", "the port has no rules in the kernel",
                               _FIX_RECONCILE, port=port, vm=vm))
            continue
        for key in sorted(record.digests):
            want = record.digests[key]
            have = listing.digests.get(key)
            if have is None:
                out.append(Finding("drift.missing-chain", "high",
                                   f"chain {key[0]} {key[1]} is missing", _FIX_RECONCILE,
                                   port=port, vm=vm, rule=key[1]))
                continue
            if tuple(want) == tuple(have):
                continue
            origins = [o if o is not None else render.port_id_comment(port_id or 0)
                       for _e, o in record.contents.get(key, [])]
            out.extend(_chain_diff(port, vm, key, want, tuple(have), origins,
                                   listing.comments.get(key, [])))
        for key in sorted(held - set(record.digests)):
            out.append(Finding("drift.extra-chain", "medium",
                               f"chain {key[0]} {key[1]} is not part of the port's rules",
                               _FIX_RECONCILE, port=port, vm=vm, rule=key[1]))
        if port_id is not None:
            now = readback.port_record(listing, port, port_id)
            for hook in sorted(record.l2_hooks - now.l2_hooks, key=lambda h: h.value):
                out.append(_dispatch(port, vm, "layer-2", hook))
            for hook in sorted(record.l3_hooks - now.l3_hooks, key=lambda h: h.value):
                out.append(_dispatch(port, vm, "layer-3", hook))
    for family, name in sorted(listing.port_chains() - needed):
        tag = name.split("/", 1)[0]
        if any(render.port_tag(p) == tag for p in wanted):
            continue  # reported with its port
        out.append(Finding("drift.extra-chain", "medium",
                           f"chain {family} {name} belongs to no bound port", _FIX_RECONCILE,
                           rule=name))
    return out


def _dispatch(port: str, vm: str, layer: str, hook: Hook) -> Finding:
    return Finding("drift.dispatch", "critical",
                   f"the {layer} dispatch element for direction "
                   f"{'out' if hook is Hook.FROM_VM else 'in'} is missing or wrong: "
                   "those frames skip the port's rules", _FIX_RECONCILE, port=port, vm=vm)


def _where(origin: str) -> tuple[str, str]:
    """(filter, rule) of an origin text "filter 'x' rule N <...>"."""
    if origin.startswith("filter '"):
        name, _, rest = origin[len("filter '"):].partition("' ")
        return name, rest
    return "", origin


def _chain_diff(port: str, vm: str, key: tuple[str, str], want: Sequence[str],
                have: Sequence[str], origins: Sequence[str], comments: Sequence[str]
                ) -> list[Finding]:
    if tuple(want) == tuple(have):
        return []
    out: list[Finding] = []
    chain = f"{key[0]} {key[1]}"
    matcher = difflib.SequenceMatcher(a=list(have), b=list(want), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        paired = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        for n in range(paired):
            flt, rule = _where(origins[j1 + n] if j1 + n < len(origins) else "")
            out.append(Finding("drift.altered-rule", "high",
                               f"rule {j1 + n + 1} of chain {chain} differs from the compiled "
                               f"one (kernel: {_strip(comments[i1 + n]) or 'no comment'})",
                               _FIX_RECONCILE, port=port, vm=vm, filter=flt, rule=rule))
        for j in range(j1 + paired, j2):
            flt, rule = _where(origins[j] if j < len(origins) else "")
            out.append(Finding("drift.missing-rule", "high",
                               f"rule {j + 1} of chain {chain} is missing in the kernel",
                               _FIX_RECONCILE, port=port, vm=vm, filter=flt, rule=rule))
        for i in range(i1 + paired, i2):
            text = _strip(comments[i]) if i < len(comments) else ""
            flt, rule = _where(text)
            out.append(Finding("drift.extra-rule", "high",
                               f"the kernel holds an extra rule at position {i + 1} of chain "
                               f"{chain} ({text or 'no comment of ours'})",
                               _FIX_RECONCILE, port=port, vm=vm, filter=flt, rule=rule))
    return out


def recorded_drift(recorded: Mapping[str, Ruleset], wanted: Mapping[str, Ruleset],
                   vms: Mapping[str, str]) -> list[Finding]:
    """Drift for a backend without a kernel listing: its records against a
    fresh compile (a binding whose filters changed without a rebuild)."""
    out: list[Finding] = []
    for port in sorted(wanted):
        have = recorded.get(port)
        if have is None:
            out.append(Finding("drift.no-rules", "critical", "the port has no rules applied",
                               _FIX_RECONCILE, port=port, vm=vms.get(port, "")))
        elif have != wanted[port]:
            out.append(Finding("drift.altered-rule", "high",
                               "the rules applied differ from what the filters compile to",
                               _FIX_RECONCILE, port=port, vm=vms.get(port, "")))
    return out


def precondition_findings(broken: Sequence[str], l3_ports: Sequence[str],
                          vms: Mapping[str, str]) -> list[Finding]:
    fix = ("set net.bridge.bridge-nf-call-iptables/-ip6tables to 1 in the namespace, and "
           "remove other tables' writes of the packet mark (nwfilterd repairs the sysctls)")
    out = []
    for text in broken:
        if not l3_ports:
            out.append(Finding("precondition", "medium", text, fix))
        for port in l3_ports:
            out.append(Finding("precondition", "high",
                               f"layer-3 rules are bypassed: {text}", fix, port=port,
                               vm=vms.get(port, "")))
    return out


def unbound_bridge_ports(netns: str | None, bound: Sequence[str]) -> list[Finding]:
    """Ports on a bridge that holds a bound port, without a binding themselves."""
    from pyroute2 import IPRoute

    from nwfilter.netns import in_netns

    with in_netns(netns):
        ipr = IPRoute()
    try:
        links = ipr.get_links()
    finally:
        ipr.close()
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
    master = {link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_MASTER") for link in links}
    bound_set = set(bound)
    filtered = {master[p] for p in bound_set if master.get(p)}
    out = []
    for name, index in sorted(master.items(), key=lambda kv: str(kv[0])):
        if index in filtered and name not in bound_set:
            bridge = names.get(index, str(index))
            out.append(Finding(
                "precondition.unbound-bridge-port", "medium",
                f"port {name} on bridge {bridge} has no binding: its traffic is not filtered "
                f"and it reaches the filtered guests", f"bind {name} to a filter, or move it "
                "off the bridge", port=name))
    return out
