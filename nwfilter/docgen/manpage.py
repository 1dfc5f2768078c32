"""The man pages nwfilter(1) and nwfilterd(8), in roff, from the parsers.

The synopses, the options and the command list are generated from the
parsers (`nwfilter.docgen.parserinfo`) and the exit statuses from
`nwfilter.errors.EXIT_STATUS`, so none of them can drift from the code;
the prose around them is kept here.  Commands are grouped by the module of
`nwfilter.commands` that registers them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

from nwfilter.commands.context import DEFAULT_ROOT, SOCKET_NAME, default_ro_socket
from nwfilter.daemonconf import DEFAULT_CONFIG
from nwfilter.docgen.parserinfo import Command, Option, ParserInfo, Positional
from nwfilter.errors import EXIT_STATUS, ErrorCode

HEADER = '.\\" Generated from the argument parsers by tools/gen_packaging.py; do not edit.'

#: section titles of the command modules; another module gets its own name
_GROUP_TITLES = {
    "filters": "Filters",
    "bindings": "Bindings",
    "domains": "Domains",
    "sandbox": "The demo",
    "host": "The root's host",
}

_CODE_TEXT = {
    ErrorCode.XML: "a document is not well-formed XML, not UTF-8 or too large",
    ErrorCode.INVALID: "invalid input (a value or a structure is wrong)",
    ErrorCode.NOT_FOUND: "no such filter, binding or domain",
    ErrorCode.CONFLICT: "a conflict: the name exists, or another root owns the tables",
    ErrorCode.IN_USE: "refused because something still uses it",
    ErrorCode.LOOP: "a filter reference loop",
    ErrorCode.UNRESOLVED: "an unresolved variable or referenced filter",
    ErrorCode.UNSUPPORTED: "a rule the backend cannot express",
    ErrorCode.BACKEND: "the kernel refused a transaction",
    ErrorCode.UNAVAILABLE: "a backend, a dependency or the daemon is unreachable",
    ErrorCode.STORAGE: "files could not be read or written, or the state root is unsafe",
    ErrorCode.TIMEOUT: "a timeout, including the wait for another command's root lock",
    ErrorCode.LOCK_ORDER: "the lock-order checker found an inversion (a bug)",
    ErrorCode.STATE: "not valid in the object's current state",
    ErrorCode.DENIED: "permission denied",
    ErrorCode.INTERNAL: "an internal error (a bug)",
}


def esc(text: str) -> str:
    """`text` as roff prose: backslashes and dashes escaped, and a leading
    period or quote kept from being read as a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    if out.startswith((".", "'")):
        out = "\\&" + out
    return out


def _bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{esc(text)}\\fR"


def _option_head(option: Option) -> str:
    flags = ", ".join(_bold(f) for f in option.flags)
    return f"{flags} {_italic(option.metavar)}" if option.metavar else flags


def _usage_option(option: Option) -> str:
    flag = _bold(option.flags[-1])
    return f"{flag} {_italic(option.metavar)}" if option.metavar else flag


def _synopsis(command: Command, prog: str | None = None) -> str:
    words = [_bold(prog or command.name)]
    for item in command.usage_items():
        if isinstance(item, Positional):
            word = _italic(item.metavar) + ("..." if item.repeated else "")
            words.append(f"[{word}]" if item.optional else word)
        else:
            words.append("[" + " | ".join(_usage_option(o) for o in item) + "]")
    return " ".join(words)


def _options(options: Iterable[Option]) -> list[str]:
    lines: list[str] = []
    for option in options:
        lines += [".TP", _option_head(option), esc(_sentence(option.help) or "(no description)")]
    return lines


