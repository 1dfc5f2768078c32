"""nwfilterd's configuration file: `key = value` lines, parsed strictly.

The file grants admin rights (`admin_group`), so it is read only when it is
a regular file owned by root (or the daemon's user) and writable by nobody
else, through checked directories (`nwfilter.fileio.SafeDir`).  Every
mistake is a `ValidationError` naming the file and the line; nothing is
guessed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from nwfilter.access import Group
from nwfilter.errors import StorageError, ValidationError
from nwfilter.fileio import SafeDir

DEFAULT_CONFIG = Path("/etc/nwfilter/nwfilterd.conf")
_MAX_SIZE = 64 * 1024

_PATHS = ("root", "socket", "ro_socket")
_INTEGERS = ("max_connections", "max_buffered", "workers")
_SECONDS = ("audit_interval",)  # 0: off
KEYS = tuple(sorted((*_PATHS, *_INTEGERS, *_SECONDS, "admin_group")))


@dataclass(frozen=True)
class DaemonConfig:
    """What the file set; a key it does not hold is absent from the maps."""

    source: str = "<none>"
    paths: dict[str, Path | None] = field(default_factory=dict)  # ro_socket may be None
    integers: dict[str, int] = field(default_factory=dict)
    admin_group: Group | None = None


def parse(text: str, source: str) -> DaemonConfig:
    """The configuration `text` (read from `source`) holds."""
    paths: dict[str, Path | None] = {}
    integers: dict[str, int] = {}
    admin_group: Group | None = None
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def bad(why: str, number: int = number) -> ValidationError:
            return ValidationError(f"config file '{source}', line {number}: {why}")

        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise bad(f"expected 'key = value', got {line[:80]!r}")
        if key not in KEYS:
            raise bad(f"unknown key {key[:64]!r} (known: {', '.join(KEYS)})")
        if key in seen:
            raise bad(f"key '{key}' is already set on line {seen[key]}")
        seen[key] = number
        if not value:
            raise bad(f"key '{key}' has no value")
        if key in _PATHS:
            if key == "ro_socket" and value == "none":
                paths[key] = None
                continue
            if not value.startswith("/") or "\0" in value:
                raise bad(f"'{key}' must be an absolute path, got {value[:200]!r}")
            paths[key] = Path(value)
        elif key in _INTEGERS:
            if not value.isascii() or not value.isdigit() or len(value) > 18 or int(value) < 1:
                raise bad(f"'{key}' must be a positive integer, got {value[:64]!r}")
            integers[key] = int(value)
        elif key in _SECONDS:
            if not value.isascii() or not value.isdigit() or len(value) > 9:
                raise bad(f"'{key}' must be a number of seconds (0: off), got {value[:64]!r}")
            integers[key] = int(value)
        else:
            try:
                admin_group = Group.named(value)
            except ValidationError as exc:
                raise bad(exc.message) from None
    return DaemonConfig(source, paths, integers, admin_group)


def load(path: Path | None) -> DaemonConfig:
    """The configuration at `path` (which must exist), or, for None, at
    `DEFAULT_CONFIG` if it exists (an empty configuration otherwise)."""
    target = path if path is not None else DEFAULT_CONFIG
    if not target.is_absolute():
        target = Path.cwd() / target
    what = f"config file '{target}'"
    directory = SafeDir.open_existing(target.parent, what=what)
    if directory is None or not directory.exists(target.name):
        if path is None:
            return DaemonConfig()
        raise StorageError(f"{what} does not exist")
    with directory:
        fd = directory.open_file(target.name, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()):
            raise StorageError(f"{what} is owned by uid {st.st_uid}, not by root")
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise StorageError(
                f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
            )
        data = os.read(fd, _MAX_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_SIZE:
        raise ValidationError(f"{what} is larger than {_MAX_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{what} is not UTF-8 (byte {exc.start})") from exc
    return parse(text, str(target))
