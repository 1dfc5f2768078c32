"""The daemon's wire format: one JSON object per line over a UNIX socket.

A request is `{"id": N, "method": "filter.define", "params": {...}}`; a
reply is `{"id": N, "result": ...}` or `{"id": N, "error": {"code": C,
"message": M}}` where C is an `ErrorCode` value.  Lines are bounded so a
client cannot make the daemon buffer without limit.
"""

from __future__ import annotations

import json
from typing import Any

from nwfilter.errors import ErrorCode, NwfilterError, ValidationError

MAX_LINE = 4 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ValidationError(f"request larger than {MAX_LINE} bytes")
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"malformed request: {exc}") from exc
    if not isinstance(value, dict):
        raise ValidationError("malformed request: not a JSON object")
    return value


def error_reply(request_id: object, exc: NwfilterError) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": exc.code.value, "message": exc.message}}


def raise_for_reply(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        err = reply["error"]
        try:
            code = ErrorCode(err.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        raise NwfilterError(str(err.get("message", "unknown error")), code)
    return reply.get("result")
