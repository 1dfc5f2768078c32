"""Typed values of the filter language: text → typed literal → canonical text.

Every attribute of a protocol element has a `ValueType` (see
`nwfilter.conf.schema`).  `ValueType.parse(text)` turns the text of a literal
(or the resolved value of a variable) into the typed literal below, or raises
`ValidationError` whose message is the reason only (the caller adds where);
`ValueType.canonical(text)` gives the text libvirt prints back for it;
`ValueType.format(value)` prints a typed value in its default form.

Typed literal representation (the compiler and the backends rely on it):

=====================================  =========================================
attribute kind                         Python value
=====================================  =========================================
MAC address, MAC mask                  `str`, lower-case colon form 'aa:bb:00:11:22:33'
IPv4 address                           `ipaddress.IPv4Address`
IPv6 address                           `ipaddress.IPv6Address`
IPv4 / IPv6 mask                       `int` prefix length (a dotted mask is converted)
numbers (ports, types, codes, dscp,    `int`
 stp fields, vlanid, connlimit-above)
protocol ids given by name             `int` (mac protocolid 'ipv4' → 0x800,
 (protocolid, encap-protocol,           ip protocol 'tcp' → 6, arp opcode
 protocol, opcode)                      'Request' → 1)
gratuitous                             `bool`
state                                  `frozenset[str]` of NEW, ESTABLISHED,
                                        RELATED, INVALID, NONE (never empty;
                                        NONE stands alone)
TCP flags                              `TcpFlagsValue(mask, flags)`
ipsetflags                             `tuple[str, ...]` of 'src'/'dst', 1..6 long
ipset name, comment                    `str`
variable reference                     `nwfilter.conf.model.VarRef` (not a type's job;
                                        see `parse_varref`)
=====================================  =========================================

Canonical text follows libvirt: numbers given in hex (`0x1F`) print as
`0x1f`, decimal ones as decimal; known protocol ids print by name; masks
print as a prefix length; MACs lower-case; state and flag sets in libvirt's
bit order.  Where libvirt is lax we are strict (see docs/filter-language.md):
no bare hex, no sign, no spaces, no loose IPv4 forms, no IPv6 zone index,
booleans only in the forms libvirt really means.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import uuid as uuidlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from nwfilter.conf.model import VarRef
from nwfilter.errors import ValidationError

_DEC_RE = re.compile(r"[0-9]+\Z")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+\Z")
_MAC_RE = re.compile(r"([0-9a-fA-F]{1,2})(?::([0-9a-fA-F]{1,2})){5}\Z")
_VARNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_VARVALUE_CHARS = _VARNAME_CHARS | frozenset(".:")
# libvirt's virNWFilterVarAccessParse skips C white space after '[', before
# the number (strtoul) and before ']', and ignores whatever follows ']'; its
# own test inputs use `$B[  @0 ] `.  We take the white space an XML attribute
# can hold (space, tab, LF, CR) in those places and after ']', and refuse
# other trailing text, signs and an empty name as garbage.
_VARREF_RE = re.compile(
    r"\$([A-Za-z0-9_]+)(?:\[[ \t\n\r]*(@?)[ \t\n\r]*([0-9]+)[ \t\n\r]*\][ \t\n\r]*)?\Z"
)
_IPSET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-+ ")

#: libvirt's VIR_NWFILTER_MAX_ITERID.
MAX_ITERATOR_ID = 1000
#: libvirt's MAX_COMMENT_LENGTH; we count characters, not bytes.
MAX_COMMENT_LENGTH = 256
#: libvirt's MAX_IPSET_NAME_LENGTH without the terminating NUL.
MAX_IPSET_NAME_LENGTH = 31
MAX_UINT32 = 0xFFFFFFFF


def parse_uint_text(text: str, *, allow_hex: bool = True) -> tuple[int, bool]:
    """Parse a strict unsigned number; return it and whether it was hex."""
    if _DEC_RE.match(text):
        return int(text, 10), False
    if allow_hex and _HEX_RE.match(text):
        return int(text, 16), True
    if allow_hex:
        raise ValidationError("must be a decimal number or a hex number starting with 0x")
    raise ValidationError("must be a decimal number")


def parse_int_text(text: str) -> int:
    """A strict signed decimal number (priorities)."""
    if re.fullmatch(r"-?[0-9]+", text) is None:
        raise ValidationError("must be a decimal integer")
    return int(text, 10)


class ValueType(ABC):
    """One kind of attribute value."""

    #: a short name for documentation and messages
    name: str = "value"

    @abstractmethod
    def parse_literal(self, text: str) -> tuple[object, str]:
        """Return the typed value and libvirt's canonical text for it."""

    def parse(self, text: str) -> object:
        return self.parse_literal(text)[0]

    def canonical(self, text: str) -> str:
        return self.parse_literal(text)[1]

    @abstractmethod
    def format(self, value: object) -> str:
        """Print a typed value in its default canonical form."""