def _command_entry(command: Command) -> list[str]:
    lines = [".TP", _synopsis(command)]
    text = command.help or command.description
    lines.append(esc(_sentence(text)))
    if command.description and command.description != text:
        lines += [".IP", esc(_sentence(command.description))]
    details = [p for p in command.positionals if p.help]
    if command.options or details:
        lines.append(".RS")
        for positional in details:
            lines += [".TP", _italic(positional.metavar), esc(_sentence(positional.help))]
        lines += _options(command.options)
        lines.append(".RE")
    return lines


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def command_groups(
    info: ParserInfo, modules: Sequence[ModuleType]
) -> list[tuple[str, list[Command]]]:
    """The commands of `info` grouped by the module that registers them, in
    the modules' order; a command no module claims comes last, alone."""
    groups: list[tuple[str, list[Command]]] = []
    claimed: set[str] = set()
    for module in modules:
        probe = argparse.ArgumentParser()
        sub = probe.add_subparsers()
        module.register(sub)
        names = [n for n in sub.choices if not n.startswith("_")]
        commands = [info.command(n) for n in names if n not in claimed]
        claimed.update(names)
        if commands:
            short = module.__name__.rsplit(".", 1)[-1]
            groups.append((_GROUP_TITLES.get(short, short.capitalize()), commands))
    rest = [c for c in info.commands if c.name not in claimed]
    if rest:
        groups.append(("Other commands", rest))
    return groups


def _exit_statuses(extra: Sequence[tuple[int, str]], *, success: bool = True) -> list[str]:
    """One entry per exit status: the error codes that give it (from
    `EXIT_STATUS`) and the `extra` causes."""
    texts: dict[int, list[str]] = {0: ["success"]} if success else {}
    codes: dict[int, list[str]] = {}
    for code, status in EXIT_STATUS.items():
        texts.setdefault(status, []).append(_CODE_TEXT.get(code, code.value))
        codes.setdefault(status, []).append(code.value)
    for status, text in extra:
        texts.setdefault(status, []).append(text)
    lines: list[str] = []
    for status in sorted(texts):
        text = "; ".join(texts[status])
        if status in codes:
            text += f" (error codes: {', '.join(codes[status])})"
        lines += [".TP", f"\\fB{status}\\fR", esc(_sentence(text))]
    return lines


def _prose(text: str) -> list[str]:
    """Hand-written roff: kept as it is, without blank lines."""
    return [line for line in text.strip("\n").splitlines() if line.strip()]


_NWFILTER_DESCRIPTION = r"""
.B nwfilter
defines network filters in libvirt's nwfilter language, binds VM ports to
them and manages domains whose interfaces reference them; the engine keeps
the kernel's firewall (nftables, in one transaction) in line with what is
recorded under the state root.
Commands are named and worded like
.BR virsh (1)'s.
.PP
When
.BR nwfilterd (8)
serves the state root (its socket is
.IR ROOT /run/nwfilterd.sock,
or the one named with
.B \-c
or
.BR $NWFILTER_SOCKET ),
every command is sent to it (a user the admin socket refuses sends queries
to its read\-only socket); otherwise the command runs the same engine in
this process.
Output, errors and exit statuses are the same either way.
Queries use a read-only engine, which never writes to the kernel.
.PP
A state root records the backend and network namespace it was first used
with and refuses others;
.B host\-move
moves it on purpose.
The root must be safe from other local users: every directory under it must
be owned by root (or the engine's user), not writable by group or others,
and not a symbolic link.
.PP
On a terminal, long work (re\-applying or rebuilding many ports, starting
many domains, moving a root) shows its progress on one line of standard
error, which is cleared when the work is done.
Nothing of the kind is written when standard error is not a terminal, nor
with
.BR \-q .
"""

_NWFILTER_ENVIRONMENT = r"""
.TP
.B NWFILTER_ROOT
The state root when
.B \-\-root
is not given.
.TP
.B NWFILTER_BACKEND
The backend when
.B \-\-backend
is not given.
.TP
.B NWFILTER_NETNS
The network namespace when
.B \-\-netns
is not given.
.TP
.B NWFILTER_SOCKET
The daemon's socket when
.B \-c
is not given.
.TP
.BR VISUAL ", " EDITOR
The editor of
.B nwfilter\-edit
(default
.BR vi ).
"""

