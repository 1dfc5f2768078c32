"""Text from outside made safe to show on one terminal line or in one log line.

Names, file names and document content reach messages, listings and logs.
A newline or carriage return in them would forge or overwrite a line; an
escape sequence (ESC, or the C1 control CSI) would drive the terminal; a
bidirectional override would show the text in another order than it is.
`printable` spells each such character as a Python escape (``\\n``, ``\\r``,
``\\t``, ``\\x1b``, ``\\x9b``, ``\\u202e``) and leaves all other text,
printable Unicode included, as it is.  A backslash is left as it is, so that
escaping twice (the daemon, then the client) changes nothing more than once.
"""

from __future__ import annotations

import logging
import re

# The bidirectional controls (Unicode's Bidi_Control property): they reorder
# what is displayed without being visible themselves.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

# C0, DEL, C1, the line and paragraph separators, lone surrogates (from
# undecodable bytes; they cannot even be encoded for output) and the
# bidirectional controls.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff" + re.escape(_BIDI_CONTROLS) + "]"
)

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control character escaped (see the module doc)."""
    return _UNSAFE.sub(_escape, text)


class PrintableFormatter(logging.Formatter):
    """A log formatter that keeps each record's message on one line.

    The message (format string with its arguments) is escaped; a traceback
    appended after it keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def configure_logging(level: int, fmt: str) -> None:
    """`logging.basicConfig` on stderr with `fmt`, messages kept on one line;
    like it, does nothing when the root logger already has a handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