class UIntType(ValueType):
    """An unsigned number with a range; hex (`0x..`) kept as hex when printed."""

    def __init__(self, maximum: int, what: str, *, minimum: int = 0, allow_hex: bool = True):
        self.minimum = minimum
        self.maximum = maximum
        self.what = what
        self.allow_hex = allow_hex
        self.name = f"{what} ({minimum}-{maximum})"

    def _check(self, value: int) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValidationError(f"{self.what} must be {self.minimum}-{self.maximum}")

    def parse_literal(self, text: str) -> tuple[object, str]:
        try:
            value, is_hex = parse_uint_text(text, allow_hex=self.allow_hex)
        except ValidationError as exc:
            raise ValidationError(f"{self.what} {exc.message}") from None
        self._check(value)
        return value, (f"0x{value:x}" if is_hex else str(value))

    def format(self, value: object) -> str:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"{self.what} must be an integer")
        self._check(value)
        return str(value)


class NamedNumberType(UIntType):
    """A number that may also be given by name (protocol ids, ARP opcodes).

    Known values always print by name, as libvirt does.  Unknown ones print
    in the base they were given in, unless `decimal_only_output` (ARP
    opcodes, which libvirt always prints in decimal).
    """

    def __init__(
        self,
        names: Mapping[str, int],
        maximum: int,
        what: str,
        *,
        numeric_minimum: int = 0,
        decimal_only_output: bool = False,
    ):
        super().__init__(maximum, what, minimum=numeric_minimum)
        self.names = dict(names)
        self.by_lower = {k.lower(): v for k, v in names.items()}
        self.by_value: dict[int, str] = {}
        for key, val in names.items():
            self.by_value.setdefault(val, key)
        self.decimal_only_output = decimal_only_output
        self.name = f"{what} ({'/'.join(names)} or a number)"

    def parse_literal(self, text: str) -> tuple[object, str]:
        if text.lower() in self.by_lower:
            value = self.by_lower[text.lower()]
            return value, self.by_value[value]
        if not (_DEC_RE.match(text) or _HEX_RE.match(text)):
            raise ValidationError(f"{self.what} must be one of {', '.join(self.names)} or a number")
        parsed, canon = super().parse_literal(text)
        assert isinstance(parsed, int)
        value = parsed
        if value in self.by_value:
            return value, self.by_value[value]
        if self.decimal_only_output:
            canon = str(value)
        return value, canon

    def format(self, value: object) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and value in self.by_value:
            return self.by_value[value]
        text = super().format(value)
        return text if self.decimal_only_output else f"0x{int(text):x}"


def _normalise_mac(text: str, what: str) -> str:
    if not _MAC_RE.match(text):
        raise ValidationError(f"{what} must be six hex bytes separated by ':'")
    return ":".join(f"{int(part, 16):02x}" for part in text.split(":"))


def mac_is_multicast(mac: str) -> bool:
    return bool(int(mac.split(":")[0], 16) & 1)


def parse_unicast_mac(text: str) -> str:
    """A unicast MAC address (of a port or a domain interface) in any case,
    returned in lower-case colon form."""
    mac = _normalise_mac(text, "MAC address")
    if mac_is_multicast(mac):
        raise ValidationError("must be a unicast address")
    return mac


