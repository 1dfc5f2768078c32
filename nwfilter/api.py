"""The API: every operation of nwfilter as one table of methods.

A method has a wire name (`filter.define`), typed parameters, a flag saying
whether it changes anything, and a handler that takes an `ApiContext` (the
engine of a state root and its domain manager) and returns JSON data.

The same table serves both control paths: `nwfilterd` answers it on its
sockets, and the command line calls it through a `Caller` — the daemon's
client when a daemon serves the root, `EmbeddedCaller` (the same handlers,
in process) otherwise.  Results and errors are therefore the same in both
modes, and so is everything the command line prints from them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nwfilter import events, protocol
from nwfilter.conf import format_binding, format_filter, parse_binding, parse_domain
from nwfilter.domain.operations import VERBS
from nwfilter.errors import (
    ConflictError,
    PermissionDeniedError,
    UnavailableError,
    ValidationError,
)
from nwfilter.render_text import render_text

if TYPE_CHECKING:
    from nwfilter.audit.run import Auditor
    from nwfilter.cluster.member import ClusterMember
    from nwfilter.domain.manager import DomainManager
    from nwfilter.domain.summary import DomainSummary
    from nwfilter.engine import DefineOutcome, Engine
    from nwfilter.network.manager import NetworkInfo, NetworkManager

log = logging.getLogger(__name__)

Json = Any
Params = Mapping[str, Any]


class Caller(Protocol):
    """Something that answers API calls: a daemon client or the embedded engine."""

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any: ...

    def close(self) -> None: ...


class ApiContext(Protocol):
    """What handlers work on: one state root's engine and domains."""

    def engine(self) -> Engine: ...

    def domains(self) -> DomainManager: ...

    def networks(self) -> NetworkManager: ...

    def events(self) -> events.EventBus:
        """The bus of this root's events; UnavailableError where none is
        served (the embedded engine: other processes' events cannot be
        seen from here)."""
        ...

    def cluster(self) -> ClusterMember | None:
        """The cluster this root's pool is shared with (`nwfilterd
        --cluster`), or None: the pool is this root's alone."""
        ...

    def auditor(self) -> Auditor:
        """What runs `audit.run` (the daemon keeps one, shared with its
        periodic audit; `nwfilter.audit.run`)."""
        ...


# -- parameters ------------------------------------------------------------------------

_MAX_LIST = 4096


@dataclass(frozen=True)
class Param:
    """One parameter: its name, its JSON type and its default (required if None)."""

    name: str
    kind: type | tuple[type, ...]
    default: Any = None
    required: bool = False


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", list: "a list of strings"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _check_value(param: Param, value: Any) -> Any:
    kinds = param.kind if isinstance(param.kind, tuple) else (param.kind,)
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, str):
            return value
        if (
            kind is list
            and isinstance(value, list)
            and len(value) <= _MAX_LIST
            and all(isinstance(item, str) for item in value)
        ):
            return value
    raise ValidationError(f"parameter '{param.name}' must be {_kind_name(param.kind)}")