_FILES = r"""
.TP
.I @ROOT@
The default state root.
.TP
.IR ROOT /host.json
The backend and namespace the root manages, and its id.
.TP
.IR ROOT /nwfilter/*.xml
Filter definitions.
.TP
.IR ROOT /domains/
Domain definitions;
.IR ROOT /domains/autostart/
marks the ones started with the daemon.
.TP
.IR ROOT /run/bindings/
The active port bindings, re\-applied at every start.
.TP
.IR ROOT /run/engine.lock
One engine per root at a time.
.TP
.IR ROOT /run/@SOCKET@
The daemon's admin socket.
.TP
.IR ROOT /run/@RO_SOCKET@
The daemon's read\-only socket.
.TP
.I @CONFIG@
The daemon's configuration file.
"""

_NWFILTER_EXAMPLES = r"""
Try things out without touching the kernel:
.PP
.EX
T="nwfilter \-\-root /var/lib/nwfilter\-try \-\-backend memory"
$T nwfilter\-list
$T nwfilter\-dumpxml clean\-traffic
.EE
.PP
A root that manages the namespace
.BR lab :
.PP
.EX
ip netns add lab
R="nwfilter \-\-root /var/lib/nwfilter\-lab \-\-netns lab"
$R nwfilter\-define my\-filter.xml \-\-dry\-run
$R define vm1.xml && $R start vm1 && $R domiflist vm1
$R nwfilter\-binding\-dumpxml vnet0 \-\-rules
$R destroy vm1
.EE
"""

_SEE_ALSO_NWFILTER = r"""
.BR nwfilterd (8),
.BR virsh (1),
.BR nft (8),
.BR ip\-netns (8)
.PP
The documentation in the source tree: docs/cli.md, docs/filter\-language.md,
docs/daemon.md.
"""


def nwfilter_page(info: ParserInfo, modules: Sequence[ModuleType]) -> str:
    lines = [HEADER, '.TH NWFILTER 1 "" "nwfilter" "User Commands"', ".nh", ".ad l", ".SH NAME",
             "nwfilter \\- network filters for VM ports, in libvirt's nwfilter language",
             ".SH SYNOPSIS", _synopsis(info.top, "nwfilter") + " " + _italic("COMMAND") + " ["
             + _italic("ARG") + "...]"]
    lines += [".SH DESCRIPTION", *_prose(_NWFILTER_DESCRIPTION)]
    lines += [".SH OPTIONS", *_options(info.top.options)]
    lines += [".TP", _bold("-h") + ", " + _bold("--help"),
              "Print the usage (also after a command) and exit."]
    lines += [".SH COMMANDS"]
    for title, commands in command_groups(info, modules):
        lines.append(f".SS {esc(title)}")
        for command in commands:
            lines += _command_entry(command)
    lines += [".SH EXIT STATUS",
              "An error is one line on standard error, naming what is wrong and where.",
              *_exit_statuses([(2, "a command line the parser refuses"),
                               (130, "interrupted")])]
    lines += [".SH ENVIRONMENT", *_prose(_NWFILTER_ENVIRONMENT)]
    lines += [".SH FILES", *_prose(_files())]
    lines += [".SH EXAMPLES", *_prose(_NWFILTER_EXAMPLES)]
    lines += [".SH SEE ALSO", *_prose(_SEE_ALSO_NWFILTER)]
    return "\n".join(lines) + "\n"


def _files() -> str:
    return (
        _FILES.replace("@ROOT@", esc(DEFAULT_ROOT))
        .replace("@SOCKET@", esc(SOCKET_NAME))
        .replace("@RO_SOCKET@", esc(default_ro_socket(Path(DEFAULT_ROOT)).name))
        .replace("@CONFIG@", esc(str(DEFAULT_CONFIG)))
    )