class MacAddrType(ValueType):
    name = "MAC address"

    def parse_literal(self, text: str) -> tuple[object, str]:
        mac = _normalise_mac(text, "MAC address")
        return mac, mac

    def format(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValidationError("MAC address must be a string")
        return _normalise_mac(value, "MAC address")


class MacMaskType(MacAddrType):
    name = "MAC mask"

    def parse_literal(self, text: str) -> tuple[object, str]:
        mac = _normalise_mac(text, "MAC mask")
        bits = int(mac.replace(":", ""), 16)
        if not _is_contiguous(bits, 48):
            raise ValidationError("MAC mask must be a run of 1 bits followed by 0 bits")
        return mac, mac


def _is_contiguous(bits: int, width: int) -> bool:
    inverted = ~bits & ((1 << width) - 1)
    return inverted & (inverted + 1) == 0


def parse_ipv4(text: str) -> ipaddress.IPv4Address:
    # ipaddress refuses the loose inet_aton forms (0x7f.1, 127.1) and
    # leading zeros, which libvirt's getaddrinfo accepts.
    if not re.fullmatch(r"[0-9.]+", text):
        raise ValidationError("IPv4 address must be in dotted-quad form")
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValidationError("IPv4 address must be in dotted-quad form") from None


def parse_ipv6(text: str) -> ipaddress.IPv6Address:
    if "%" in text:
        raise ValidationError("IPv6 address must not carry a zone index")
    if not re.fullmatch(r"[0-9A-Fa-f:.]+", text):
        raise ValidationError("IPv6 address is not valid")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise ValidationError("IPv6 address is not valid") from None


def format_ipv6(addr: ipaddress.IPv6Address) -> str:
    """libvirt prints IPv6 through glibc's inet_ntop (embedded IPv4 forms)."""
    return socket.inet_ntop(socket.AF_INET6, addr.packed)


class IPv4AddrType(ValueType):
    name = "IPv4 address"

    def parse_literal(self, text: str) -> tuple[object, str]:
        addr = parse_ipv4(text)
        return addr, str(addr)

    def format(self, value: object) -> str:
        if not isinstance(value, ipaddress.IPv4Address):
            raise ValidationError("IPv4 address expected")
        return str(value)


class IPv6AddrType(ValueType):
    name = "IPv6 address"

    def parse_literal(self, text: str) -> tuple[object, str]:
        addr = parse_ipv6(text)
        return addr, format_ipv6(addr)

    def format(self, value: object) -> str:
        if not isinstance(value, ipaddress.IPv6Address):
            raise ValidationError("IPv6 address expected")
        return format_ipv6(value)


class IPMaskType(ValueType):
    """A prefix length, or a mask in address form (printed as the length)."""

    def __init__(self, version: int):
        self.version = version
        self.width = 32 if version == 4 else 128
        self.name = f"IPv{version} mask (0-{self.width} or a netmask)"

    def parse_literal(self, text: str) -> tuple[object, str]:
        if _DEC_RE.match(text):
            value = int(text)
            if value > self.width:
                raise ValidationError(f"mask must be a prefix length 0-{self.width}")
            return value, str(value)
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                parse_ipv4(text) if self.version == 4 else parse_ipv6(text)
            )
        except ValidationError:
            raise ValidationError(
                f"mask must be a prefix length 0-{self.width} or an IPv{self.version} netmask"
            ) from None
        bits = int(addr)
        if not _is_contiguous(bits, self.width):
            raise ValidationError("netmask must be a run of 1 bits followed by 0 bits")
        prefix = bin(bits).count("1")
        return prefix, str(prefix)

    def format(self, value: object) -> str:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self.width:
            raise ValidationError(f"mask must be a prefix length 0-{self.width}")
        return str(value)


class BoolType(ValueType):
    """ARP `gratuitous`: only the spellings libvirt gives a meaning to."""

    name = "boolean (true/false, yes/no, 1/0)"
    TRUE = frozenset({"true", "yes", "1"})
    FALSE = frozenset({"false", "no", "0"})

    def parse_literal(self, text: str) -> tuple[object, str]:
        # libvirt compares case-sensitively and takes anything else as false.
        if text in self.TRUE:
            return True, "true"
        if text in self.FALSE:
            return False, "false"
        raise ValidationError("must be one of true, false, yes, no, 1, 0")

    def format(self, value: object) -> str:
        if not isinstance(value, bool):
            raise ValidationError("boolean expected")
        return "true" if value else "false"


STATE_ORDER = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "NONE")


class StateType(ValueType):
    name = "connection states (NEW,ESTABLISHED,RELATED,INVALID or NONE)"

    def parse_literal(self, text: str) -> tuple[object, str]:
        states: set[str] = set()
        for item in text.split(","):
            token = item.strip(" \t").upper()
            if not token:
                raise ValidationError("state list has an empty item")
            if token not in STATE_ORDER:
                raise ValidationError(
                    f"unknown state {item.strip()!r} (NEW, ESTABLISHED, RELATED, INVALID, NONE)"
                )
            states.add(token)
        if "NONE" in states:
            # as libvirt: NONE absorbs the others
            states = {"NONE"}
        value = frozenset(states)
        return value, self.format(value)

    def format(self, value: object) -> str:
        if not isinstance(value, frozenset) or not value or not value <= set(STATE_ORDER):
            raise ValidationError("state must be a non-empty set of known states")
        return ",".join(s for s in STATE_ORDER if s in value)


