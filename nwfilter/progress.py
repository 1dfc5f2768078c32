"""Progress of long work: one line on a terminal, nothing anywhere else.

The engine reports what it is doing through a `ProgressHook` (what, how
many done, of how many; a total of 0 means no count is known).  The
command line passes `TerminalProgress.update`, which draws one line on
standard error when that is a terminal: not before the work has taken
`START_DELAY` seconds since it was made (short commands print nothing), at most every
`INTERVAL` seconds, and cleared again before anything else is printed and
when the command ends.  When standard error is not a terminal nothing is
written, so logs stay clean.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO, TypeVar

T = TypeVar("T")

ProgressHook = Callable[[str, int, int], None]

START_DELAY = 0.5
INTERVAL = 0.1
_CLEAR = "\r\x1b[K"


def no_progress(what: str, done: int, total: int) -> None:
    """The hook that reports nothing."""


def counted(hook: ProgressHook, what: str, items: Sequence[T]) -> Iterator[T]:
    """`items`, reporting to `hook` how many of them were taken."""
    total = len(items)
    for done, item in enumerate(items):
        hook(what, done, total)
        yield item
    hook(what, total, total)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or an unusual stream
        return False


class TerminalProgress:
    """A progress line on `stream`, drawn only when it is a terminal
    (`enabled` None) or when told so."""

    def __init__(
        self,
        stream: TextIO,
        *,
        enabled: bool | None = None,
        start_delay: float | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self.enabled = _is_terminal(stream) if enabled is None else enabled
        self._delay = START_DELAY if start_delay is None else start_delay
        self._interval = interval
        self._clock = clock
        self._began = clock()
        self._drawn = -float("inf")
        self._shown = False

    def update(self, what: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if now - self._began < self._delay or now - self._drawn < self._interval:
            return
        self._drawn = now
        text = f"{what}: {done}/{total} ({100 * done // total}%)" if total else f"{what}..."
        width = shutil.get_terminal_size().columns - 1
        self._write(_CLEAR[:1] + text[: max(width, 10)] + _CLEAR[1:])
        self._shown = True

    def clear(self) -> None:
        """Remove the line, if one is shown."""
        if self._shown:
            self._shown = False
            self._write(_CLEAR)

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # the terminal went away: the work goes on
