"""The one module that talks to etcd: a small synchronous client over etcd's v3 gRPC API.

Owns endpoints and failover, per-call deadlines, the mapping of gRPC failures to explicit errors,
and prefix watches that survive a lost or silent server. It refuses meaning: key layouts,
membership and tombstones live in membership.py and tombstones.py, which see only the types here.

Why our own thin client over `pyetcd.etcdrpc` (etcd's rpc.proto compiled, shipped by
etcd-sdk-python, checked to import beside protobuf 7 / grpcio 1.85) rather than pyetcd's client:
- its watch shares one stream and ends on the first stream error, with no reconnect; a SIGSTOPped
  server keeps its TCP connection open, so a plain stream just hangs (Mooncake#2253). Here a watch
  sends a progress request every `progress_s` and reconnects, from the next unseen revision, to the
  next endpoint when nothing came back for `silence_s`;
- its failover parks a failed endpoint for 300 s; here a failure only moves the next call on;
- a lease keepalive must be one request with its own deadline (the self-fence arithmetic in
  membership.py counts from the send time of an acknowledged keepalive), not a long-lived stream.
Generating the stubs from etcd's rpc.proto instead would change only the import below.

Every call has a deadline (default 1 s). etcd's server refuses gRPC keepalive pings more often than
its --grpc-keepalive-min-time (5 s by default), so hangs are found by deadlines, never by pings.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Iterator, Sequence

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 1.0
# Redial quickly after etcd comes back: gRPC's default backoff grows to 120 s, far past the 10 s the
# cluster has to recover in once etcd returns.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]
# A watch asks the server to cancel it when the server loses its raft leader, so a watch on a
# member cut off from the quorum moves to another member instead of going quiet (clientv3's WithRequireLeader).
_REQUIRE_LEADER = (("hasleader", "true"),)
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class EtcdError(Exception):
    """Anything etcd did not do."""


class EtcdUnavailableError(EtcdError):
    """No endpoint answered within the deadline, or the one that answered has no raft leader."""


class EtcdClosedError(EtcdUnavailableError):
    """This client was closed; its watches end quietly."""


class CompactedError(EtcdError):
    """The revision asked for was compacted away; only the present state can be read."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {compact_revision}")
        self.compact_revision = compact_revision


class LeaseNotFoundError(EtcdError):
    """The lease expired or was revoked."""


class EtcdRequestError(EtcdError):
    """etcd refused the request itself (a bug on our side, or a misconfigured etcd)."""


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def of(cls, kv) -> "KeyValue":
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