def check_params(method: Method, params: Any) -> dict[str, Any]:
    """`params` checked against `method`'s parameters: unknown names,
    missing required ones and values of the wrong JSON type are refused."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValidationError("'params' must be an object")
    known = {p.name: p for p in method.params}
    for key in params:
        if key not in known:
            raise ValidationError(f"method '{method.name}' takes no parameter {key!r}")
    out: dict[str, Any] = {}
    for param in method.params:
        if param.name in params and params[param.name] is not None:
            out[param.name] = _check_value(param, params[param.name])
        elif param.required:
            raise ValidationError(f"method '{method.name}' needs parameter '{param.name}'")
        else:
            out[param.name] = param.default
    return out


# -- the methods --------------------------------------------------------------------------

Handler = Callable[[ApiContext, dict[str, Any]], Json]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    params: tuple[Param, ...] = ()
    writes: bool = False  # changes state: refused on the read-only socket
    domains: bool = False  # needs the domain manager


@dataclass(frozen=True)
class Subscribed:
    """The result of a call that turns the connection into an event
    stream: `result` is the reply, then come the events of `subscription`."""

    result: Json
    subscription: events.Subscription


def _define_result(outcome: DefineOutcome) -> Json:
    return {
        "name": outcome.name,
        "uuid": outcome.uuid,
        "created": outcome.created,
        "changed": outcome.changed,
        "dry_run": outcome.dry_run,
        "rebuilt": list(outcome.rebuilt),
        "summary": outcome.describe(),
    }


def _local_pool(ctx: ApiContext, what: str) -> None:
    """Refuse to change the pool here when it belongs to a cluster this
    process is not part of (an embedded command on a clustered root): the
    daemon would overwrite the change from etcd at its next start."""
    engine = ctx.engine()
    if (engine.root / "cluster" / "state.json").exists():
        raise ConflictError(
            f"cannot {what}: the filter pool of state root '{engine.root}' is shared "
            "through etcd; change it through nwfilterd --cluster (start it, or use -c SOCKET)"
        )


def _filter_define(ctx: ApiContext, p: dict[str, Any]) -> Json:
    cluster = ctx.cluster()
    if cluster is not None and not p["dry_run"]:
        return _define_result(cluster.define(p["xml"], source=p["source"]))
    if cluster is None and not p["dry_run"]:
        _local_pool(ctx, "define a filter")
    outcome = ctx.engine().define_filter(p["xml"], source=p["source"], dry_run=p["dry_run"])
    return _define_result(outcome)


def _filter_validate(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return _define_result(ctx.engine().define_filter(p["xml"], source=p["source"], dry_run=True))


def _filter_undefine(ctx: ApiContext, p: dict[str, Any]) -> Json:
    cluster = ctx.cluster()
    if cluster is not None:
        return {"name": cluster.undefine(p["name"]).name}
    _local_pool(ctx, "undefine a filter")
    return {"name": ctx.engine().undefine_filter(p["name"]).name}


def _cluster_status(ctx: ApiContext, p: dict[str, Any]) -> Json:
    cluster = ctx.cluster()
    if cluster is None:
        raise UnavailableError("this nwfilterd is not in a cluster (start it with --cluster)")
    return cluster.status()


def _filter_list(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return protocol.filter_rows(ctx.engine().pool.list_info())


def _filter_dumpxml(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return format_filter(ctx.engine().pool.lookup(p["name"]))


def _parse_bindings(p: dict[str, Any]) -> list[Any]:
    xmls: list[str] = p["xml"]
    sources: list[str] = p["sources"] or []
    if sources and len(sources) != len(xmls):
        raise ValidationError("parameter 'sources' must name every document of 'xml'")
    if not xmls:
        raise ValidationError("parameter 'xml' must hold at least one document")
    return [
        parse_binding(x, source=sources[i] if sources else "<request>")
        for i, x in enumerate(xmls)
    ]


def _unenforced(engine: Engine, portdevs: list[str] | None = None) -> list[str]:
    """Why ports (of `portdevs`, or all) are not enforced now, one line each."""
    return [
        f"port {port} is not enforced: {reason}"
        for port, reason in sorted(engine.enforcement(portdevs).items())
    ]


def _enforced(engine: Engine, portdev: str, unenforced: Mapping[str, str]) -> dict[str, Any]:
    reason = unenforced.get(portdev)
    return {"enforced": True} if reason is None else {"enforced": False, "reason": reason}


def _binding_create(ctx: ApiContext, p: dict[str, Any]) -> Json:
    defs = _parse_bindings(p)
    engine = ctx.engine()
    engine.create_bindings(defs)
    ports = [b.portdev for b in defs]
    return {"created": ports, "warnings": _unenforced(engine, ports)}


def _binding_validate(ctx: ApiContext, p: dict[str, Any]) -> Json:
    defs = _parse_bindings(p)
    ctx.engine().check_bindings(defs)
    return {"valid": [b.portdev for b in defs]}


def _binding_delete(ctx: ApiContext, p: dict[str, Any]) -> Json:
    ctx.engine().delete_binding(p["portdev"])
    return {"portdev": p["portdev"]}


def _binding_list(ctx: ApiContext, p: dict[str, Any]) -> Json:
    engine = ctx.engine()
    bindings = engine.list_bindings()
    unenforced = engine.enforcement() if bindings else {}
    return [
        {"portdev": b.portdev, "filter": b.filterref.filter,
         "owner": b.owner_name, "mac": b.mac, **_enforced(engine, b.portdev, unenforced)}
        for b in bindings
    ]


def _binding_dumpxml(ctx: ApiContext, p: dict[str, Any]) -> Json:
    engine = ctx.engine()
    portdev = p["portdev"]
    result: dict[str, Any] = {
        "xml": format_binding(engine.binding(portdev)),
        **_enforced(engine, portdev, engine.enforcement([portdev])),
    }
    result["learnt"] = learnt_rows(engine, portdev)
    if p["rules"]:
        result["rules"] = render_text(engine.ruleset(p["portdev"]))
    return result


def learnt_rows(engine: Engine, portdev: str) -> list[dict[str, Any]]:
    """The addresses learnt for a port: variable, address, source, lease."""
    return [
        {"variable": var, "address": a.address, "source": a.source,
         "learnt_at": a.learnt_at, "expires": a.expires, "server": a.server}
        for var, addrs in sorted(engine.learnt_details(portdev).items()) for a in addrs
    ]


def _domain_ifaddr(ctx: ApiContext, p: dict[str, Any]) -> Json:
    """virsh domifaddr: each interface's addresses, given or learnt."""
    manager = ctx.domains()
    engine = ctx.engine()
    out = []
    for row in manager.interfaces(manager.resolve(p["domain"])):
        if row.interface == "-":
            continue
        bound = engine.bindings.get(row.interface)
        given = bound.filterref.param_dict().get("IP", []) if bound is not None else []
        for address in given:
            out.append({"interface": row.interface, "mac": row.mac, "variable": "IP",
                        "address": address, "source": "given", "learnt_at": None,
                        "expires": None, "server": None})
        for learnt in learnt_rows(engine, row.interface):
            out.append({"interface": row.interface, "mac": row.mac, **learnt})
    return out