#: libvirt's bit order for TCP flags (FIN=0x1 ... URG=0x20)
TCP_FLAG_ORDER = ("FIN", "SYN", "RST", "PSH", "ACK", "URG")


@dataclass(frozen=True)
class TcpFlagsValue:
    """`flags='mask/flags'`: of the flags in `mask`, exactly `flags` are set."""

    mask: frozenset[str]
    flags: frozenset[str]


def _format_flag_set(flags: frozenset[str]) -> str:
    if not flags:
        return "NONE"
    if len(flags) == len(TCP_FLAG_ORDER):
        return "ALL"
    return ",".join(f for f in TCP_FLAG_ORDER if f in flags)


class TcpFlagsType(ValueType):
    name = "TCP flags (mask/flags, e.g. SYN,ACK/SYN)"

    @staticmethod
    def _parse_set(text: str) -> frozenset[str]:
        out: set[str] = set()
        for item in text.split(","):
            token = item.strip(" \t").upper()
            if token == "ALL":
                out.update(TCP_FLAG_ORDER)
            elif token == "NONE":
                pass
            elif token in TCP_FLAG_ORDER:
                out.add(token)
            elif not token:
                raise ValidationError("TCP flag list has an empty item")
            else:
                raise ValidationError(
                    f"unknown TCP flag {item.strip()!r} (SYN, ACK, URG, PSH, FIN, RST, ALL, NONE)"
                )
        return frozenset(out)

    def parse_literal(self, text: str) -> tuple[object, str]:
        if text.count("/") != 1:
            raise ValidationError("TCP flags must be written mask/flags")
        mask_text, flags_text = text.split("/")
        value = TcpFlagsValue(self._parse_set(mask_text), self._parse_set(flags_text))
        return value, self.format(value)

    def format(self, value: object) -> str:
        if not isinstance(value, TcpFlagsValue):
            raise ValidationError("TcpFlagsValue expected")
        return f"{_format_flag_set(value.mask)}/{_format_flag_set(value.flags)}"


class IpsetFlagsType(ValueType):
    name = "ipset flags (1 to 6 of src/dst, comma separated)"

    def parse_literal(self, text: str) -> tuple[object, str]:
        items = text.split(",")
        if not 1 <= len(items) <= 6:
            raise ValidationError("ipsetflags must list 1 to 6 of src/dst")
        out: list[str] = []
        for item in items:
            if item.lower() not in ("src", "dst"):
                raise ValidationError("ipsetflags must be a comma-separated list of src/dst")
            out.append(item.lower())
        value = tuple(out)
        return value, ",".join(value)

    def format(self, value: object) -> str:
        if (
            not isinstance(value, tuple)
            or not 1 <= len(value) <= 6
            or any(v not in ("src", "dst") for v in value)
        ):
            raise ValidationError("ipsetflags must be 1 to 6 of src/dst")
        return ",".join(value)


