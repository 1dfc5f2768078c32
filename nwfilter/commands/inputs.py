"""Reading the documents a command is given: a file, or standard input ('-').

The bytes go to the parsers unchanged, so one place (`nwfilter.conf.safexml`)
checks the encoding and the size, and errors name the file they came from.
Reading needs only the size limit (`nwfilter.conf.limits`), not the parsers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nwfilter.conf.limits import MAX_DOCUMENT_BYTES
from nwfilter.errors import StorageError, XMLError

#: no document the parsers accept is larger; reading stops one byte after
MAX_INPUT_BYTES = MAX_DOCUMENT_BYTES


def input_source(name: str) -> str:
    """How errors name the input `name`."""
    return "<stdin>" if name == "-" else name


def read_input(name: str) -> bytes:
    """The content of file `name` ('-': standard input), at most
    `MAX_INPUT_BYTES`; StorageError if it cannot be read."""
    try:
        if name == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with Path(name).open("rb") as handle:
                data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise StorageError(f"cannot read '{input_source(name)}': {exc.strerror}") from exc
    if len(data) > MAX_INPUT_BYTES:
        raise XMLError(f"{input_source(name)}: document is larger than {MAX_INPUT_BYTES} bytes")
    return data


def read_document(name: str) -> str:
    """The document in file `name` ('-': standard input) as text, for an
    API call; the parsers accept UTF-8 only, so other bytes are refused here
    with the same words."""
    data = read_input(name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise XMLError(f"{input_source(name)}: document is not valid UTF-8") from None
