"""The ebiptables backend's applier: the only code that runs the restore/save tools.

Each transaction is at most one `iptables-restore --noflush`, one
`ip6tables-restore --noflush` and one `ebtables-restore --noflush` (only
the tables that change; each one kernel commit), in that order.  If a later
one fails, the earlier ones are undone with the inverse difference, so a
failed transaction leaves the old rules.  What the backend owns is kept per
port (`render.Tables`), updated only after every tool said yes; the apply
path never reads the kernel.  `reconcile()` reads the three tables back
with the `*-save` tools and writes only the difference (nothing differs:
no restore runs at all).

Ownership: the iptables `filter` table holds a chain `nwfilter-owner` (never
jumped to) whose one rule's comment names the root.  It is created with
`-N`, which fails when it exists, so of two roots claiming at once one wins.
It goes with the last port, together with the shared `libvirt-*` chains
when they hold no other rules.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable, Sequence

from nwfilter.backends import brnf
from nwfilter.backends.base import Owner, Wanted, compiled
from nwfilter.errors import BackendError, ConflictError, UnavailableError
from nwfilter.ir import Changes, Ruleset
from nwfilter.locks import Level, LevelledLock
from nwfilter.netns import in_netns

from . import plan, render
from .plan import Saved
from .render import EB, IP4, IP6, OWNER_CHAIN, SHARED_CHAINS, Tables
from .tools import PACKAGES, Runner

log = logging.getLogger(__name__)

ORDER = (IP4, IP6, EB)
_TOOLS = {EB: ("ebtables-restore", "ebtables-save", "nat"),
          IP4: ("iptables-restore", "iptables-save", "filter"),
          IP6: ("ip6tables-restore", "ip6tables-save", "filter")}
_LINE = re.compile(r"line (\d+)")


def _merge(parts: Iterable[Tables]) -> Tables:
    out = Tables()
    for part in parts:
        out.merge(part)
    return out


class EbiptablesBackend:
    """libvirt's ebtables/iptables layout, applied with the restore tools."""

    name = "ebiptables"

    def __init__(self, netns: str | None = None, *, lock: LevelledLock | None = None,
                 manage_sysctls: bool = True) -> None:
        self.netns = netns
        self.runner = Runner(netns)
        self._lock = lock or LevelledLock(f"ebiptables backend {netns or 'host'}",
                                          Level.BACKEND)
        self._manage_sysctls = manage_sysctls
        self._ports: dict[str, Tables] = {}
        self._rulesets: dict[str, Ruleset] = {}
        self._shared: set[str] = set()  # layer-3 tables whose shared chains are in place
        self._owner: Owner | None = None
        self._claimed = False
        self.restores = 0  # restore runs that changed the kernel (for tests and benchmarks)

    # -- plumbing ------------------------------------------------------------
    def _where(self) -> str:
        return self.runner.where()

    def _save(self, table: str) -> Saved:
        _restore, save, name = _TOOLS[table]
        return Saved(self.runner.save(save, name))

    def _restore(self, table: str, lines: Sequence[str]) -> str | None:
        text = plan.restore_text(table, lines)
        error = self.runner.restore(_TOOLS[table][0], text)
        if error is None:
            self.restores += 1
            return None
        m = _LINE.search(error)
        if m:
            numbered = text.splitlines()
            n = int(m.group(1))
            if 0 < n <= len(numbered):
                error += f" (line {n}: {numbered[n - 1]})"
        return error

    def _ensure_sysctls(self) -> None:
        if self._manage_sysctls:
            with in_netns(self.netns):
                brnf.ensure(self._where())

    def _transact(self, held: Tables, want: Tables, saved: dict[str, Saved] | None = None,
                  what: str = "") -> int:
        """Turn `held` into `want` (both: some ports' objects), one restore
        per changed table; undo the done ones when a later one fails."""
        bodies: dict[str, list[str]] = {}
        for table in ORDER:
            lines = plan.diff(table, held, want)
            if table != EB and table in want.families() and table not in self._shared:
                known = saved[table] if saved is not None else self._save(table)
                lines = plan.shared_lines(known) + lines
            if lines:
                bodies[table] = lines
        done: list[str] = []
        for table, lines in bodies.items():
            error = self._restore(table, lines)
            if error is None:
                done.append(table)
                if table != EB and table in want.families():
                    self._shared.add(table)
                continue
            for back in reversed(done):
                undo = plan.diff(back, want, held)
                if undo and self._restore(back, undo) is not None:
                    log.error("ebiptables: could not undo the %s part of a failed transaction "
                              "in %s", back, self._where())
            raise BackendError(f"{_TOOLS[table][0]} refused the rules{what} in "
                               f"{self._where()}: {error}; nothing was changed")
        return len(bodies)

    # -- ownership -----------------------------------------------------------
    def _read_owner(self, saved: Saved | None = None) -> Owner | None:
        label = (saved or self._save(IP4)).owner_label()
        return None if label is None else Owner.from_label(label)

    def _refuse(self, held: Owner) -> ConflictError:
        mine = f" (this is {self._owner.describe()})" if self._owner else ""
        return ConflictError(f"the nwfilter chains of {self._where()} are owned by "
                             f"{held.describe()}{mine}; nothing was changed")

    def _claim(self, saved: Saved | None = None) -> None:
        if self._claimed:
            return
        held = self._read_owner(saved)
        if held is not None:
            if self._owner is not None and not held.same_root(self._owner):
                raise self._refuse(held)
            self._claimed = self._owner is not None
            return
        if self._owner is None:
            return
        label = render._comment(self._owner.label())
        error = self._restore(IP4, [f"-N {OWNER_CHAIN}",
                                    f'-A {OWNER_CHAIN} -m comment --comment "{label}"'])
        if error is not None:
            held = self._read_owner()
            if held is not None and not held.same_root(self._owner):
                raise self._refuse(held) from None
            if held is None:
                raise BackendError(f"cannot claim the nwfilter chains of {self._where()}: "
                                   f"{error}")
        self._claimed = True

    def set_owner(self, owner: Owner) -> None:
        self._owner = owner

    def owner(self) -> Owner | None:
        with self._lock:
            return self._read_owner()

    # -- Backend protocol ----------------------------------------------------
    def probe(self) -> None:
        for tool in PACKAGES:
            if shutil.which(tool) is None:
                raise UnavailableError(
                    f"'{tool}' is not installed: install the Debian package {PACKAGES[tool]}")
        with in_netns(self.netns):
            if not brnf.available():
                raise UnavailableError(
                    "br_netfilter is not loaded (modprobe br_netfilter): iptables rules "
                    "need it to see bridged traffic")

    def check(self, ruleset: Ruleset) -> None:
        render.render_port(ruleset)

    def apply(self, changes: Changes) -> None:
        if changes.replace_all:
            self.reconcile(changes.set)
            return
        if changes.is_empty():
            return
        rendered = {rs.port.portdev: render.render_port(rs) for rs in changes.set}
        touched = set(rendered) | set(changes.remove)
        with self._lock:
            held = _merge(self._ports[p] for p in sorted(touched) if p in self._ports)
            want = _merge(rendered.values())
            if rendered:
                self._claim()
                self._ensure_sysctls()
            names = ", ".join(f"'{p}'" for p in sorted(touched))
            self._transact(held, want, what=f" of port {names}")
            for portdev in changes.remove:
                self._ports.pop(portdev, None)
                self._rulesets.pop(portdev, None)
            for rs in changes.set:
                self._ports[rs.port.portdev] = rendered[rs.port.portdev]
                self._rulesets[rs.port.portdev] = rs
            if not self._ports and changes.remove:
                self._cleanup()

    def reconcile(self, items: Sequence[Wanted]) -> int:
        # Nothing here proves a port in force without its rules: a deferred
        # ruleset is compiled now.
        rulesets = [compiled(item) for item in items]
        wanted = {rs.port.portdev: rs for rs in rulesets}
        if len(wanted) != len(rulesets):
            raise BackendError("a port is given twice to reconcile")
        rendered = {p: render.render_port(rs) for p, rs in wanted.items()}
        with self._lock:
            return self._reconcile_locked(rulesets, wanted, rendered)

    def repair(self) -> int:
        """Bring the kernel back to what this backend applied last (another
        program flushed or edited our chains), writing only the difference;
        the number of restore runs (0: nothing had changed).  What is
        applied is read under the same lock as the repair, so a change the
        engine makes meanwhile is never undone."""
        with self._lock:
            if not self._rulesets:
                return 0
            wanted = dict(self._rulesets)
            return self._reconcile_locked(list(wanted.values()), wanted, dict(self._ports))

    def _reconcile_locked(
        self, rulesets: Sequence[Ruleset], wanted: dict[str, Ruleset],
        rendered: dict[str, Tables],
    ) -> int:
        saved = {t: self._save(t) for t in ORDER}
        if rulesets:
            self._claim(saved[IP4])
            self._ensure_sysctls()
        else:
            held_owner = self._read_owner(saved[IP4])
            if held_owner is not None and self._owner is not None \
                    and not held_owner.same_root(self._owner):
                raise self._refuse(held_owner)
        held = _merge(plan.ours(t, saved[t]) for t in ORDER)
        self._shared = {t for t in (IP4, IP6) if plan.shared_ready(saved[t])}
        writes = self._transact(held, _merge(rendered.values()), saved)
        self._ports = rendered
        self._rulesets = dict(wanted)
        if not rulesets:
            self._cleanup()
        return writes

    def _cleanup(self) -> None:
        """No port left: remove the owner chain and the shared chains that
        hold nothing (and the jumps to them)."""
        for table in (IP4, IP6):
            saved = self._save(table)
            lines: list[str] = []
            empty = [n for n in SHARED_CHAINS if n in saved.chains and not saved.chains[n]]
            for base, spec in render.BASE_JUMPS:
                target = spec.split()[-1]
                if target in empty and spec in saved.chains.get(base, ()):
                    lines.append(f"-D {base} {spec}")
            lines.extend(f"-X {n}" for n in empty)
            if table == IP4 and OWNER_CHAIN in saved.chains:
                lines += [f"-F {OWNER_CHAIN}", f"-X {OWNER_CHAIN}"]
            if lines:
                error = self._restore(table, lines)
                if error is not None:
                    log.warning("ebiptables: leftovers in %s not removed: %s",
                                self._where(), error)
            self._shared.discard(table)
        self._claimed = False

    def recorded(self) -> dict[str, Ruleset]:
        with self._lock:
            return dict(self._rulesets)

    def clear(self, portdev: str) -> None:
        if portdev in self._ports:
            self.apply(Changes(remove=(portdev,)))

    def clear_all(self) -> None:
        with self._lock:
            if self._owner is not None:
                held = self._read_owner()
                if held is not None and not held.same_root(self._owner):
                    raise self._refuse(held)
            saved = {t: self._save(t) for t in ORDER}
            held_tables = _merge(plan.ours(t, saved[t]) for t in ORDER)
            self._transact(held_tables, Tables())
            self._ports = {}
            self._rulesets = {}
            self._cleanup()

    def ports(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._ports))

    def counted_tables(self) -> dict[str, str]:
        """Each table as `*-save -c` prints it, with every rule's packet and
        byte counters (for `nwfilter stats`); changes nothing."""
        with self._lock:
            return {table: self.runner.save(_TOOLS[table][1], _TOOLS[table][2], counters=True)
                    for table in ORDER}

    def read_back(self, portdev: str) -> str:
        word = re.compile(rf"(?<![\w.-]){re.escape(portdev)}(?![\w.])")
        out: list[str] = []
        with self._lock:
            for table in ORDER:
                tool = _TOOLS[table][1]
                lines = [line for line in self.runner.save(tool, _TOOLS[table][2]).splitlines()
                         if word.search(line.replace("-" + portdev, " " + portdev))]
                if lines:
                    out.append(f"# {tool} -t {_TOOLS[table][2]}")
                    out.extend(lines)
        return "\n".join(out) + ("\n" if out else "")

    def preconditions(self, *, repair: bool = False, scan: bool = True,
                      cached: bool = False) -> tuple[str, ...]:
        with in_netns(self.netns):
            return tuple(brnf.problems(self._where(), repair=repair and self._manage_sysctls))

__all__ = ["EbiptablesBackend"]
