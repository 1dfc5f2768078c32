"""Files under the state root: checked directories, no links followed, atomic writes.

Every file the engine keeps lives in a directory opened as a `SafeDir`: a
directory file descriptor whose owner and mode were checked when it was
opened.  Files are then reached relative to that descriptor (`openat`
style) with `O_NOFOLLOW`, so neither a symbolic link planted in the
directory nor a directory renamed in the path after the check can send a
read or a write elsewhere.

The rules, like sshd's StrictModes and systemd's safe path checks:

* the directory itself, and every directory below it that is opened with
  `subdir`, is owned by the effective uid (or by root), is writable by
  neither group nor others, and is not a symbolic link;
* each directory on the path to it is owned by the effective uid or root
  and is not writable by group or others unless it has the sticky bit
  (like `/tmp`: others may add entries there but not replace ours);
* a symbolic link on the path to it is followed only when the effective
  uid or root owns it.

A refusal is a `StorageError` naming the offending path and what is wrong
with it.

A write goes to a temporary file `.NAME.XXXXXXXX.tmp` created with
`O_EXCL` in the same directory, is fsynced, renamed over the target and
the directory is fsynced, so a crash at any point leaves either the old
content or the new one; `remove_temporaries` removes what a crash left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import threading
from pathlib import Path

from nwfilter.errors import StorageError

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not hang; regular files ignore it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_MAX_LINKS = 40  # the kernel's own limit on links followed in one lookup
# mkstemp (earlier versions) used [a-z0-9_]; token_hex uses [0-9a-f].
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _trusted_uids() -> tuple[int, ...]:
    euid = os.geteuid()
    return (0,) if euid == 0 else (euid, 0)


def _owner_problem(st: os.stat_result) -> str | None:
    uids = _trusted_uids()
    if st.st_uid in uids:
        return None
    allowed = "uid 0" if uids == (0,) else f"uid {uids[0]} or root"
    return f"is owned by uid {st.st_uid}, not by {allowed}"


def _dir_problem(st: os.stat_result, *, ancestor: bool) -> str | None:
    """What makes a directory unsafe to keep state in (or to pass through)."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    problem = _owner_problem(st)
    if problem is not None:
        return problem
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        if ancestor and mode & stat.S_ISVTX:
            return None
        who = "group and others" if mode & 0o022 == 0o022 else (
            "group" if mode & 0o020 else "others")
        sticky = " and has no sticky bit" if ancestor else ""
        return f"is writable by {who} (mode {mode:04o}){sticky}"
    return None


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise StorageError(f"invalid file name {name!r}")
    return name


def _temp_stem(name: str) -> str:
    # The temporary name adds 14 bytes to the stem: keep it under NAME_MAX
    # even when the target's own name is close to it.
    return name.encode("utf-8")[:200].decode("utf-8", errors="ignore")


