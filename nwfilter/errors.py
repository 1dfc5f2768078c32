"""The error hierarchy of nwfilter and its stable codes.

Every error raised on purpose by the engine is an `NwfilterError` carrying an
`ErrorCode`.  The command line maps codes to exit statuses in one table
(`EXIT_STATUS`); the daemon sends the code on the wire and the client raises
the class `ERROR_CLASSES` gives for it, never by parsing messages.
"""

from __future__ import annotations

from enum import Enum

from nwfilter.printable import printable


class ErrorCode(Enum):
    """Stable identifiers of error kinds; the value is the wire name."""

    XML = "xml-error"  # not well-formed, hostile or over the size limits
    INVALID = "invalid-argument"  # well-formed, but a value or structure is wrong
    NOT_FOUND = "not-found"
    CONFLICT = "conflict"  # name/uuid clash, already exists
    IN_USE = "in-use"  # refused because something still uses it
    LOOP = "loop"  # filter reference loop
    UNRESOLVED = "unresolved"  # missing variable or missing referenced filter
    UNSUPPORTED = "unsupported"  # valid, but the chosen backend cannot express it
    BACKEND = "backend-error"  # the kernel or tool refused a transaction
    UNAVAILABLE = "unavailable"  # a backend or dependency is missing
    STORAGE = "storage-error"  # files could not be read or written
    TIMEOUT = "timeout"  # a job or lock wait timed out
    LOCK_ORDER = "lock-order"  # lock-order checker found an inversion
    STATE = "invalid-state"  # operation not valid in the object's current state
    DENIED = "permission-denied"  # the caller may not do this
    INTERNAL = "internal-error"


class NwfilterError(Exception):
    """Base of all errors the engine raises on purpose.

    The message is kept on one line: control characters in the names, file
    names and document content it quotes are escaped here, once for every
    place that prints, logs or sends it."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        message = printable(message)
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.code]


class XMLError(NwfilterError):
    """The document is not well-formed, or hostile (entities, depth, size)."""

    code = ErrorCode.XML


class ValidationError(NwfilterError):
    """A well-formed document or request holds a wrong value or structure."""

    code = ErrorCode.INVALID


class DepthError(ValidationError):
    """Filter references nest deeper than the documented limit (no loop)."""


class NotFoundError(NwfilterError):
    code = ErrorCode.NOT_FOUND


class ConflictError(NwfilterError):
    code = ErrorCode.CONFLICT


class InUseError(NwfilterError):
    code = ErrorCode.IN_USE


class LoopError(NwfilterError):
    code = ErrorCode.LOOP


class UnresolvedError(NwfilterError):
    """A variable or a referenced filter is missing at instantiation time."""

    code = ErrorCode.UNRESOLVED


class UndefinedVariableError(UnresolvedError):
    """A variable a rule uses has no value; `variable` names it (the
    engine learns `IP` instead of failing, see nwfilter.learn)."""

    def __init__(self, message: str, code: ErrorCode | None = None, *,
                 variable: str = "") -> None:
        super().__init__(message, code)
        self.variable = variable

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.code), {"variable": self.variable})


class UnsupportedError(NwfilterError):
    """Valid input that the selected backend cannot express exactly."""

    code = ErrorCode.UNSUPPORTED


class BackendError(NwfilterError):
    """The kernel (or a firewall tool) refused a transaction."""

    code = ErrorCode.BACKEND


class UnavailableError(NwfilterError):
    code = ErrorCode.UNAVAILABLE


class StorageError(NwfilterError):
    code = ErrorCode.STORAGE


class JobTimeoutError(NwfilterError):
    code = ErrorCode.TIMEOUT


class LockOrderError(NwfilterError):
    code = ErrorCode.LOCK_ORDER


class StateError(NwfilterError):
    code = ErrorCode.STATE


class PermissionDeniedError(NwfilterError):
    """A call the caller is not allowed to make (read-only socket, no admin group)."""

    code = ErrorCode.DENIED


# --- the edge: exit statuses and wire replies -----------------------------------

EXIT_STATUS: dict[ErrorCode, int] = {
    ErrorCode.XML: 2,
    ErrorCode.INVALID: 2,
    ErrorCode.NOT_FOUND: 3,
    ErrorCode.CONFLICT: 4,
    ErrorCode.IN_USE: 4,
    ErrorCode.LOOP: 4,
    ErrorCode.UNRESOLVED: 5,
    ErrorCode.UNSUPPORTED: 5,
    ErrorCode.BACKEND: 6,
    ErrorCode.UNAVAILABLE: 6,
    ErrorCode.STORAGE: 7,
    ErrorCode.TIMEOUT: 8,
    ErrorCode.LOCK_ORDER: 9,
    ErrorCode.STATE: 4,
    ErrorCode.DENIED: 10,
    ErrorCode.INTERNAL: 1,
}

#: the class a wire reply's code is raised as again on the client side
ERROR_CLASSES: dict[ErrorCode, type[NwfilterError]] = {
    ErrorCode.XML: XMLError,
    ErrorCode.INVALID: ValidationError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.CONFLICT: ConflictError,
    ErrorCode.IN_USE: InUseError,
    ErrorCode.LOOP: LoopError,
    ErrorCode.UNRESOLVED: UnresolvedError,
    ErrorCode.UNSUPPORTED: UnsupportedError,
    ErrorCode.BACKEND: BackendError,
    ErrorCode.UNAVAILABLE: UnavailableError,
    ErrorCode.STORAGE: StorageError,
    ErrorCode.TIMEOUT: JobTimeoutError,
    ErrorCode.LOCK_ORDER: LockOrderError,
    ErrorCode.STATE: StateError,
    ErrorCode.DENIED: PermissionDeniedError,
    ErrorCode.INTERNAL: NwfilterError,
}


def error_from_code(code: ErrorCode, message: str) -> NwfilterError:
    """The error of class `ERROR_CLASSES[code]` carrying `message`."""
    return ERROR_CLASSES[code](message, code)
