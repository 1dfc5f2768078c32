"""etcd, as the cluster needs it: ranges, guarded transactions, leases, watches.

Requests go through etcd3gw's client (its HTTP session, TLS settings and
error mapping) to the members' gRPC gateway, one member at a time: when
one does not answer (refused, timed out, no quorum behind it) the next
is tried, and the one that answered is used first from then on.  Every
read is linearizable (etcd's default), so a member cut off from the
quorum fails rather than answering with old data.

Watches are read here rather than through etcd3gw's `watch`, which drops
what a watcher must see: the response header's revision, a compaction
that cancelled the watch, and the end of the stream.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from nwfilter.cluster.config import ClusterConfig, Endpoint
from nwfilter.errors import UnavailableError

log = logging.getLogger(__name__)

#: seconds a watch stream may stay silent before it is opened again
WATCH_IDLE = 15.0
#: seconds a request is tried again, on every member, before it fails: a
#: leader election after a member died takes about one election timeout
RETRY_WINDOW = 3.0
RETRY_PAUSE = 0.2


class CompactedError(Exception):
    """The revision asked for is older than etcd's compacted history."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"history compacted up to revision {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: its events (possibly none) and the store's revision."""

    revision: int
    events: tuple[WatchEvent, ...]


@dataclass(frozen=True)
class Compare:
    """A transaction guard: `key`'s mod revision equals `mod_revision`
    (0: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> bytes:
    """The end of the key range holding every key that starts with `prefix`."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


def _kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        _unb64(data["key"]).decode("utf-8", errors="replace"),
        _unb64(data.get("value", "")),
        int(data.get("mod_revision", 0)),
        int(data.get("create_revision", 0)),
        int(data.get("lease", 0)),
    )


def _revision(reply: dict[str, Any]) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _session(config: ClusterConfig) -> Any:
    """An HTTP session for one member, with the cluster's TLS settings.

    The environment is not consulted: requests lets `REQUESTS_CA_BUNDLE`
    (and `CURL_CA_BUNDLE`) override a session's own CA, so a host whose
    environment names a CA bundle would not trust the cluster's CA; and
    etcd members are reached directly, never through an HTTP proxy."""
    import requests

    session = requests.Session()
    session.trust_env = False
    if config.ca_cert is not None:
        session.verify = str(config.ca_cert)
    if config.cert is not None and config.key is not None:
        session.cert = (str(config.cert), str(config.key))
    return session


class EtcdStore:
    """A connection to one etcd cluster through any of its members."""

    def __init__(self, config: ClusterConfig) -> None:
        try:
            import etcd3gw  # imported here: only a clustered daemon needs it
        except ImportError as exc:
            raise UnavailableError(
                "the cluster needs the etcd client etcd3gw (pip install etcd3gw)"
            ) from exc

        self.config = config
        self._clients = [
            etcd3gw.Etcd3Client(
                host=e.host, port=e.port, protocol=e.scheme, session=_session(config),
                timeout=config.timeout, api_path="/v3/",
            )
            for e in config.endpoints
        ]
        self._first = 0
        self._mutex = threading.Lock()  # one request at a time on the sessions
        self._watches: set[Any] = set()  # open watch responses, for `cancel_watches`
        self.cluster_id = ""

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.config.endpoints

    def _order(self) -> list[int]:
        n = len(self._clients)
        return [(self._first + i) % n for i in range(n)]

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """`fn(client)` on the first member that answers."""
        from etcd3gw import exceptions

        failures: list[str] = []
        deadline = time.monotonic() + RETRY_WINDOW
        with self._mutex:
            while True:
                failures = []
                for index in self._order():
                    client = self._clients[index]
                    try:
                        result = fn(client)
                    except exceptions.Etcd3Exception as exc:
                        text = " ".join(str(a) for a in exc.args if a)[:200]
                        if "compacted" in text:
                            raise CompactedError(0) from exc
                        failures.append(f"{self.endpoints[index].url()}: "
                                        f"{text or type(exc).__name__}")
                        continue
                    if index != self._first:
                        log.info("etcd: using %s", self.endpoints[index].url())
                        self._first = index
                    return result
                # No member answered: an election may be under way.
                if time.monotonic() + RETRY_PAUSE >= deadline:
                    break
                time.sleep(RETRY_PAUSE)
        raise UnavailableError(
            f"etcd cannot be reached for {what} (" + "; ".join(failures) + ")"
        )

    def _post(self, what: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        def run(client: Any) -> dict[str, Any]:
            reply: dict[str, Any] = client.post(client.get_url(path), json=payload)
            cid = reply.get("header", {}).get("cluster_id")
            if cid:
                self.cluster_id = str(cid)
            return reply

        result: dict[str, Any] = self._call(what, run)
        return result

    # -------------------------------------------------------------- reads

    def range(self, key: str, *, prefix: bool = False,
              revision: int | None = None) -> tuple[int, list[KeyValue]]:
        """The keys (`key` or every key under it), and the revision read at."""
        payload: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            payload["range_end"] = _b64(prefix_end(key))
        if revision is not None:
            payload["revision"] = revision
        reply = self._post(f"reading '{key}'", "/kv/range", payload)
        return _revision(reply), [_kv(kv) for kv in reply.get("kvs", [])]

    def get(self, key: str) -> tuple[int, KeyValue | None]:
        revision, kvs = self.range(key)
        return revision, (kvs[0] if kvs else None)

    # ------------------------------------------------------------ writes

    def txn(self, compares: Sequence[Compare],
            success: Sequence[Put | Delete]) -> tuple[bool, int]:
        """Run `success` if every guard holds; (succeeded, revision)."""
        payload = {
            "compare": [
                {"key": _b64(c.key), "result": "EQUAL", "target": "MOD",
                 "mod_revision": c.mod_revision}
                for c in compares
            ],
            "success": [
                {"request_put": {"key": _b64(op.key), "value": _b64(op.value),
                                 **({"lease": op.lease} if op.lease else {})}}
                if isinstance(op, Put)
                else {"request_delete_range": {"key": _b64(op.key)}}
                for op in success
            ],
            "failure": [],
        }
        reply = self._post("a transaction", "/kv/txn", payload)
        return bool(reply.get("succeeded", False)), _revision(reply)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            payload["lease"] = lease
        return _revision(self._post(f"writing '{key}'", "/kv/put", payload))

    def compact(self, revision: int) -> None:
        """Drop the history before `revision` (maintenance, and tests)."""
        self._post("compacting", "/kv/compaction", {"revision": revision, "physical": True})

    # ------------------------------------------------------------ leases

    def lease_grant(self, ttl: int) -> int:
        reply = self._post("a lease", "/lease/grant", {"TTL": ttl, "ID": 0})
        return int(reply["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """The lease's new TTL; 0 or less when it has expired."""
        reply = self._post("a lease keep-alive", "/lease/keepalive", {"ID": lease})
        return int(reply.get("result", {}).get("TTL", -1))

    def lease_revoke(self, lease: int) -> None:
        self._post("revoking a lease", "/kv/lease/revoke", {"ID": lease})

    # ------------------------------------------------------------- watch

    def watch(self, prefix: str, start_revision: int,
              stopped: threading.Event) -> Iterator[WatchBatch]:
        """The changes of every key under `prefix` from `start_revision` on,
        one batch per watch response, until the stream ends (the member
        went away: `UnavailableError`), `WATCH_IDLE` seconds pass without
        a word (the iterator ends; open it again), or `stopped` is set.
        `CompactedError` when the history from `start_revision` is gone."""
        import requests

        payload: Any = {"create_request": {
            "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
            "start_revision": start_revision, "progress_notify": True,
        }}
        response = None
        failures: list[str] = []
        for index in self._order():
            client = self._clients[index]
            try:
                response = client.session.post(
                    client.get_url("/watch"), json=payload, stream=True,
                    timeout=(self.config.timeout, WATCH_IDLE),
                )
            except requests.exceptions.RequestException as exc:
                failures.append(f"{self.endpoints[index].url()}: {exc}")
                continue
            if response.status_code != 200:
                failures.append(f"{self.endpoints[index].url()}: HTTP {response.status_code}")
                response.close()
                response = None
                continue
            break
        if response is None:
            raise UnavailableError("etcd cannot be reached for a watch (" + "; ".join(failures)
                                   + ")")
        with self._mutex:
            self._watches.add(response)
        try:
            # chunk_size None: each chunk as it comes (a watch never fills a buffer)
            lines: Iterator[bytes] = cast(Any, response).iter_lines(chunk_size=None)
            while not stopped.is_set():
                try:
                    line = next(lines)
                except StopIteration:
                    raise UnavailableError("the etcd watch stream ended") from None
                except requests.exceptions.ConnectionError as exc:
                    if "timed out" in str(exc).lower():
                        return
                    raise UnavailableError(f"the etcd watch stream broke: {exc}") from exc
                except requests.exceptions.RequestException as exc:
                    raise UnavailableError(f"the etcd watch stream broke: {exc}") from exc
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise UnavailableError(f"etcd ended the watch: {chunk['error']}")
                result = chunk.get("result", {})
                compacted = int(result.get("compact_revision", 0) or 0)
                if compacted:
                    raise CompactedError(compacted)
                if result.get("canceled"):
                    raise UnavailableError(
                        f"etcd cancelled the watch: {result.get('cancel_reason', '')}"
                    )
                events = tuple(
                    WatchEvent(e.get("type") == "DELETE", _kv(e["kv"]))
                    for e in result.get("events", [])
                )
                yield WatchBatch(_revision(result), events)
        finally:
            with self._mutex:
                self._watches.discard(response)
            response.close()

    def cancel_watches(self) -> None:
        """End every open watch now (a reader blocked on one wakes up)."""
        with self._mutex:
            responses = list(self._watches)
        for response in responses:
            # Closing the response from another thread does not wake a
            # reader blocked in recv(); shutting the socket down does.
            with contextlib.suppress(Exception):
                fd = response.raw._fp.fileno()
                sock = socket.socket(fileno=os.dup(fd))
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