_NWFILTERD_DESCRIPTION = r"""
.B nwfilterd
starts the engine on a state root (re\-applying every recorded binding in one
transaction), finds running domains again and starts the ones marked
autostart, holds the root's lock for its whole life and serves the API on two UNIX sockets:
the admin socket (every method; root and the admin group), by default
.IR ROOT /run/nwfilterd.sock,
and the read\-only socket (methods that change nothing; every local user),
by default
.IR ROOT /run/nwfilterd\-ro.sock.
.BR nwfilter (1)
sends its commands there while the daemon runs.
Options not given are read from the configuration file.
.PP
With the nft backend it watches its namespace's nf_tables events: when
another program flushes or edits the nwfilter tables, the recorded state is
restored and a warning names who touched what.
It also keeps net.bridge.bridge\-nf\-call\-iptables and \-ip6tables at 1 in the
namespace.
.PP
Without
.B \-\-backend
and
.B \-\-netns
the daemon uses the root's recorded host; values that differ from the record
are refused.
"""

_NWFILTERD_ACTIVATION = r"""
When started by
.BR systemd (1)
with an inherited listening socket
.RB ( LISTEN_PID
naming the daemon and
.B LISTEN_FDS
at least 1), the daemon serves the sockets passed from file descriptor 3 on
instead of creating them, each as the admin or the read\-only socket by the
path it is bound to, and leaves their paths in place on exit so that the
next connection starts it again.
Each must be a listening UNIX stream socket bound to one of the two paths;
a socket it is not given is created as usual.
See nwfilterd.service, nwfilterd.socket and nwfilterd\-ro.socket in
contrib/systemd of the source tree, and docs/daemon.md.
"""

_NWFILTERD_SIGNALS = r"""
.TP
.BR SIGTERM ", " SIGINT
Stop accepting and reading at once; requests already running finish and
their replies are sent (up to 30 s), then the daemon exits.
The kernel keeps every binding's rules.
"""

_NWFILTERD_ENVIRONMENT = r"""
.TP
.BR NWFILTER_ROOT ", " NWFILTER_BACKEND ", " NWFILTER_NETNS
Defaults of
.BR \-\-root ,
.B \-\-backend
and
.BR \-\-netns .
.TP
.BR LISTEN_PID ", " LISTEN_FDS
Socket activation, as set by
.BR systemd (1).
"""

_NWFILTERD_EXAMPLES = r"""
.EX
nwfilterd \-\-root /var/lib/nwfilter\-lab &
nwfilter \-\-root /var/lib/nwfilter\-lab list \-\-all
systemctl enable \-\-now nwfilterd.socket
.EE
"""

_SEE_ALSO_NWFILTERD = r"""
.BR nwfilter (1),
.BR systemd.socket (5),
.BR sd_listen_fds (3),
.BR nft (8)
"""


def nwfilterd_page(info: ParserInfo) -> str:
    lines = [HEADER, '.TH NWFILTERD 8 "" "nwfilter" "System Administration"', ".nh", ".ad l",
             ".SH NAME",
             "nwfilterd \\- the nwfilter engine behind a UNIX socket",
             ".SH SYNOPSIS", _synopsis(info.top, "nwfilterd")]
    lines += [".SH DESCRIPTION", *_prose(_NWFILTERD_DESCRIPTION)]
    lines += [".SH OPTIONS", *_options(info.top.options)]
    lines += [".TP", _bold("-h") + ", " + _bold("--help"), "Print the usage and exit."]
    lines += [".SH SOCKET ACTIVATION", *_prose(_NWFILTERD_ACTIVATION)]
    lines += [".SH SIGNALS", *_prose(_NWFILTERD_SIGNALS)]
    lines += [".SH EXIT STATUS",
              "0 after a stop by signal; when the daemon cannot start, one line on standard "
              "error and the status of its error:",
              *_exit_statuses([(2, "a command line the parser refuses")], success=False)]
    lines += [".SH ENVIRONMENT", *_prose(_NWFILTERD_ENVIRONMENT)]
    lines += [".SH FILES", *_prose(_files())]
    lines += [".SH EXAMPLES", *_prose(_NWFILTERD_EXAMPLES)]
    lines += [".SH SEE ALSO", *_prose(_SEE_ALSO_NWFILTERD)]
    return "\n".join(lines) + "\n"