class IpsetNameType(ValueType):
    name = "ipset name"

    def parse_literal(self, text: str) -> tuple[object, str]:
        if not text:
            raise ValidationError("ipset name must not be empty")
        if len(text) > MAX_IPSET_NAME_LENGTH:
            raise ValidationError(f"ipset name is longer than {MAX_IPSET_NAME_LENGTH} characters")
        if not set(text) <= _IPSET_CHARS:
            raise ValidationError("ipset name contains invalid characters")
        return text, text

    def format(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValidationError("ipset name must be a string")
        return str(self.parse_literal(value)[1])


class CommentType(ValueType):
    name = f"comment (up to {MAX_COMMENT_LENGTH} characters)"

    def parse_literal(self, text: str) -> tuple[object, str]:
        if len(text) > MAX_COMMENT_LENGTH:
            raise ValidationError(f"comment is longer than {MAX_COMMENT_LENGTH} characters")
        return text, text

    def format(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValidationError("comment must be a string")
        return str(self.parse_literal(value)[1])


# --- variables and parameters ------------------------------------------------


def is_variable_text(text: str) -> bool:
    return text.startswith("$")


def parse_varref(text: str) -> VarRef:
    """`$NAME`, `$NAME[N]` (element N) or `$NAME[@N]` (iterator N ≤ 1000).

    `$NAME[@0]` is the same as `$NAME` and is returned as `VarRef(NAME)`.
    """
    match = _VARREF_RE.match(text)
    if match is None:
        raise ValidationError(
            "variable must be $NAME, $NAME[N] or $NAME[@N] with NAME of letters, digits, '_'"
        )
    name, at, number = match.groups()
    if number is None:
        return VarRef(name)
    value = int(number)
    if at:
        if value > MAX_ITERATOR_ID:
            raise ValidationError(f"iterator id must be 0-{MAX_ITERATOR_ID}")
        return VarRef(name) if value == 0 else VarRef(name, iterator=value)
    if value > MAX_UINT32:
        raise ValidationError("array index is too large")
    return VarRef(name, index=value)


def check_variable_name(name: str) -> None:
    if not name or not set(name) <= _VARNAME_CHARS:
        raise ValidationError("parameter name must be letters, digits and '_'")


def check_variable_value(value: str) -> None:
    if not value or not set(value) <= _VARVALUE_CHARS:
        raise ValidationError("parameter value must be letters, digits, '_', '.' and ':'")


# --- names ---------------------------------------------------------------------

MAX_NAME_BYTES = 200


def check_object_name(name: str, what: str, *, max_bytes: int = MAX_NAME_BYTES) -> None:
    """Names of filters and domains: they become file names."""
    if not name:
        raise ValidationError(f"{what} must not be empty")
    if "/" in name:
        raise ValidationError(f"{what} must not contain '/'")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise ValidationError(f"{what} must not contain control characters")
    if name.startswith("."):
        raise ValidationError(f"{what} must not start with '.'")
    if name != name.strip():
        raise ValidationError(f"{what} must not start or end with white space")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        # lone surrogates (from surrogateescape'd bytes) cannot name a file
        raise ValidationError(f"{what} is not valid Unicode text") from None
    if len(encoded) > max_bytes:
        raise ValidationError(f"{what} is longer than {max_bytes} bytes")


def check_ifname(name: str, what: str) -> None:
    """Kernel interface-name rules (dev_valid_name), ASCII only."""
    if not name:
        raise ValidationError(f"{what} must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > 15:
        raise ValidationError(f"{what} is longer than 15 bytes")
    if name in (".", ".."):
        raise ValidationError(f"{what} must not be '.' or '..'")
    if any(not (0x21 <= ord(c) <= 0x7E) or c in "/:" for c in name):
        raise ValidationError(f"{what} must be printable ASCII without '/', ':' or white space")


def check_port_name(name: str, what: str = "port name") -> str:
    """`name` if it can name a filtered port; raise `ValidationError` otherwise.

    The one rule for the host-side interface of a binding or a domain
    interface, on every path (binding XML and files, the daemon, domain
    `<target dev>`, the ns driver, the nft renderer).  On top of the
    kernel's interface-name rule (`check_ifname`):

    * not starting with '.': the binding is kept in `<name>.xml`, and dot
      files are temporaries that are never read back;
    * the name is a key of the nft dispatch maps, and libnftables (1.0.6)
      reads some strings specially, in JSON as in text: a trailing '*' is an
      interface wildcard, '\\*' at the end its escape (the backslash is
      dropped), '*' alone the map's catch-all element that every interface
      matches, and a leading '@' a set reference;
    * nft prints keys between double quotes without escaping them, so a '"'
      would make `nft list ruleset` unloadable.

    Every other printable character is taken verbatim, which the nft backend
    proves by reading each new key back."""
    check_ifname(name, f"{what} {name!r}")
    if name.startswith("."):
        raise ValidationError(f"{what} {name!r} must not start with '.' (a hidden file)")
    if name == "*":
        raise ValidationError(f"{what} {name!r} is nft's catch-all key, which every "
                              "interface would match")
    if name.endswith("*"):
        raise ValidationError(f"{what} {name!r} must not end with '*' (nft reads an "
                              "interface wildcard or its escape)")
    if name.startswith("@"):
        raise ValidationError(f"{what} {name!r} must not start with '@' (nft reads a "
                              "set reference)")
    if '"' in name:
        raise ValidationError(f"{what} {name!r} must not contain '\"' (nft prints keys in "
                              "double quotes without escaping them)")
    return name


def parse_uuid_text(text: str) -> uuidlib.UUID:
    """A UUID in 8-4-4-4-12 form or 32 hex digits."""
    stripped = text.strip()
    if not re.fullmatch(
        r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}",
        stripped,
    ):
        raise ValidationError(f"malformed uuid {text!r}")
    return uuidlib.UUID(stripped)