def domain_row(summary: DomainSummary) -> dict[str, Any]:
    return {
        "id": summary.id if summary.id >= 0 else None,
        "name": summary.name,
        "uuid": str(summary.uuid),
        "type": summary.type,
        "state": summary.state.value,
        "reason": summary.reason,
        "persistent": summary.persistent,
        "autostart": summary.autostart,
    }


def _domain_define(ctx: ApiContext, p: dict[str, Any]) -> Json:
    definition = ctx.domains().define(parse_domain(p["xml"], source=p["source"]))
    return {"name": definition.name, "uuid": str(definition.uuid)}


def _lifecycle(verb: str) -> Handler:
    def handler(ctx: ApiContext, p: dict[str, Any]) -> Json:
        manager = ctx.domains()
        name = manager.resolve(p["domain"])
        manager.run(verb, name)
        result: dict[str, Any] = {"name": name}
        if verb in ("start", "resume"):
            engine = ctx.engine()
            ports = [b.portdev for b in engine.list_bindings() if b.owner_name == name]
            result["warnings"] = _unenforced(engine, ports) if ports else []
        return result

    return handler


def _domain_list(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return [domain_row(s) for s in ctx.domains().list_domains(all_domains=True)]


def _domain_info(ctx: ApiContext, p: dict[str, Any]) -> Json:
    manager = ctx.domains()
    return domain_row(manager.state(manager.resolve(p["domain"])))


def _domain_dumpxml(ctx: ApiContext, p: dict[str, Any]) -> Json:
    manager = ctx.domains()
    return manager.dumpxml(manager.resolve(p["domain"]), inactive=p["inactive"])


def _domain_iflist(ctx: ApiContext, p: dict[str, Any]) -> Json:
    manager = ctx.domains()
    return [
        {"interface": r.interface, "type": r.type, "source": r.source, "model": r.model,
         "mac": r.mac, "filter": r.filter}
        for r in manager.interfaces(manager.resolve(p["domain"]))
    ]


def _domain_autostart(ctx: ApiContext, p: dict[str, Any]) -> Json:
    manager = ctx.domains()
    name = manager.resolve(p["domain"])
    manager.set_autostart(name, p["enable"])
    return {"name": name, "autostart": p["enable"]}


def _events_subscribe(ctx: ApiContext, p: dict[str, Any]) -> Subscribed:
    kinds = events.parse_kinds(p["kinds"])
    subscription = ctx.events().subscribe(kinds)
    names = sorted(k.value for k in kinds) if kinds is not None else list(events.SUBSCRIBABLE)
    return Subscribed({"kinds": names}, subscription)


def network_row(info: NetworkInfo) -> dict[str, Any]:
    return {
        "name": info.name, "uuid": info.uuid, "active": info.active,
        "persistent": info.persistent, "autostart": info.autostart, "bridge": info.bridge,
        "forward": info.forward, "dnsmasq_pid": info.dnsmasq_pid,
    }


def _net_define(ctx: ApiContext, p: dict[str, Any]) -> Json:
    net = ctx.networks().define(p["xml"], source=p["source"])
    return {"name": net.name, "uuid": str(net.uuid)}


def _net_verb(verb: str) -> Handler:
    def handler(ctx: ApiContext, p: dict[str, Any]) -> Json:
        manager = ctx.networks()
        calls: dict[str, Callable[[str], object]] = {
            "undefine": manager.undefine, "start": manager.start, "destroy": manager.destroy,
        }
        calls[verb](p["network"])
        return {"name": p["network"]}

    return handler


def _net_list(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return [network_row(i) for i in ctx.networks().list_networks()]


def _net_info(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return network_row(ctx.networks().info(p["network"]))


def _net_dumpxml(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return ctx.networks().dumpxml(p["network"], inactive=p["inactive"])


def _net_autostart(ctx: ApiContext, p: dict[str, Any]) -> Json:
    ctx.networks().set_autostart(p["network"], p["enable"])
    return {"name": p["network"], "autostart": p["enable"]}


def _audit_run(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return ctx.auditor().run(ctx.engine(), ctx.domains(), p["ports"] or None)


def _audit_fix(ctx: ApiContext, p: dict[str, Any]) -> Json:
    return {"commands": ctx.engine().reconcile()}


def _explain_packet(ctx: ApiContext, p: dict[str, Any]) -> Json:
    from nwfilter.audit.explain import Explainer, hook_of, semantics_of
    from nwfilter.ir import CtState

    hook = hook_of(p["direction"])
    state = None
    if p["ct_state"]:
        try:
            state = CtState(p["ct_state"])
        except ValueError:
            raise ValidationError(f"ct_state must be one of "
                                  f"{', '.join(s.value for s in CtState)}") from None
    frames = []
    for text in p["frames"]:
        try:
            frames.append(bytes.fromhex(text))
        except ValueError:
            raise ValidationError("each frame must be hex") from None
    engine = ctx.engine()
    explainer = Explainer(engine.ruleset(p["port"]), backend=semantics_of(engine.backend.name))
    return [explainer.explain(hook, f, ct_state=state, ct_dir=p["ct_dir"]).as_json()
            for f in frames]


def _stats_get(ctx: ApiContext, p: dict[str, Any]) -> Json:
    from nwfilter.audit.stats import port_stats

    return port_stats(ctx.engine(), p["ports"] or None)


_XML = Param("xml", str, required=True)
_SOURCE = Param("source", str, "<request>")
_DOMAIN = Param("domain", str, required=True)
_NETWORK = Param("network", str, required=True)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("filter.define", _filter_define,
               (_XML, _SOURCE, Param("dry_run", bool, False)), writes=True),
        Method("filter.validate", _filter_validate, (_XML, _SOURCE)),
        Method("filter.undefine", _filter_undefine, (Param("name", str, required=True),),
               writes=True),
        Method("filter.list", _filter_list),
        Method("filter.dumpxml", _filter_dumpxml, (Param("name", str, required=True),)),
        # Binding calls load the domains: a port a running domain holds is
        # refused to a hand-made binding.
        Method("binding.create", _binding_create,
               (Param("xml", list, required=True), Param("sources", list)), writes=True,
               domains=True),
        Method("binding.validate", _binding_validate,
               (Param("xml", list, required=True), Param("sources", list)), domains=True),
        Method("binding.delete", _binding_delete, (Param("portdev", str, required=True),),
               writes=True),
        Method("binding.list", _binding_list),
        Method("binding.dumpxml", _binding_dumpxml,
               (Param("portdev", str, required=True), Param("rules", bool, False))),
        Method("domain.define", _domain_define, (_XML, _SOURCE), writes=True, domains=True),
        *(
            Method(f"domain.{verb}", _lifecycle(verb), (_DOMAIN,), writes=True, domains=True)
            for verb in VERBS
        ),
        Method("domain.list", _domain_list, domains=True),
        Method("domain.info", _domain_info, (_DOMAIN,), domains=True),
        Method("domain.dumpxml", _domain_dumpxml, (_DOMAIN, Param("inactive", bool, False)),
               domains=True),
        Method("domain.iflist", _domain_iflist, (_DOMAIN,), domains=True),
        Method("domain.ifaddr", _domain_ifaddr, (_DOMAIN,), domains=True),
        Method("domain.autostart", _domain_autostart,
               (_DOMAIN, Param("enable", bool, True)), writes=True, domains=True),
        Method("network.define", _net_define, (_XML, _SOURCE), writes=True),
        *(
            Method(f"network.{verb}", _net_verb(verb), (_NETWORK,), writes=True)
            for verb in ("undefine", "start", "destroy")
        ),
        Method("network.list", _net_list),
        Method("network.info", _net_info, (_NETWORK,)),
        Method("network.dumpxml", _net_dumpxml, (_NETWORK, Param("inactive", bool, False))),
        Method("network.autostart", _net_autostart,
               (_NETWORK, Param("enable", bool, True)), writes=True),
        Method("audit.run", _audit_run, (Param("ports", list),), domains=True),
        Method("audit.fix", _audit_fix, writes=True),
        Method("explain.packet", _explain_packet,
               (Param("port", str, required=True), Param("direction", str, required=True),
                Param("frames", list, required=True), Param("ct_state", str),
                Param("ct_dir", str))),
        Method("stats.get", _stats_get, (Param("ports", list),)),
        # The reply is followed by one {"event": ...} line per event until the
        # client closes (nwfilter.connserver.Streaming).
        Method("events.subscribe", _events_subscribe, (Param("kinds", list),)),
        Method("cluster.status", _cluster_status),
    )
}


def method(name: Any) -> Method:
    """The method called `name`, or ValidationError."""
    found = METHODS.get(name) if isinstance(name, str) else None
    if found is None:
        shown = name if isinstance(name, str) and len(name) <= 64 else "(invalid)"
        raise ValidationError(f"unknown method {shown!r}")
    return found


def invoke(
    ctx: ApiContext, name: Any, params: Any, *, read_only: bool = False,
    channel: str = "this connection",
) -> Json:
    """Check and run one call; NwfilterError for every refusal.  With
    `read_only`, a method that changes state is refused (before its
    parameters are looked at) as `PermissionDeniedError` naming `channel`."""
    found = method(name)
    if read_only and found.writes:
        raise PermissionDeniedError(
            f"method '{found.name}' changes state; {channel} allows queries only"
        )
    checked = check_params(found, params)
    return found.handler(ctx, checked)


# -- the embedded control path ------------------------------------------------------------


class EmbeddedContext:
    """An engine (and domain manager) built on demand for one command.

    Calls that change nothing run against a read-only engine, which never
    touches the kernel; the first call that writes starts a writable one."""

    def __init__(self, factory: Callable[[bool], Engine], netns: str | None) -> None:
        self._factory = factory
        self._netns = netns
        self._engine: Engine | None = None
        self._manager: DomainManager | None = None
        self._networks: NetworkManager | None = None
        self._writable = False
        self.writes = False  # what the call being served needs

    def engine(self) -> Engine:
        if self._engine is not None and self.writes and not self._writable:
            self.close()
        if self._engine is None:
            self._engine = self._factory(not self.writes)
            self._writable = self.writes
        return self._engine

    def domains(self) -> DomainManager:
        from nwfilter.domain.manager import DomainManager

        engine = self.engine()
        if self._manager is None:
            networks = self.networks()
            manager = DomainManager.for_engine(engine, netns=self._netns,
                                               networks=networks.attachment)
            manager.start(autostart=False, take_over=self._writable)
            self._manager = manager
        return self._manager

    def networks(self) -> NetworkManager:
        from nwfilter.network.manager import NetworkManager

        engine = self.engine()
        if self._networks is None:
            networks = NetworkManager(engine.root, engine.backend.netns, lambda: engine.owner,
                                      events=engine.events)
            networks.load(write=self._writable)
            self._networks = networks
        return self._networks

    def events(self) -> events.EventBus:
        raise UnavailableError(
            "events need nwfilterd serving the root: an engine in this process "
            "cannot see what other processes do"
        )

    def cluster(self) -> ClusterMember | None:
        return None

    def auditor(self) -> Auditor:
        from nwfilter.audit.run import Auditor

        return Auditor()  # one command, one audit: nothing to keep

    def close(self) -> None:
        self._manager = None
        self._networks = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class EmbeddedCaller:
    """Answers API calls in this process, as the daemon would."""

    def __init__(self, context: EmbeddedContext) -> None:
        self._context = context

    def call(self, method_name: str, params: dict[str, Any] | None = None) -> Any:
        found = method(method_name)
        self._context.writes = found.writes
        if found.domains:
            self._context.domains()
        result = invoke(self._context, method_name, params or {})
        # The very JSON the daemon would send: both paths print the same.
        return protocol.decode(protocol.encode({"result": result}))["result"]

    def close(self) -> None:
        self._context.close()


def known_methods() -> list[str]:
    return sorted(METHODS)
