"""What a binding compiles from, as one digest, and what each such source
compiled to.

Compiling every binding is most of what a start costs once the kernel is
proven in force without rendering (see the nft backend's port stamps).  A
compile is a pure function of its sources: the binding, the definitions of
every filter its root filter reaches (by name; a name not defined counts
as such), the addresses learnt for its port and the code that parses and
compiles them.  `SourceStamps.of` digests exactly those (the code as the
source of the `nwfilter` package, so any other version of it is another
source), and `CompiledIndex` keeps, per port, the last source digest and the
`ruleset_digest` of what it compiled to, in `ROOT/run/compiled.json`.

Since an entry states a fact about a pure function, an old or half-written
entry is never wrong, only useless: a start that finds its port's source
digest unchanged hands the backend the recorded ruleset digest with the
compile deferred (`nwfilter.backends.base.Deferred`), and the backend
compiles only when the kernel does not prove that digest in force.  A
filter edit changes the source digest of exactly the bindings whose root
filter reaches the filter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from nwfilter.conf.filter_xml import filter_element
from nwfilter.conf.model import BindingDef, FilterDef
from nwfilter.conf.safexml import serialize
from nwfilter.errors import NwfilterError
from nwfilter.fileio import SafeDir

log = logging.getLogger(__name__)

INDEX_NAME = "compiled.json"
INDEX_VERSION = 1


@functools.cache
def code_digest() -> str:
    """The digest of the `nwfilter` package's source, read once."""
    package = Path(__file__).resolve().parent
    out = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        out.update(str(path.relative_to(package)).encode() + b"\0")
        out.update(path.read_bytes() + b"\0")
    return out.hexdigest()


class SourceStamps:
    """Source digests against one pool snapshot (`filters`, with `reaches`
    giving every name a filter references, directly or not)."""

    def __init__(
        self, filters: Mapping[str, FilterDef], reaches: Callable[[str], frozenset[str]]
    ) -> None:
        self._filters = filters
        self._reaches = reaches
        self._closures: dict[str, str] = {}
        self._texts: dict[str, str] = {}

    def of(self, binding: BindingDef, learnt: Mapping[str, Sequence[str]] | None) -> str:
        """The source digest of `binding` with the `learnt` values of its port."""
        fields = [
            binding.owner_name, str(binding.owner_uuid), binding.portdev, binding.mac,
            binding.linkdev, binding.filterref.filter,
            [[p.name, p.value] for p in binding.filterref.params],
            sorted([name, list(values)] for name, values in (learnt or {}).items()),
            self._closure(binding.filterref.filter), code_digest(),
        ]
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def _closure(self, root: str) -> str:
        found = self._closures.get(root)
        if found is None:
            out = hashlib.sha256()
            for name in sorted(self._reaches(root) | {root}):
                out.update(f"{name}\0{self._text(name)}\0".encode("utf-8", "surrogatepass"))
            found = self._closures[root] = out.hexdigest()
        return found

    def _text(self, name: str) -> str:
        found = self._texts.get(name)
        if found is None:
            fdef = self._filters.get(name)
            found = "" if fdef is None else "defined\0" + serialize(filter_element(fdef))
            self._texts[name] = found
        return found


class CompiledIndex:
    """`ROOT/run/compiled.json`: per port, (source digest, ruleset digest)."""

    def __init__(self, run_dir: SafeDir) -> None:
        self._dir = run_dir

    def load(self) -> dict[str, tuple[str, str]]:
        """The entries; none when the file is missing or unusable."""
        try:
            raw = self._dir.read_if_exists(INDEX_NAME)
            if raw is None:
                return {}
            data = json.loads(raw)
            if data.get("version") != INDEX_VERSION:
                return {}
            return {str(port): (str(entry[0]), str(entry[1]))
                    for port, entry in data["ports"].items()}
        except NwfilterError as exc:
            log.warning("ignoring the compile index: %s", exc.message)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            log.warning("ignoring the compile index '%s': %s", self._dir.path / INDEX_NAME, exc)
        return {}

    def save(self, entries: Mapping[str, tuple[str, str]]) -> None:
        """Replace the entries (atomically); a failure is logged: it costs
        the next start its shortcut, nothing else."""
        text = json.dumps({"version": INDEX_VERSION,
                           "ports": {p: list(e) for p, e in sorted(entries.items())}},
                          separators=(",", ":"))
        try:
            self._dir.write(INDEX_NAME, text)
        except NwfilterError as exc:
            log.warning("the compile index is not written: %s", exc.message)
