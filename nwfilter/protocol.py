"""The daemon's wire format: one JSON object per line over a UNIX socket.

A request is `{"id": N, "method": "filter.define", "params": {...}}`; a
reply is `{"id": N, "result": ...}` or `{"id": N, "error": {"code": C,
"message": M}}` where C is an `ErrorCode` value.  Lines are bounded so a
client cannot make the daemon buffer without limit; a longer line cannot be
skipped safely (its rest would be read as new messages), so the reader
reports it with its own error and the connection is closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from nwfilter.errors import ErrorCode, NwfilterError, ValidationError, error_from_code

if TYPE_CHECKING:
    from nwfilter.pool import FilterInfo

MAX_LINE = 4 * 1024 * 1024


class LineReader(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


class MessageTooLargeError(ValidationError):
    """A line longer than `MAX_LINE`: the stream is out of step from here on."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"malformed request: {exc}") from exc
    if not isinstance(value, dict):
        raise ValidationError("malformed request: not a JSON object")
    return value


def read_message(rfile: LineReader) -> dict[str, Any] | None:
    """The next message of the stream, or None at its end.

    Raises `MessageTooLargeError` for a line over `MAX_LINE` bytes (the
    caller must stop reading the stream) and `ValidationError` for a line
    that is not a JSON object (the stream is still in step).
    """
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise MessageTooLargeError(f"message larger than {MAX_LINE} bytes")
    return decode(line)


def error_reply(request_id: object, exc: NwfilterError) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": exc.code.value, "message": exc.message}}


def raise_for_reply(reply: dict[str, Any]) -> Any:
    """The result of a reply, or its error raised as the class of its code."""
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, dict):
            err = {}
        try:
            code = ErrorCode(err.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        raise error_from_code(code, str(err.get("message", "unknown error")))
    return reply.get("result")


def filter_rows(infos: Iterable[FilterInfo]) -> list[dict[str, Any]]:
    """Filters as `filter.list` returns them (and `nwfilter-list --json` prints them)."""
    return [
        {
            "uuid": str(info.uuid),
            "name": info.name,
            "chain": info.chain,
            "priority": info.priority,
            "rules": info.rule_count,
        }
        for info in infos
    ]
