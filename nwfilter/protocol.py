"""The daemon's wire format: one JSON object per line over a UNIX socket.

A request is `{"id": N, "method": "filter.define", "params": {...}}`; a
reply is `{"id": N, "result": ...}` or `{"id": N, "error": {"code": C,
"message": M}}` where C is an `ErrorCode` value.  Both directions are strict
JSON: no `NaN` or `Infinity`, integers of at most `MAX_INT_DIGITS` digits,
nesting at most `MAX_DEPTH` deep.  An id is an integer in `ID_RANGE`, a
string of at most `MAX_ID_LENGTH` characters, or null; a request whose id
is not one of those is answered with id null.

Lines are bounded so a client cannot make the daemon buffer without limit;
a longer line cannot be skipped safely (its rest would be read as new
messages), so the reader reports it with its own error and the connection
is closed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol

from nwfilter.errors import ErrorCode, NwfilterError, ValidationError, error_from_code

if TYPE_CHECKING:
    from nwfilter.pool import FilterInfo

MAX_LINE = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_INT_DIGITS = 20
MAX_ID_LENGTH = 256
ID_RANGE = range(-(2**63), 2**63)

RequestId = int | str | None

# A JSON string (escapes included) or one bracket: enough to count nesting
# without parsing, so a line of 100,000 `[` never reaches the parser.
_DEPTH_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class LineReader(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


class MessageTooLargeError(ValidationError):
    """A line longer than `MAX_LINE`: the stream is out of step from here on."""


class RequestError(ValidationError):
    """A request that cannot be served as sent; `request_id` is its id when
    that id was readable and valid, else None."""

    def __init__(self, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class Request(NamedTuple):
    id: RequestId
    method: str
    params: dict[str, Any]


def encode(message: dict[str, Any]) -> bytes:
    """One line of strict JSON; raises ValueError for NaN/Infinity and
    TypeError for values JSON has no form for."""
    return (
        json.dumps(message, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        + b"\n"
    )


def _refuse_constant(name: str) -> NoReturn:
    raise ValidationError(f"malformed message: '{name}' is not JSON")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValidationError(f"malformed message: integer longer than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValidationError(f"malformed message: number {text[:40]} is out of range")
    return value


def nesting_exceeds(line: bytes, limit: int) -> bool:
    """Whether arrays and objects in `line` nest deeper than `limit`."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    depth = 0
    for match in _DEPTH_TOKENS.finditer(line):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def decode(line: bytes) -> dict[str, Any]:
    """The JSON object on `line`; `ValidationError` for anything else."""
    if nesting_exceeds(line, MAX_DEPTH):
        raise ValidationError(f"malformed message: nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(
            line,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"malformed message: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"malformed message: {exc}") from exc
    if not isinstance(value, dict):
        raise ValidationError("malformed message: not a JSON object")
    return value


def valid_id(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value in ID_RANGE
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH


def decode_request(line: bytes) -> Request:
    """A request line checked for shape and types; `RequestError` otherwise."""
    try:
        message = decode(line)
    except ValidationError as exc:
        raise RequestError(exc.message) from exc
    request_id = message.get("id")
    if not valid_id(request_id):
        raise RequestError(
            f"invalid request: 'id' must be null, an integer in [-2**63, 2**63) "
            f"or a string of at most {MAX_ID_LENGTH} characters"
        )
    unknown = sorted(set(message) - {"id", "method", "params"})
    if unknown:
        raise RequestError(f"invalid request: unknown member '{unknown[0][:64]}'", request_id)
    method = message.get("method")
    if not isinstance(method, str):
        raise RequestError("invalid request: 'method' must be a string", request_id)
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise RequestError("invalid request: 'params' must be an object", request_id)
    return Request(request_id, method, params)


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


def error_reply(request_id: RequestId, exc: NwfilterError) -> dict[str, Any]:
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
