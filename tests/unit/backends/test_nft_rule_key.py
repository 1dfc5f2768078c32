"""Connlimit set names (`render.rule_key`) are the same in every process.

The order of a frozenset of enums (a rule's `ct state`) follows string
hashes, which differ between processes with another PYTHONHASHSEED; a name
built from `repr()` of such a rule changed with it, so a restart rewrote the
rule and dropped its connection counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
from nwfilter.backends.nft import render
from nwfilter.ir import CtState, Family, Field, Match, Origin, Rule, Verdict
states = frozenset({CtState.NEW, CtState.ESTABLISHED, CtState.RELATED, CtState.INVALID})
rule = Rule(Family.IPV4, (Match(Field.IP_PROTO, 6), Match(Field.CT_STATE, states),
                          Match(Field.CONNLIMIT_ABOVE, 4)), Verdict.DROP,
            origin=Origin("f", 1, "<tcp connlimit-above='4'>"))
print(render.rule_key(rule))
"""


def _key(seed: int) -> str:
    env = {**os.environ, "PYTHONHASHSEED": str(seed),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, check=True, cwd=ROOT)
    return done.stdout.strip()


def test_rule_key_does_not_depend_on_the_hash_seed() -> None:
    keys = {_key(seed) for seed in range(1, 9)}
    assert len(keys) == 1, keys