class SafeDir:
    """An open, checked directory; every file operation is relative to it.

    Open one with `SafeDir.open(path)` (or `parent.subdir(name)`); close it
    with `close()` or a `with` block.  The methods raise `StorageError`.
    """

    def __init__(self, fd: int, path: Path, context: str) -> None:
        self._fd = fd
        self.path = path  # the real path, for messages
        self._context = context

    # ----------------------------------------------------------- opening

    @classmethod
    def open(
        cls, path: Path | str, *, what: str = "directory", create: bool = True,
        mode: int = 0o700,
    ) -> SafeDir:
        """Open directory `path`, creating it (and missing parents) if needed.

        `what` names it in errors ("state root '/x': directory '/x/run' ...").
        """
        found = cls._walk(Path(path), what, create, mode)
        assert found is not None
        return found

    @classmethod
    def open_existing(cls, path: Path | str, *, what: str = "directory") -> SafeDir | None:
        """Like `open`, but create nothing: None if `path` does not exist."""
        return cls._walk(Path(path), what, False, 0o700)

    @classmethod
    def _walk(cls, path: Path, what: str, create: bool, mode: int) -> SafeDir | None:
        context = f"{what} '{path}'"
        if not path.is_absolute():
            path = Path.cwd() / path
        todo = list(reversed(path.parts[1:]))
        stack: list[tuple[int, Path]] = []
        try:
            fd = os.open("/", _DIR_FLAGS)
            stack.append((fd, Path("/")))
            cls._check_fd(fd, Path("/"), context, ancestor=bool(todo))
            links = 0
            while todo:
                name = todo.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(stack) > 1:
                        os.close(stack.pop()[0])
                    continue
                parent_fd, parent = stack[-1]
                here = parent / name
                final = not todo
                try:
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        return None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, mode if final else 0o755, dir_fd=parent_fd)
                        log.info("created directory '%s'", here)
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    problem = _owner_problem(st)
                    if problem is not None:
                        raise StorageError(
                            f"{context}: symbolic link '{here}' {problem}")
                    links += 1
                    if links > _MAX_LINKS:
                        raise StorageError(f"{context}: too many symbolic links at '{here}'")
                    target = os.readlink(name, dir_fd=parent_fd)
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop()[0])
                    todo.extend(reversed(Path(target).parts[1 if target.startswith("/") else 0:]))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise StorageError(f"{context}: '{here}' is not a directory")
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
                stack.append((fd, here))
                cls._check_fd(fd, here, context, ancestor=not final)
            fd, real = stack.pop()
            return cls(fd, real, context)
        except OSError as exc:
            where = stack[-1][1] if stack else Path("/")
            raise StorageError(f"{context}: cannot open it below '{where}': "
                               f"{exc.strerror}") from exc
        finally:
            for fd, _ in stack:
                os.close(fd)

    @staticmethod
    def _check_fd(fd: int, path: Path, context: str, *, ancestor: bool) -> None:
        problem = _dir_problem(os.fstat(fd), ancestor=ancestor)
        if problem is not None:
            raise StorageError(f"{context}: directory '{path}' {problem}")

    def subdir(self, relpath: str, *, create: bool = True, mode: int = 0o700) -> SafeDir:
        """Open the directory `relpath` ("run" or "run/bindings") below this
        one, creating it if needed; no link is followed."""
        found = self._subdir(relpath, create, mode)
        assert found is not None
        return found

    def existing_subdir(self, relpath: str) -> SafeDir | None:
        """Like `subdir`, but create nothing: None if it does not exist."""
        return self._subdir(relpath, False, 0o700)

    def _subdir(self, relpath: str, create: bool, mode: int) -> SafeDir | None:
        fd = os.dup(self._fd)
        path = self.path
        try:
            for name in relpath.split("/"):
                _check_name(name)
                path = path / name
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        return None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, mode, dir_fd=fd)
                        log.info("created directory '%s'", path)
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise StorageError(f"{self._context}: '{path}' is a symbolic link")
                if not stat.S_ISDIR(st.st_mode):
                    raise StorageError(f"{self._context}: '{path}' is not a directory")
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                self._check_fd(fd, path, self._context, ancestor=False)
            result, fd = SafeDir(fd, path, self._context), -1
            return result
        except OSError as exc:
            raise StorageError(f"{self._context}: cannot open '{path}': {exc.strerror}") from exc
        finally:
            if fd >= 0:
                os.close(fd)

    # ------------------------------------------------------------ files

    def names(self, suffix: str = "") -> list[str]:
        """Sorted names of the regular files ending in `suffix`; dot files
        (temporaries, markers) and anything else (links, directories) left out."""
        return list(self.entries(suffix))

    def entries(self, suffix: str = "") -> dict[str, os.stat_result]:
        """`names(suffix)` with each file's status (links not followed),
        in name order."""
        try:
            listed = os.listdir(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot list '{self.path}': {exc.strerror}") from exc
        found: dict[str, os.stat_result] = {}
        for name in sorted(listed):
            if name.startswith(".") or not name.endswith(suffix):
                continue
            st = self.stat_if_exists(name)
            if st is not None and stat.S_ISREG(st.st_mode):
                found[name] = st
        return found

    def stat_if_exists(self, name: str) -> os.stat_result | None:
        """The status of entry `name` (links not followed), or None."""
        try:
            return os.stat(_check_name(name), dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot examine '{self.path / name}': {exc.strerror}") from exc

    def exists(self, name: str) -> bool:
        """Whether an entry (of any kind, links not followed) is named `name`."""
        try:
            os.stat(_check_name(name), dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot examine '{self.path / name}': {exc.strerror}") from exc
        return True

    def read(self, name: str) -> bytes:
        """The content of regular file `name`."""
        data = self.read_if_exists(name)
        if data is None:
            raise StorageError(f"cannot read '{self.path / name}': it does not exist")
        return data

    def read_if_exists(self, name: str) -> bytes | None:
        """The content of regular file `name`, or None if there is none."""
        try:
            fd = os.open(_check_name(name), _READ_FLAGS, dir_fd=self._fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read '{self.path / name}': {_why(exc)}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(f"cannot read '{self.path / name}': not a regular file")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise StorageError(f"cannot read '{self.path / name}': {exc.strerror}") from exc
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes | str, mode: int = 0o600) -> None:
        """Replace file `name` with `data` atomically (see the module docstring)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        _check_name(name)
        tmp, fd = self._create_temp(name, mode)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)  # not narrowed by the umask
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._fd)
            raise StorageError(f"cannot write '{self.path / name}': {exc.strerror}") from exc

    def _create_temp(self, name: str, mode: int) -> tuple[str, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):
            tmp = f".{_temp_stem(name)}.{secrets.token_hex(4)}.tmp"
            try:
                return tmp, os.open(tmp, flags, mode, dir_fd=self._fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot write in '{self.path}': {exc.strerror}") from exc
        raise StorageError(f"cannot write in '{self.path}': no free temporary name")

    def remove(self, name: str) -> bool:
        """Remove file `name` durably; False if there was none."""
        try:
            os.unlink(_check_name(name), dir_fd=self._fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot remove '{self.path / name}': {exc.strerror}") from exc
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot sync '{self.path}': {exc.strerror}") from exc
        return True

    def open_file(self, name: str, flags: int, mode: int = 0o600) -> int:
        """A raw descriptor on regular file `name` (`flags` as for `os.open`;
        `O_NOFOLLOW` and `O_CLOEXEC` are added).  The caller closes it."""
        try:
            fd = os.open(_check_name(name), flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         mode, dir_fd=self._fd)
        except OSError as exc:
            raise StorageError(f"cannot open '{self.path / name}': {_why(exc)}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(f"cannot open '{self.path / name}': not a regular file")
        os.set_blocking(fd, True)
        return fd

    def remove_temporaries(self) -> list[str]:
        """Remove the temporaries of writes a crash interrupted (the targets
        keep their old content); log each at info level.  Only safe while no
        other process writes here (the root lock).  Returns warnings for
        those that could not be removed."""
        warnings: list[str] = []
        try:
            entries = os.listdir(self._fd)
        except OSError as exc:
            return [f"cannot list '{self.path}': {exc.strerror}"]
        for name in sorted(entries):
            if not _TEMP_RE.match(name):
                continue
            try:
                st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                os.unlink(name, dir_fd=self._fd)
                log.info("removed '%s', left by an unfinished write", self.path / name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                text = f"cannot remove the unfinished write '{self.path / name}': {exc.strerror}"
                log.warning("%s", text)
                warnings.append(text)
        return warnings

    # ------------------------------------------------------------ life

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"SafeDir('{self.path}')"


class DirHandle:
    """A directory path and the `SafeDir` kept open on it: opened (and
    checked) on first use, opened again by `reopen` (at each load).

    Thread-safe.  A `SafeDir` that is replaced is not closed here: a thread
    may still be using it, and it closes itself once nothing refers to it."""

    def __init__(self, path: Path | str, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._dir: SafeDir | None = None
        self._mutex = threading.Lock()  # a leaf: guards `_dir` only

    def reopen(self) -> SafeDir:
        directory = SafeDir.open(self.path, what=self.what)
        with self._mutex:
            self._dir = directory
        return directory

    def get(self) -> SafeDir:
        with self._mutex:
            if self._dir is not None:
                return self._dir
        return self._install(SafeDir.open(self.path, what=self.what))

    def existing(self) -> SafeDir | None:
        """The directory if it exists (opened now if needed); creates nothing."""
        with self._mutex:
            if self._dir is not None:
                return self._dir
        directory = SafeDir.open_existing(self.path, what=self.what)
        return self._install(directory) if directory is not None else None

    def _install(self, directory: SafeDir) -> SafeDir:
        with self._mutex:
            if self._dir is None:
                self._dir = directory
            return self._dir  # another thread's, if it was first


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link"
    return exc.strerror or str(exc)
