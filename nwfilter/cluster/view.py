"""The pool as a sequence of etcd changes would leave it, checked change by change.

A pool document comes from etcd, where any client with access can write
anything; a host applies one only if it is a filter that the local pool
would accept: it parses, it is the filter its key names, in canonical
form, its UUID is not another filter's and it closes no reference loop.
A change that fails is refused with the reason, and the pool keeps the
last good definition of that filter; the changes after it are checked
against that.
"""

from __future__ import annotations

from collections.abc import Mapping
from uuid import UUID

import networkx as nx

from nwfilter.conf import parse_filter
from nwfilter.conf.model import FilterDef
from nwfilter.errors import ConflictError, LoopError, NwfilterError, ValidationError
from nwfilter.pool import FilterPool, validate_filter_name

#: what a batch does to a filter: its new definition and text, or None (removed)
Change = tuple[FilterDef, str] | None


class PoolView:
    """A scratch copy of a pool to check changes against, in order."""

    def __init__(self, defs: Mapping[str, FilterDef]) -> None:
        self._defs = dict(defs)
        self._by_uuid: dict[UUID, str] = {f.uuid: n for n, f in self._defs.items()}
        self._graph: nx.DiGraph[str] = nx.DiGraph()
        for name, fdef in self._defs.items():
            self._graph.add_node(name)
            self._graph.add_edges_from((name, ref) for ref in fdef.referenced_names())
        self.changes: dict[str, Change] = {}

    def get(self, name: str) -> FilterDef | None:
        return self._defs.get(name)

    def names(self) -> list[str]:
        return sorted(self._defs)

    def check(self, name: str, data: bytes, where: str) -> tuple[FilterDef, str]:
        """The filter `data` defines under key name `name`, checked; or raise."""
        validate_filter_name(name)
        fdef = parse_filter(data, source=where)
        if fdef.name != name:
            raise ValidationError(f"{where}: holds filter '{fdef.name}', not '{name}'")
        fdef, text = FilterPool.canonical(fdef)
        owner = self._by_uuid.get(fdef.uuid)
        if owner is not None and owner != name:
            raise ConflictError(f"{where}: UUID {fdef.uuid} is filter '{owner}''s")
        for ref in sorted(fdef.referenced_names()):
            if ref == name or (ref in self._graph and name in self._graph
                               and nx.has_path(self._graph, ref, name)):
                raise LoopError(f"{where}: filter '{name}' would close a reference loop "
                                f"through '{ref}'")
        return fdef, text

    def put(self, fdef: FilterDef, text: str) -> None:
        old = self._defs.get(fdef.name)
        if old is not None:
            self._by_uuid.pop(old.uuid, None)
            self._graph.remove_edges_from(list(self._graph.out_edges(fdef.name)))
        self._defs[fdef.name] = fdef
        self._by_uuid[fdef.uuid] = fdef.name
        self._graph.add_node(fdef.name)
        self._graph.add_edges_from((fdef.name, ref) for ref in fdef.referenced_names())
        self.changes[fdef.name] = (fdef, text)

    def delete(self, name: str) -> None:
        old = self._defs.pop(name, None)
        if old is None:
            return
        self._by_uuid.pop(old.uuid, None)
        self._graph.remove_edges_from(list(self._graph.out_edges(name)))
        self.changes[name] = None

    def apply_put(self, name: str, data: bytes, where: str) -> None:
        """Check and take a definition; NwfilterError (nothing taken) if bad."""
        try:
            fdef, text = self.check(name, data, where)
        except NwfilterError:
            raise
        except Exception as exc:  # a document must never stop the watcher
            raise ValidationError(f"{where}: cannot be read: {exc}") from exc
        self.put(fdef, text)