class EventKind(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    kind: EventKind
    kv: KeyValue  # for DELETE: key and mod_revision (the deletion's revision) only
    prev: KeyValue | None  # the value before this event, while etcd still has it


@dataclass(frozen=True)
class CreateResult:
    created: bool
    revision: int  # the txn's revision: the new key's create_revision when created
    existing: KeyValue | None  # the key that was there instead


@dataclass(frozen=True)
class Lease:
    id: int
    ttl_s: int  # what etcd granted (it may round a short TTL up)


@dataclass(frozen=True)
class Status:
    endpoint: str
    member_id: int
    leader: int
    raft_term: int
    revision: int


def parse_endpoints(spec: str | Sequence[str]) -> list[str]:
    """"HOST:PORT[,HOST:PORT...]" (ServerConfig.cluster_etcd) -> ["HOST:PORT", ...]; http:// prefixes are dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [e.strip().removeprefix("http://") for e in items if e.strip()]
    if not out:
        raise ValueError("no etcd endpoints given")
    for e in out:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint must be HOST:PORT, got {e!r}")
    return out


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range read or watch cover every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _error(err: grpc.RpcError, endpoint: str) -> EtcdError:
    code, detail = err.code(), err.details() or ""
    if code in _UNREACHABLE:
        return EtcdUnavailableError(f"etcd {endpoint}: {code.name} {detail}".strip())
    if "lease not found" in detail:
        return LeaseNotFoundError(detail)
    if "compacted" in detail:
        return CompactedError(0)
    return EtcdRequestError(f"etcd {endpoint}: {code.name} {detail}")


class EtcdClient:
    """Thread-safe; one gRPC channel per endpoint, made on first use.

    A call goes to the current endpoint; when that one is unreachable the call moves on to the next
    while its deadline lasts, and later calls start from the endpoint that answered.
    """

    def __init__(self, endpoints: str | Sequence[str], deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._current = 0
        self._closed = False
        self.cluster_id = 0  # etcd's cluster id, from the last response header (revisions belong to it)

    # ---- plumbing ---------------------------------------------------------------------------

    def _channel(self, endpoint: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise EtcdClosedError("etcd client is closed")
            ch = self._channels.get(endpoint)
            if ch is None:
                ch = self._channels[endpoint] = grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
            return ch

    def _endpoint_order(self) -> list[str]:
        with self._lock:
            i = self._current
        return self.endpoints[i:] + self.endpoints[:i]

    def _moved_past(self, endpoint: str) -> None:
        with self._lock:
            if self.endpoints[self._current] == endpoint:
                self._current = (self._current + 1) % len(self.endpoints)

    def _attempts(self, deadline_s: float | None) -> Iterator[tuple[str, float, bool]]:
        """(endpoint, timeout, wait_for_ready) for each try of one call, until its deadline.

        The first round goes to each endpoint once and fails fast on one gRPC already knows is down,
        so a dead member costs nothing. Later rounds wait for a connection (in slices, when there are
        several endpoints): right after etcd returns, channels are still backing off, and a call
        that only failed fast would report etcd down while it is up.
        """
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        first = True
        while True:
            for endpoint in self._endpoint_order():
                left = deadline - time.monotonic()
                if left <= 0.005:
                    return
                if first:
                    yield endpoint, left, False
                else:
                    yield endpoint, left if len(self.endpoints) == 1 else min(left, 0.25), True
            first = False

    def _call(self, stub: type, method: str, request, deadline_s: float | None = None):
        last: EtcdError | None = None
        for endpoint, timeout, wait in self._attempts(deadline_s):
            try:
                response = getattr(stub(self._channel(endpoint)), method)(request, timeout=timeout, wait_for_ready=wait)
            except grpc.RpcError as err:
                last = _error(err, endpoint)
                if not isinstance(last, EtcdUnavailableError):
                    raise last from None
                self._moved_past(endpoint)
                continue
            self._saw(response.header)
            return response
        raise last or EtcdUnavailableError(f"etcd {','.join(self.endpoints)}: no answer within the deadline")

    def _saw(self, header) -> None:
        if header.cluster_id:
            self.cluster_id = header.cluster_id

    # ---- keys -------------------------------------------------------------------------------

    def get(self, key: bytes, deadline_s: float | None = None) -> tuple[KeyValue | None, int]:
        """(the key or None, the store revision the read saw)."""
        r = self._call(etcdrpc.KVStub, "Range", etcdrpc.RangeRequest(key=key), deadline_s)
        return (KeyValue.of(r.kvs[0]) if r.kvs else None), r.header.revision

    def get_prefix(self, prefix: bytes, deadline_s: float | None = None) -> tuple[list[KeyValue], int]:
        """Every key under `prefix`, sorted by key, and the revision of that snapshot (watch from revision + 1)."""
        req = etcdrpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        r = self._call(etcdrpc.KVStub, "Range", req, deadline_s)
        return [KeyValue.of(kv) for kv in r.kvs], r.header.revision

    def put(self, key: bytes, value: bytes, lease: int = 0, deadline_s: float | None = None) -> int:
        """The revision of the write."""
        r = self._call(etcdrpc.KVStub, "Put", etcdrpc.PutRequest(key=key, value=value, lease=lease), deadline_s)
        return r.header.revision

    def delete(self, key: bytes, prefix: bool = False, deadline_s: float | None = None) -> tuple[int, int]:
        """(keys deleted, revision)."""
        req = etcdrpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        r = self._call(etcdrpc.KVStub, "DeleteRange", req, deadline_s)
        return r.deleted, r.header.revision

    def _txn(self, compare, success, failure, deadline_s: float | None):
        return self._call(etcdrpc.KVStub, "Txn", etcdrpc.TxnRequest(compare=compare, success=success, failure=failure), deadline_s)

    def create(self, key: bytes, value: bytes, lease: int = 0, deadline_s: float | None = None) -> CreateResult:
        """Put `key` only if it does not exist (one txn). Retried after a lost answer, a key found
        holding our own lease is reported as created: the first attempt did write it."""
        cmp = etcdrpc.Compare(key=key, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.CREATE, create_revision=0)
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease))
        get = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
        r = self._txn([cmp], [put], [get], deadline_s)
        if r.succeeded:
            return CreateResult(True, r.header.revision, None)
        kvs = r.responses[0].response_range.kvs
        existing = KeyValue.of(kvs[0]) if kvs else None
        if existing is not None and lease and existing.lease == lease and existing.value == value:
            return CreateResult(True, existing.create_revision, None)
        return CreateResult(False, r.header.revision, existing)

    def update(self, key: bytes, value: bytes, create_revision: int, lease: int = 0, deadline_s: float | None = None) -> bool:
        """Put `key` only while it is still the incarnation created at `create_revision`."""
        cmp = etcdrpc.Compare(key=key, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.CREATE, create_revision=create_revision)
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease))
        return self._txn([cmp], [put], [], deadline_s).succeeded

    def delete_if(self, key: bytes, mod_revision: int, deadline_s: float | None = None) -> bool:
        """Delete `key` only if nobody wrote it after `mod_revision` (compare-and-delete)."""
        cmp = etcdrpc.Compare(key=key, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.MOD, mod_revision=mod_revision)
        delete = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))
        return self._txn([cmp], [delete], [], deadline_s).succeeded

    def compact(self, revision: int, deadline_s: float | None = None) -> None:
        """Drop history before `revision` (present keys stay). Compacting an already compacted revision is a no-op."""
        try:
            self._call(etcdrpc.KVStub, "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True), deadline_s)
        except CompactedError:
            pass

    # ---- leases -----------------------------------------------------------------------------

    def lease_grant(self, ttl_s: float, deadline_s: float | None = None) -> Lease:
        r = self._call(etcdrpc.LeaseStub, "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=max(1, round(ttl_s))), deadline_s)
        if r.error:
            raise EtcdRequestError(f"lease grant refused: {r.error}")
        return Lease(r.ID, r.TTL)

    def lease_keepalive(self, lease_id: int, deadline_s: float | None = None) -> int:
        """One keepalive, answered or failed within the deadline: the lease's TTL (s) as etcd reset it.
        LeaseNotFoundError when the lease is gone."""
        last: EtcdError | None = None
        for endpoint, timeout, wait in self._attempts(deadline_s):
            request = iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)])
            stream = etcdrpc.LeaseStub(self._channel(endpoint)).LeaseKeepAlive(request, timeout=timeout, wait_for_ready=wait)
            try:
                response = next(stream)
            except StopIteration:
                last = EtcdUnavailableError(f"etcd {endpoint}: keepalive stream closed without an answer")
                self._moved_past(endpoint)
                continue
            except grpc.RpcError as err:
                last = _error(err, endpoint)
                if not isinstance(last, EtcdUnavailableError):
                    raise last from None
                self._moved_past(endpoint)
                continue
            finally:
                stream.cancel()
            self._saw(response.header)
            if response.TTL <= 0:
                raise LeaseNotFoundError(f"lease {lease_id:x} not found")
            return response.TTL
        raise last or EtcdUnavailableError("no etcd endpoint answered the keepalive within the deadline")

    def lease_revoke(self, lease_id: int, deadline_s: float | None = None) -> None:
        """Revoke at once (its keys go with it); a lease already gone is not an error."""
        try:
            self._call(etcdrpc.LeaseStub, "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id), deadline_s)
        except LeaseNotFoundError:
            pass

    def lease_time_to_live(self, lease_id: int, deadline_s: float | None = None) -> int:
        """Seconds the lease has left; -1 when it is gone."""
        r = self._call(etcdrpc.LeaseStub, "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), deadline_s)
        return r.TTL

    # ---- cluster ----------------------------------------------------------------------------

    def status(self, endpoint: str, deadline_s: float | None = None) -> Status:
        """One member's view of the raft cluster (no failover: the caller names the member)."""
        try:
            r = etcdrpc.MaintenanceStub(self._channel(endpoint)).Status(
                etcdrpc.StatusRequest(), timeout=self.deadline_s if deadline_s is None else deadline_s)
        except grpc.RpcError as err:
            raise _error(err, endpoint) from None
        return Status(endpoint, r.header.member_id, r.leader, r.raftTerm, r.header.revision)

    def watch_prefix(self, prefix: bytes, start_revision: int, on_events: Callable[[list[WatchEvent]], None],
                     on_error: Callable[[EtcdError], None], name: str = "etcd-watch") -> "Watch":
        """Watch every key under `prefix` from `start_revision` on a thread of its own; see Watch."""
        return Watch(self, prefix, start_revision, on_events, on_error, name=name).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()


_STOP = object()


class Watch:
    """A prefix watch on its own thread, delivering each batch of events in revision order.

    A lost stream (server killed, leader lost, or silent for `silence_s` although asked for progress
    every `progress_s`) is reopened on the next endpoint from the first revision not yet delivered, so
    no event is lost or repeated across reconnects. History compacted past that revision cannot be
    replayed: on_error(CompactedError) is called and the watch ends; the owner re-reads the present
    state and watches again from there.
    """

    def __init__(self, client: EtcdClient, prefix: bytes, start_revision: int, on_events: Callable[[list[WatchEvent]], None],
                 on_error: Callable[[EtcdError], None], progress_s: float = 0.5, silence_s: float = 2.0, name: str = "etcd-watch") -> None:
        self.client = client
        self.prefix = prefix
        self.next_revision = start_revision
        self.on_events = on_events
        self.on_error = on_error
        self.progress_s = progress_s
        self.silence_s = silence_s
        self.reconnects = 0
        self.connected = threading.Event()  # set while a stream is open and created
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stream = None
        self._requests: queue.Queue | None = None

    def start(self) -> "Watch":
        self._thread.start()
        return self

    def _requests_iter(self, requests: queue.Queue, heard: list[float]) -> Iterator:
        """What the stream sends: the create request, then a progress request whenever it has been
        quiet; and the watchdog: a stream silent for silence_s is cancelled, which ends the read loop."""
        while not self._stopped.is_set():
            try:
                item = requests.get(timeout=self.progress_s)
            except queue.Empty:
                if time.monotonic() - heard[0] > self.silence_s:
                    log.info("etcd watch on %r silent for %.1fs; reconnecting", self.prefix, self.silence_s)
                    stream = self._stream
                    if stream is not None:
                        stream.cancel()
                    return
                item = etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())
            if item is _STOP:
                return
            yield item

    def _run(self) -> None:
        backoff = 0.05
        while not self._stopped.is_set():
            endpoint = self.client._endpoint_order()[0]
            requests: queue.Queue = queue.Queue()
            create = etcdrpc.WatchCreateRequest(key=self.prefix, range_end=prefix_end(self.prefix), start_revision=self.next_revision, prev_kv=True)
            requests.put(etcdrpc.WatchRequest(create_request=create))
            heard = [time.monotonic()]
            self._requests = requests
            try:
                stream = etcdrpc.WatchStub(self.client._channel(endpoint)).Watch(self._requests_iter(requests, heard), metadata=_REQUIRE_LEADER)
                self._stream = stream
                if self._stopped.is_set():
                    stream.cancel()
                for response in stream:
                    heard[0] = time.monotonic()
                    if response.compact_revision:
                        self._fail(CompactedError(response.compact_revision))
                        return
                    if response.canceled:
                        log.info("etcd %s cancelled the watch on %r: %s", endpoint, self.prefix, response.cancel_reason)
                        break
                    if response.created:
                        self.connected.set()
                        backoff = 0.05
                    if response.events:
                        events = [self._event(e) for e in response.events]
                        self.next_revision = events[-1].kv.mod_revision + 1
                        try:
                            self.on_events(events)
                        except Exception:  # a bad handler must not end the watch that others rely on
                            log.exception("etcd watch handler failed on %r", self.prefix)
            except grpc.RpcError as err:
                if not self._stopped.is_set():
                    log.info("etcd watch on %r via %s lost: %s", self.prefix, endpoint, _error(err, endpoint))
            except EtcdClosedError:  # the owner closed the client: nothing to report to
                return
            finally:
                self.connected.clear()
                requests.put(_STOP)
                self._stream = None
            if self._stopped.is_set():
                return
            self.client._moved_past(endpoint)
            self.reconnects += 1
            self._stopped.wait(backoff)
            backoff = min(backoff * 2, 0.5)

    @staticmethod
    def _event(e) -> WatchEvent:
        kind = EventKind.DELETE if e.type == kv_pb2.Event.DELETE else EventKind.PUT
        return WatchEvent(kind, KeyValue.of(e.kv), KeyValue.of(e.prev_kv) if e.HasField("prev_kv") else None)

    def _fail(self, err: EtcdError) -> None:
        self._stopped.set()
        try:
            self.on_error(err)
        except Exception:
            log.exception("etcd watch error handler failed")

    def cancel(self) -> None:
        self._stopped.set()
        requests, stream = self._requests, self._stream
        if requests is not None:
            requests.put(_STOP)
        if stream is not None:
            stream.cancel()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(5)
