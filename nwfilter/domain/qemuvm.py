"""The `qemu` hypervisor: guests are real QEMU processes.

One hypervisor serves `<domain type='kvm'>` (hardware virtualisation,
needs a usable `/dev/kvm`) and `<domain type='qemu'>` (TCG emulation,
runs anywhere).  What a guest gets from its document: `memory`, `vcpu`,
each interface as a NIC (its `<model>`, virtio by default, its MAC and
its option `<rom>`), a direct kernel boot from `<os><kernel>`,
`<initrd>`, `<cmdline>`, and the serial ports and console
(`nwfilter.domain.qemuboot`).  Disks, graphics and the rest are kept in
the document, not given to QEMU.

Start, fail closed (libvirt's order):

1. `prepare`: one persistent tap device per interface in the root's
   network namespace (pyroute2, `nwfilter.domain.links`), named by the
   driver (`<target dev>` or `vnetN`), its MAC `fe:` + the guest's tail as
   libvirt does, enslaved to the interface's bridge, left down;
2. the driver applies the filters of every port;
3. `launch`: QEMU starts paused (`-S`) with its NICs on those taps and a
   QMP monitor on a socket this module listens on (`ROOT/run/hypervisor/
   <type>/<name>.qmp`, passed to QEMU as a descriptor, so its path length
   does not matter); capabilities are negotiated, the taps are set up, and
   only then `cont` lets the guest run.  The domain runs once QEMU reports
   `running`.

Every monitor command has a timeout (`nwfilter.domain.qmp`); a QEMU that
does not answer fails its own domain's calls only.  The monitor is watched
by the domain core's event loop; its asynchronous events reach the driver
through `set_event_sink` as (domain, kind, reason): `paused` and `running`
(QEMU's STOP and RESUME), `panicked` (GUEST_PANICKED), and `exited` when
QEMU goes away on its own (reason `shutdown` after a SHUTDOWN event,
`destroyed` after `kill`, else `crashed`).  Nothing is reported for a
process this module is stopping.

Each guest's record (`<name>.json`: its taps, QEMU's pid and start time)
lets a restarted engine find the process again (`is_alive`, which checks
that the pid is still that QEMU) and reconnect its monitor (`reconnect`).
QEMU's own messages go to `<name>.log`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nwfilter.conf.model import DomainDef
from nwfilter.conf.values import check_port_name
from nwfilter.domain.eventloop import EventLoop
from nwfilter.domain.hypervisor import Hypervisor, HypervisorEnv, PortPlan
from nwfilter.domain.links import Links, host_mac
from nwfilter.domain.qemuboot import read_boot
from nwfilter.domain.qmp import COMMAND_TIMEOUT, Monitor, MonitorTimeoutError
from nwfilter.errors import (
    BackendError,
    NwfilterError,
    StateError,
    StorageError,
    UnavailableError,
    ValidationError,
)
from nwfilter.fileio import DirHandle
from nwfilter.netns import in_netns

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
KVM_DEVICE = "/dev/kvm"
START_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 30.0
_KILL_WAIT = 10.0
_DEFAULT_MEMORY_MIB = 128
_NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
               "rtl8139": "rtl8139", "ne2k_pci": "ne2k_pci", "pcnet": "pcnet"}

#: (domain, kind, reason): 'paused', 'running', 'panicked', or 'exited'
EventSink = Callable[[str, str, str], None]


@dataclass
class _Run:
    """One QEMU process of a domain, as this engine knows it."""

    name: str
    ports: list[str]
    pid: int | None = None
    start: int | None = None  # /proc/<pid>/stat start time: the pid is still this QEMU
    popen: subprocess.Popen[bytes] | None = None
    monitor: Monitor | None = None
    stopping: bool = False  # being stopped here: its exit is no event
    exit_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of process `pid`, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


class QemuHypervisor:
    """QEMU processes with filtered tap devices; see the module docstring."""

    def __init__(
        self,
        dtype: str,
        run_dir: Path,
        netns: str | None = None,
        loop: EventLoop | None = None,
        *,
        binary: str = QEMU_BINARY,
        command_timeout: float = COMMAND_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        if dtype not in ("kvm", "qemu"):
            raise ValidationError(f"the qemu hypervisor runs types 'kvm' and 'qemu', not '{dtype}'")
        self.name = dtype
        self.run_dir = run_dir
        self._dir = DirHandle(run_dir, f"{dtype} hypervisor directory")
        self.netns = netns
        self.binary = binary
        self.command_timeout = command_timeout
        self.start_timeout = start_timeout
        self.shutdown_timeout = shutdown_timeout
        self._loop = loop
        self._own_loop = False
        self._lock = threading.Lock()  # a leaf: guards `_runs` and `_loop`
        self._runs: dict[str, _Run] = {}
        self._sink: EventSink | None = None

    # -- wiring ------------------------------------------------------------

    def set_event_sink(self, sink: EventSink) -> None:
        """Where asynchronous guest events go (called from the loop thread)."""
        self._sink = sink

    def _event_loop(self) -> EventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = EventLoop()
                self._loop.start()
                self._own_loop = True
            return self._loop

    def close(self) -> None:
        """Let go of every monitor (the QEMU processes keep running)."""
        with self._lock:
            runs = list(self._runs.values())
            self._runs.clear()
            loop, own = self._loop, self._own_loop
            if own:
                self._loop, self._own_loop = None, False
        for run in runs:
            if run.monitor is not None:
                run.monitor.close()
        if own and loop is not None:
            loop.stop()

    # -- the Hypervisor protocol -----------------------------------------

    def prepare(self, dom: DomainDef, ports: Sequence[PortPlan]) -> None:
        """Check QEMU can run here, then create the taps (down) on their bridges."""
        self._check_runnable(dom)
        names = []
        for port in sorted(ports, key=lambda p: p.index):
            check_port_name(port.portdev, f"domain '{dom.name}': port")
            names.append(port.portdev)
        # Recorded before anything is made, so a stop after a failure half
        # way still finds the taps.
        run = _Run(dom.name, names)
        self._save(run)
        with self._lock:
            self._runs[dom.name] = run
        try:
            with Links(self.netns) as links:
                for port in sorted(ports, key=lambda p: p.index):
                    links.add_tap(port.portdev, host_mac(port.mac))
                    if port.bridge is not None:
                        links.set_master(port.portdev, port.bridge)
        except BaseException:
            self._cleanup(dom.name, run)
            raise

    def launch(self, dom: DomainDef) -> None:
        """Start QEMU paused, connect its monitor, set the taps up, `cont`."""
        run = self._run_or_fail(dom.name)
        sock_name = f"{dom.name}.qmp"
        directory = self._dir.get()
        directory.remove(sock_name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self._sock_path(sock_name))
            listener.listen(1)
            log_fd = directory.open_file(f"{dom.name}.log",
                                         os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                argv = self._argv(dom, run, listener.fileno())
                os.write(log_fd, ("starting: " + " ".join(argv) + "\n").encode())
                with in_netns(self.netns):
                    # The child inherits the calling thread's namespace, where the taps are.
                    popen = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                        pass_fds=(listener.fileno(),), start_new_session=True,
                    )
            finally:
                os.close(log_fd)
        except FileNotFoundError as exc:
            raise UnavailableError(f"'{self.binary}' is not installed") from exc
        except OSError as exc:
            raise BackendError(
                f"domain '{dom.name}': cannot start QEMU: {exc.strerror or exc}"
            ) from exc
        finally:
            listener.close()
        stat = _proc_stat(popen.pid)
        with run.lock:
            run.pid, run.popen = popen.pid, popen
            run.start = stat[1] if stat is not None else None
        self._save(run)
        try:
            self._attach(dom.name, run, self.start_timeout)
        except NwfilterError as exc:
            raise self._start_failure(dom.name, popen, exc) from exc
        monitor = run.monitor
        assert monitor is not None
        with Links(self.netns) as links:
            for portdev in run.ports:
                links.set_up(portdev)
        monitor.command("cont")
        status = monitor.command("query-status")
        if not isinstance(status, dict) or status.get("status") != "running":
            raise BackendError(f"domain '{dom.name}': QEMU did not start running: {status!r}")

    def stop(self, dom: DomainDef) -> None:
        """Kill QEMU and remove the taps; idempotent, copes with a partial prepare."""
        run = self._current(dom.name)
        if run is None:
            return
        self._cleanup(dom.name, run)

    def shutdown(self, dom: DomainDef) -> None:
        """Ask the guest to power down (ACPI); kill QEMU if it has not exited
        within the shutdown timeout or its monitor does not answer."""
        run = self._current(dom.name)
        if run is None or not self._alive(run):
            self.stop(dom)
            return
        run.stopping = True
        try:
            self._monitor(dom.name, run).command("system_powerdown")
        except (MonitorTimeoutError, StateError) as exc:
            log.warning("domain '%s': %s; killing it", dom.name, exc)
        else:
            deadline = time.monotonic() + self.shutdown_timeout
            while self._alive(run) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._alive(run):
                log.warning("domain '%s' did not power down within %gs; killing it",
                            dom.name, self.shutdown_timeout)
        self._cleanup(dom.name, run)

    def suspend(self, dom: DomainDef) -> None:
        self._monitor(dom.name).command("stop")

    def resume(self, dom: DomainDef) -> None:
        self._monitor(dom.name).command("cont")

    def reboot(self, dom: DomainDef) -> None:
        self._monitor(dom.name).command("system_reset")

    def kill(self, dom: DomainDef) -> None:
        """SIGKILL the guest now, without waiting (a destroy does this before
        it waits for the domain's job, so a hung monitor call ends at once).
        The caller stops the domain next: the end of this process is no
        event (libvirt's monitor EOF handler skips a domain being destroyed
        the same way)."""
        run = self._current(dom.name)
        if run is None or not self._alive(run):
            return
        run.exit_reason = "destroyed"
        run.stopping = True
        assert run.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGKILL)

    def is_alive(self, dom: DomainDef) -> bool:
        run = self._current(dom.name)
        return run is not None and self._alive(run)

    def reconnect(self, dom: DomainDef) -> str:
        """Connect to a running guest's monitor again (after a restart of the
        engine); its state as QEMU reports it: 'running' or 'paused'."""
        run = self._run_or_fail(dom.name)
        if not self._alive(run):
            raise StateError(f"domain '{dom.name}': its QEMU process is gone")
        self._attach(dom.name, run, self.command_timeout)
        return self.guest_state(dom)

    def guest_state(self, dom: DomainDef) -> str:
        """'running' or 'paused', as QEMU reports it now."""
        status = self._monitor(dom.name).command("query-status")
        running = isinstance(status, dict) and bool(status.get("running"))
        return "running" if running else "paused"

    def pid(self, dom: DomainDef) -> int | None:
        """QEMU's pid (tests, tools)."""
        run = self._current(dom.name)
        return None if run is None else run.pid

    # -- internals ---------------------------------------------------------

    def _check_runnable(self, dom: DomainDef) -> None:
        if shutil.which(self.binary) is None:
            raise UnavailableError(
                f"domain '{dom.name}': '{self.binary}' is not installed (Debian: qemu-system-x86)"
            )
        if self.name == "kvm" and not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
            raise UnavailableError(
                f"domain '{dom.name}' has type 'kvm', but {KVM_DEVICE} cannot be used here; "
                "type 'qemu' runs without it"
            )
        read_boot(dom)  # the kernel, initrd and console paths, before any tap is made

    def _argv(self, dom: DomainDef, run: _Run, monitor_fd: int) -> list[str]:
        memory = (dom.memory_kib // 1024) if dom.memory_kib else _DEFAULT_MEMORY_MIB
        argv = [
            self.binary, "-name", f"guest={dom.name},debug-threads=on", "-uuid", str(dom.uuid),
            "-S", "-nographic", "-nodefaults", "-no-user-config",
            "-accel", "kvm" if self.name == "kvm" else "tcg",
            "-m", str(max(memory, 16)), "-smp", str(dom.vcpus or 1),
            "-chardev", f"socket,id=charmonitor,fd={monitor_fd},server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
        ]
        boot = read_boot(dom)
        argv += boot.argv()
        for index, portdev in enumerate(run.ports):
            iface = dom.interfaces[index]
            model = _NIC_MODELS.get(iface.model or "virtio", "virtio-net-pci")
            argv += [
                "-netdev", f"tap,id=hostnet{index},ifname={portdev},script=no,downscript=no",
                "-device", f"{model},netdev=hostnet{index},id=net{index},mac={iface.mac}"
                + boot.nic_options(index),
            ]
        return argv

    def _start_failure(self, name: str, popen: subprocess.Popen[bytes],
                       exc: NwfilterError) -> NwfilterError:
        """A clear error for a QEMU that did not come up: its last log lines."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(0.5)
        if popen.returncode is None:
            return exc
        tail = ""
        directory = self._dir.existing()
        data = directory.read_if_exists(f"{name}.log") if directory is not None else None
        if data:
            lines = [ln for ln in data.decode("utf-8", "replace").splitlines()
                     if ln and not ln.startswith("starting: ")]
            tail = "; ".join(lines[-3:])
        return BackendError(
            f"domain '{name}': QEMU exited with status {popen.returncode} while starting"
            + (f": {tail}" if tail else "")
        )

    def _sock_path(self, sock_name: str) -> str:
        # Through the directory's descriptor: a unix socket path is limited
        # to 107 bytes, a state root's path is not.
        return f"/proc/self/fd/{self._dir.get().fileno()}/{sock_name}"

    def _attach(self, name: str, run: _Run, timeout: float) -> None:
        """Open the monitor of `run` and watch it from the event loop."""
        loop = self._event_loop()
        monitor_box: list[Monitor] = []

        def on_event(event: str, data: Mapping[str, Any]) -> None:
            self._on_event(name, run, event, data)

        def on_eof() -> None:
            if monitor_box:
                self._on_eof(name, run, monitor_box[0])

        monitor = Monitor.open(name, self._sock_path(f"{name}.qmp"), loop,
                               on_event=on_event, on_eof=on_eof, timeout=timeout)
        monitor.timeout = self.command_timeout
        monitor_box.append(monitor)
        with run.lock:
            old, run.monitor = run.monitor, monitor
        if old is not None:
            old.close()
        if monitor.closed:  # QEMU went away before the box was filled
            self._on_eof(name, run, monitor)

    def _on_event(self, name: str, run: _Run, event: str, data: Mapping[str, Any]) -> None:
        """A QMP event (loop thread).  Only records and forwards: never blocks."""
        if event == "SHUTDOWN":
            run.exit_reason = run.exit_reason or "shutdown"
            return
        kind = {"STOP": "paused", "RESUME": "running", "GUEST_PANICKED": "panicked"}.get(event)
        if kind is None:
            log.debug("domain '%s': QMP event %s", name, event)
            return
        self._notify(name, run, kind, str(data.get("reason", "")) if kind != "panicked" else "")

    def _on_eof(self, name: str, run: _Run, monitor: Monitor) -> None:
        """QEMU closed its monitor (loop thread): it exited, unless we stop it."""
        if run.monitor is not monitor:
            return
        self._notify(name, run, "exited", run.exit_reason or "crashed")

    def _notify(self, name: str, run: _Run, kind: str, reason: str) -> None:
        with self._lock:
            current = self._runs.get(name) is run
        if not current or run.stopping or self._sink is None:
            return
        try:
            self._sink(name, kind, reason)
        except Exception:
            log.exception("domain '%s': handling event '%s' failed", name, kind)

    def _monitor(self, name: str, run: _Run | None = None) -> Monitor:
        run = run or self._run_or_fail(name)
        monitor = run.monitor
        if monitor is None or monitor.closed:
            raise StateError(f"domain '{name}': its QEMU monitor is not connected")
        return monitor

    def _alive(self, run: _Run) -> bool:
        if run.pid is None:
            return False
        if run.popen is not None and run.popen.poll() is not None:
            return False
        stat = _proc_stat(run.pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return run.start is None or stat[1] == run.start

    def _cleanup(self, name: str, run: _Run) -> None:
        """Kill the process, delete the taps and the files; every step is
        tried, the first error raised (the record stays while taps may)."""
        run.stopping = True
        errors: list[NwfilterError] = []
        if run.monitor is not None:
            run.monitor.close()
        if self._alive(run):
            assert run.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGKILL)
            deadline = time.monotonic() + _KILL_WAIT
            while self._alive(run) and time.monotonic() < deadline:
                time.sleep(0.01)
            if self._alive(run):
                errors.append(BackendError(f"domain '{name}': QEMU (pid {run.pid}) does not die"))
        if run.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.popen.wait(0.5)  # reap it
        try:
            with Links(self.netns) as links:
                for portdev in run.ports:
                    try:
                        links.delete_tap(portdev)
                    except NwfilterError as exc:
                        errors.append(exc)
        except NwfilterError as exc:
            errors.append(exc)
        if not errors:
            directory = self._dir.get()
            for leftover in (f"{name}.qmp", f"{name}.json"):
                try:
                    directory.remove(leftover)
                except NwfilterError as exc:
                    errors.append(exc)
            with self._lock:
                if self._runs.get(name) is run:
                    del self._runs[name]
        if errors:
            for later in errors[1:]:
                log.error("stopping domain '%s': %s", name, later)
            raise errors[0]

    def _current(self, name: str) -> _Run | None:
        with self._lock:
            run = self._runs.get(name)
        return run if run is not None else self._load(name)

    def _run_or_fail(self, name: str) -> _Run:
        run = self._current(name)
        if run is None:
            raise StateError(f"domain '{name}' has no QEMU process here")
        return run

    def _save(self, run: _Run) -> None:
        data = {"name": run.name, "ports": run.ports, "pid": run.pid, "start": run.start}
        self._dir.get().write(f"{run.name}.json", json.dumps(data, sort_keys=True) + "\n")

    def _load(self, name: str) -> _Run | None:
        """The record a previous engine left for `name`, if any."""
        directory = self._dir.existing()
        raw = directory.read_if_exists(f"{name}.json") if directory is not None else None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            run = _Run(name, [str(p) for p in data["ports"]],
                       int(data["pid"]) if data.get("pid") is not None else None,
                       int(data["start"]) if data.get("start") is not None else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"malformed QEMU record of domain '{name}': {exc!r}") from exc
        with self._lock:
            return self._runs.setdefault(name, run)


def make_hypervisor(env: HypervisorEnv) -> QemuHypervisor:
    """The factory `nwfilter.domain.hypervisor.load_hypervisor` calls."""
    return QemuHypervisor(env.type or env.run_dir.name, env.run_dir, env.netns, env.loop)


if TYPE_CHECKING:
    _CONTRACT: type[Hypervisor] = QemuHypervisor
