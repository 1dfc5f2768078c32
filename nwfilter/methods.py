"""The daemon's methods: a table from wire name to handler and its parameters.

The layer is thin: `answer` decodes a request line, checks the method, the
names and the types of its parameters (a boolean is a JSON boolean, a string
a JSON string), calls the engine and maps `NwfilterError`s to replies by
their code.  It never raises: every line gets exactly one reply line.  A
socket serves a `MethodTable`; a socket with fewer rights serves a smaller
table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nwfilter import protocol
from nwfilter.conf import format_binding, format_filter, parse_binding
from nwfilter.engine import Engine
from nwfilter.errors import NwfilterError, ValidationError
from nwfilter.render_text import render_text

log = logging.getLogger(__name__)


class Params:
    """A request's parameters, read with their types checked."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def string(self, key: str) -> str:
        value = self._values.get(key)
        if not isinstance(value, str):
            raise ValidationError(f"parameter '{key}' must be a string")
        return value

    def flag(self, key: str) -> bool:
        """An optional boolean, false when absent."""
        value = self._values.get(key, False)
        if not isinstance(value, bool):
            raise ValidationError(f"parameter '{key}' must be true or false")
        return value

    def strings(self, key: str) -> list[str]:
        value = self._values.get(key)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValidationError(f"parameter '{key}' must be a list of strings")
        return value


Handler = Callable[[Engine, Params], Any]


@dataclass(frozen=True)
class Method:
    handler: Handler
    params: frozenset[str] = frozenset()


MethodTable = Mapping[str, Method]


def _filter_define(engine: Engine, params: Params) -> Any:
    xml, dry_run = params.string("xml"), params.flag("dry_run")
    outcome = engine.define_filter(xml, source="<request>", dry_run=dry_run)
    return {"summary": outcome.describe()}


def _filter_undefine(engine: Engine, params: Params) -> Any:
    engine.undefine_filter(params.string("name"))
    return None


def _filter_list(engine: Engine, params: Params) -> Any:
    return protocol.filter_rows(engine.pool.list_info())


def _filter_dumpxml(engine: Engine, params: Params) -> Any:
    return format_filter(engine.pool.lookup(params.string("name")))


def _binding_create(engine: Engine, params: Params) -> Any:
    defs = [parse_binding(x, source="<request>") for x in params.strings("xml")]
    engine.create_bindings(defs)
    return None


def _binding_delete(engine: Engine, params: Params) -> Any:
    engine.delete_binding(params.string("portdev"))
    return None


def _binding_list(engine: Engine, params: Params) -> Any:
    return [{"portdev": b.portdev, "filter": b.filterref.filter} for b in engine.list_bindings()]


def _binding_dumpxml(engine: Engine, params: Params) -> Any:
    portdev, rules = params.string("portdev"), params.flag("rules")
    result = {"xml": format_binding(engine.binding(portdev))}
    if rules:
        result["rules"] = render_text(engine.ruleset(portdev))
    return result


ADMIN_METHODS: MethodTable = {
    "filter.define": Method(_filter_define, frozenset({"xml", "dry_run"})),
    "filter.undefine": Method(_filter_undefine, frozenset({"name"})),
    "filter.list": Method(_filter_list),
    "filter.dumpxml": Method(_filter_dumpxml, frozenset({"name"})),
    "binding.create": Method(_binding_create, frozenset({"xml"})),
    "binding.delete": Method(_binding_delete, frozenset({"portdev"})),
    "binding.list": Method(_binding_list),
    "binding.dumpxml": Method(_binding_dumpxml, frozenset({"portdev", "rules"})),
}


def dispatch(engine: Engine, methods: MethodTable, request: protocol.Request) -> Any:
    """The result of one checked request; raises `NwfilterError`."""
    method = methods.get(request.method)
    if method is None:
        raise ValidationError(f"unknown method '{request.method[:64]}'")
    unknown = sorted(set(request.params) - method.params)
    if unknown:
        raise ValidationError(
            f"method '{request.method}' takes no parameter '{unknown[0][:64]}'"
        )
    return method.handler(engine, Params(request.params))


def answer(engine: Engine, methods: MethodTable, line: bytes) -> tuple[bytes, str | None]:
    """The reply line to one request line, and why the request was refused
    as malformed (None when it was well-formed, even if the engine said no)."""
    try:
        request = protocol.decode_request(line)
    except protocol.RequestError as exc:
        return protocol.encode(protocol.error_reply(exc.request_id, exc)), exc.message
    try:
        reply = {"id": request.id, "result": dispatch(engine, methods, request)}
    except NwfilterError as exc:
        reply = protocol.error_reply(request.id, exc)
    except Exception as exc:  # a bug must answer, not leave the client waiting
        log.exception("internal error while serving %r", request.method)
        reply = protocol.error_reply(request.id, NwfilterError(f"internal error: {exc}"))
    try:
        return protocol.encode(reply), None
    except (TypeError, ValueError) as exc:
        log.error("reply to %r cannot be encoded: %s", request.method, exc)
        failure = NwfilterError(f"internal error: reply cannot be encoded: {exc}")
        return protocol.encode(protocol.error_reply(request.id, failure)), None
