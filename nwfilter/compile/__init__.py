"""Instantiation ("gentech" in libvirt): bindings and filters → IR rulesets.

`compile_binding` walks the filterref tree of a binding's filter in a pool
snapshot, merges parameters, expands variables and orders chains and rules
as libvirt's ebiptables driver does, producing an immutable
`nwfilter.ir.Ruleset` in packet terms.  `compile_many` does the same for a
batch and shares the per-filter work; `Compiler` keeps that work cached for
as long as the snapshot lives.
"""

from __future__ import annotations

from nwfilter.compile.compiler import (
    Compiler,
    ValueParser,
    compile_binding,
    compile_many,
    describe_match,
    port_of,
    schema_parser,
)

__all__ = [
    "Compiler",
    "ValueParser",
    "compile_binding",
    "compile_many",
    "describe_match",
    "port_of",
    "schema_parser",
]
