"""Prometheus metrics: the store's event counters and tier gauges, and per-RPC counts and latency.

The store counts each event once, in store.counters, keyed by kvstore.counters.Event;
StoreCollector turns that Counter into metric families at scrape time, through one table
(EVENT_SERIES), instead of keeping a second set of counts that could drift.
RequestMetrics is a gRPC server interceptor, so no servicer has to remember to time
itself. This module owns metric names and labels; it changes nothing in the store.
The /metrics endpoint shows store-wide counts that Stats refuses to tenants, so when the
server has tokens it answers only a request bearing an admin token (docs/operations.md).
"""
from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from kvstore import counters
from kvstore.auth import Authenticator
from kvstore.counters import Event
from kvwire.defaults import AUTH_METADATA
from kvwire.errors import KVStoreError, PermissionDeniedError
from kvwire.types import Tier

if TYPE_CHECKING:
    from kvstore.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """A counter family of store events; `name` without the _total suffix Prometheus adds."""

    name: str
    help: str
    label_names: tuple[str, ...] = ()


BLOCKS_STORED = Family("kvstore_blocks_stored", "Blocks committed to the store")
BLOCKS_SERVED = Family("kvstore_blocks_served", "Blocks served to readers (Get and Pin)")
HITS = Family("kvstore_hits", "Blocks served, by the tier that held them", ("tier",))
MISSES = Family("kvstore_misses", "Blocks asked for by Get or Pin that were not present")
PAYLOAD_BYTES = Family("kvstore_payload_bytes", "Payload bytes committed (in) and served (out), whatever the transport", ("direction",))
LOOKUP_BLOCKS = Family("kvstore_lookup_blocks", "Blocks asked about by Lookup, by answer", ("result",))
LEASE_GRANTS = Family("kvstore_lease_grants", "Write leases granted")
LEASE_WAITS = Family("kvstore_lease_waits", "Wait calls on pending blocks")
# kind="pin" in the two families below: read pins are not leases (docs/glossary.md), but these names
# and labels are what dashboards already read, so they stay.
LEASE_EXPIRIES = Family("kvstore_lease_expiries", "Write leases and read pins that expired unreleased", ("kind",))
LEASE_REVOCATIONS = Family("kvstore_lease_revocations", "Write leases and read pins revoked by an admin", ("kind",))
CHECKSUM_FAILURES = Family("kvstore_checksum_failures", "Blocks whose bytes failed their checksum (commit or ssd read)")
DEMOTIONS = Family("kvstore_demotions", "Blocks written from the host tier to the ssd tier to free host memory")
PROMOTIONS = Family("kvstore_promotions", "Blocks copied from the ssd tier back into the host tier")
HBM_PROMOTIONS = Family("kvstore_hbm_promotions", "Hot blocks copied from the host tier into the HBM tier and verified there")
EVICTIONS = Family("kvstore_evictions", "Blocks removed from the store, by reason", ("reason",))
TIER_EVICTIONS = Family("kvstore_tier_evictions", "Copies dropped from one tier while another still holds the block", ("tier",))
ADMIN_DELETED_BLOCKS = Family("kvstore_admin_deleted_blocks", "Blocks deleted by an admin")
SECURE_DELETES = Family("kvstore_secure_deletes", "Secure deletions run (host scrub plus ssd rewrite)")
TRANSPORT_BYTES = Family("kvstore_transport_bytes", "Payload bytes moved, by transport and direction", ("transport", "direction"))
REQUEST_ERRORS = Family("kvstore_request_errors", "Requests refused by the store, by gRPC status code", ("code",))
CLUSTER_EVENTS = Family("kvstore_cluster_events", "Cluster membership and cluster-wide delete events, by name", ("event",))
CLUSTER_COPIES = Family("kvstore_cluster_copies", "Copies between nodes (replicas, repair, spill, handoff) and sole copies lost, by event",
                        ("event",))
REMOTE_LOCATE_KEYS = Family("kvstore_remote_locate_keys", "Keys missing here looked up at their directory homes, by answer", ("result",))
REMOTE_FETCH_BLOCKS = Family("kvstore_remote_fetch_blocks", "Blocks fetched from peers, checked and stored here")
REMOTE_FETCH_BYTES = Family("kvstore_remote_fetch_bytes", "Payload bytes fetched from peers")
REMOTE_FETCH_UCX_BLOCKS = Family("kvstore_remote_fetch_ucx_blocks", "Blocks fetched from peers over UCX (the rest came over gRPC)")
REMOTE_FETCHES = Family("kvstore_remote_fetches", "Fetches from peers, by outcome", ("outcome",))
REMOTE_FETCH_ERRORS = Family("kvstore_remote_fetch_errors", "Remote reads that went wrong, by reason", ("reason",))
PEER_SERVED_BLOCKS = Family("kvstore_peer_served_blocks", "Blocks this node sent to peers")
PEER_SERVED_BYTES = Family("kvstore_peer_served_bytes", "Payload bytes this node sent to peers")
PEER_REJECTED = Family("kvstore_peer_rejected", "Peer calls refused by the fencing rules or the transfer cap, by reason", ("reason",))
PEER_BREAKER_EVENTS = Family("kvstore_peer_breaker_events", "Circuit breaker events over all peers", ("event",))
DIRECTORY_EVENTS = Family("kvstore_directory_events", "Directory events (this node as a home, and as a holder), by name", ("event",))
STORE_EVENTS = Family("kvstore_store_events", "Other store events, by name", ("event",))

# Every store event -> its family and label values: the one table. tests/kvstore/test_metrics.py checks
# that it covers Event, so a new event cannot go unexported.
EVENT_SERIES: dict[Event, tuple[Family, tuple[str, ...]]] = {
    Event.PUTS: (BLOCKS_STORED, ()),
    Event.GETS: (BLOCKS_SERVED, ()),
    Event.HITS_HOST: (HITS, ("host",)),
    Event.HITS_SSD: (HITS, ("ssd",)),
    Event.HITS_HBM: (HITS, ("hbm",)),
    Event.MISSES: (MISSES, ()),
    Event.BYTES_IN: (PAYLOAD_BYTES, ("in",)),
    Event.BYTES_OUT: (PAYLOAD_BYTES, ("out",)),
    Event.LOOKUP_BLOCKS_HIT: (LOOKUP_BLOCKS, ("present",)),
    Event.LOOKUP_BLOCKS_MISS: (LOOKUP_BLOCKS, ("absent",)),
    Event.CHECKSUM_FAILURES: (CHECKSUM_FAILURES, ()),
    Event.LEASE_GRANTS: (LEASE_GRANTS, ()),
    Event.LEASE_WAITS: (LEASE_WAITS, ()),
    Event.LEASE_WAITS_ABANDONED: (STORE_EVENTS, ("lease_waits_abandoned",)),
    Event.LEASE_EXPIRIES: (LEASE_EXPIRIES, ("write",)),
    Event.PIN_EXPIRIES: (LEASE_EXPIRIES, ("pin",)),
    Event.LEASE_REVOCATIONS: (LEASE_REVOCATIONS, ("write",)),
    Event.PIN_REVOCATIONS: (LEASE_REVOCATIONS, ("pin",)),
    Event.SLOTS_QUARANTINED: (STORE_EVENTS, ("slots_quarantined",)),
    Event.DEMOTIONS: (DEMOTIONS, ()),
    Event.PROMOTIONS: (PROMOTIONS, ()),
    Event.HOST_EVICTIONS: (TIER_EVICTIONS, ("host",)),
    Event.SSD_EVICTIONS: (TIER_EVICTIONS, ("ssd",)),
    Event.EVICTIONS: (EVICTIONS, ("capacity",)),
    Event.ADMIN_EVICTIONS: (EVICTIONS, ("admin",)),
    Event.ADMIN_DELETES: (ADMIN_DELETED_BLOCKS, ()),
    Event.SECURE_DELETES: (SECURE_DELETES, ()),
    Event.HBM_PROMOTIONS: (HBM_PROMOTIONS, ()),
    Event.HBM_EVICTIONS: (TIER_EVICTIONS, ("hbm",)),
    Event.HBM_VERIFY_FAILURES: (STORE_EVENTS, ("hbm_verify_failures",)),
    Event.HBM_DEVICE_ERRORS: (STORE_EVENTS, ("hbm_device_errors",)),
    Event.UCX_PINS_STAGED_OFF_LOOP: (STORE_EVENTS, ("ucx_pins_staged_off_loop",)),
    Event.UCX_HBM_SENDS: (STORE_EVENTS, ("ucx_hbm_sends",)),
    **{event: (CLUSTER_EVENTS, (event.value.removeprefix("cluster_"),)) for event in (
        Event.CLUSTER_JOINS, Event.CLUSTER_FENCES, Event.CLUSTER_VIEW_CHANGES, Event.CLUSTER_KEEPALIVE_FAILURES,
        Event.TOMBSTONES_ISSUED, Event.TOMBSTONES_APPLIED, Event.CLUSTER_SSD_WIPES, Event.CLUSTER_CLAIMS_GRANTED,
        Event.CLUSTER_CLAIMS_PENDING, Event.CLUSTER_CLAIMS_LOCAL)},
    **{event: (CLUSTER_COPIES, (event.value.removeprefix("cluster_"),)) for event in (
        Event.CLUSTER_COPIES_TAKEN, Event.CLUSTER_COPY_BYTES_TAKEN, Event.CLUSTER_COPIES_SENT, Event.CLUSTER_COPY_BYTES_SENT,
        Event.CLUSTER_COPY_FAILURES, Event.CLUSTER_REPLICA_PUSHES_DROPPED, Event.CLUSTER_REPAIR_KEYS, Event.CLUSTER_SPILLED,
        Event.CLUSTER_HANDED_OFF, Event.CLUSTER_SOLE_COPIES_EVICTED)},
    Event.REMOTE_LOCATE_FOUND: (REMOTE_LOCATE_KEYS, ("found",)),
    Event.REMOTE_LOCATE_ABSENT: (REMOTE_LOCATE_KEYS, ("absent",)),
    Event.REMOTE_FETCH_BLOCKS: (REMOTE_FETCH_BLOCKS, ()),
    Event.REMOTE_FETCH_BYTES: (REMOTE_FETCH_BYTES, ()),
    Event.REMOTE_FETCH_UCX_BLOCKS: (REMOTE_FETCH_UCX_BLOCKS, ()),
    Event.REMOTE_FETCHES_COMPLETE: (REMOTE_FETCHES, ("complete",)),
    Event.REMOTE_FETCHES_SHORT: (REMOTE_FETCHES, ("short",)),
    Event.REMOTE_LOCATE_ERRORS: (REMOTE_FETCH_ERRORS, ("locate",)),
    Event.REMOTE_FETCH_FAILURES: (REMOTE_FETCH_ERRORS, ("transfer",)),
    Event.REMOTE_FETCH_NOT_FOUND: (REMOTE_FETCH_ERRORS, ("not_found",)),
    Event.REMOTE_CHECKSUM_FAILURES: (REMOTE_FETCH_ERRORS, ("checksum",)),
    Event.REMOTE_FETCH_BUSY: (REMOTE_FETCH_ERRORS, ("busy",)),
    Event.PEER_SERVED_BLOCKS: (PEER_SERVED_BLOCKS, ()),
    Event.PEER_SERVED_BYTES: (PEER_SERVED_BYTES, ()),
    Event.PEER_SERVED_NOT_FOUND: (DIRECTORY_EVENTS, ("served_not_found",)),
    Event.PEER_REJECTED_FENCED: (PEER_REJECTED, ("fenced",)),
    Event.PEER_REJECTED_STALE_VIEW: (PEER_REJECTED, ("stale_view",)),
    Event.PEER_REJECTED_ZOMBIE: (PEER_REJECTED, ("zombie",)),
    Event.PEER_REJECTED_BUSY: (PEER_REJECTED, ("busy",)),
    Event.PEER_BREAKER_OPENS: (PEER_BREAKER_EVENTS, ("opened",)),
    Event.PEER_CALLS_SHORT_CIRCUITED: (PEER_BREAKER_EVENTS, ("short_circuited",)),
    **{event: (DIRECTORY_EVENTS, (event.value.removeprefix("directory_"),)) for event in (
        Event.DIRECTORY_LOCATES, Event.DIRECTORY_ANNOUNCES, Event.DIRECTORY_RESYNCS, Event.DIRECTORY_RESYNCS_REQUESTED,
        Event.DIRECTORY_REPAIRS, Event.DIRECTORY_REPAIRS_SENT, Event.DIRECTORY_BATCHES_SENT, Event.DIRECTORY_RESYNCS_SENT,
        Event.DIRECTORY_ANNOUNCE_FAILURES, Event.DIRECTORY_REHOMED, Event.DIRECTORY_COMMIT_WAITS_EXPIRED,
        Event.DIRECTORY_HOT_PUSHES, Event.DIRECTORY_HOT_PUSH_FAILURES)},
    **{event: (TRANSPORT_BYTES, (transport, direction)) for (transport, direction), event in counters.TRANSPORT_BYTES.items()},
    **{event: (REQUEST_ERRORS, (status.lower(),)) for status, event in counters.REQUEST_ERRORS.items()},
    Event.ERRORS_UNKNOWN: (REQUEST_ERRORS, ("unknown",)),
}

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def series(counter: str) -> tuple[Family, tuple[str, ...]]:
    """A store counter's family and label values. A name outside Event (a bump not yet typed)
    still shows, as an event of its own, rather than vanish."""
    return EVENT_SERIES.get(counter) or (STORE_EVENTS, (counter,))


class StoreCollector:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _snapshot(self) -> dict:
        for _ in range(5):  # counters are bumped outside the store lock; retry a torn copy
            try:
                return self.store.stats()
            except RuntimeError:
                continue
        return self.store.stats()

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        families: dict[Family, CounterMetricFamily] = {}
        counts = {**dict.fromkeys(Event, 0), **s.counters}  # every event shows from the start, at 0
        for counter, value in sorted(counts.items()):
            family, labels = series(counter)
            metric = families.get(family)
            if metric is None:
                metric = families[family] = CounterMetricFamily(family.name, family.help, labels=list(family.label_names))
            metric.add_metric(list(labels), value)
        yield from families.values()
        gauges = {
            "capacity": GaugeMetricFamily("kvstore_tier_capacity_bytes", "Bytes a tier may hold", labels=["tier"]),
            "used": GaugeMetricFamily("kvstore_tier_used_bytes", "Bytes a tier holds now (host, hbm: slot bytes; ssd: payload bytes)", labels=["tier"]),
            "blocks": GaugeMetricFamily("kvstore_tier_blocks", "Blocks with a copy in a tier", labels=["tier"]),
        }
        for t in s.tiers:
            label = [Tier(t.tier).name.lower()]
            gauges["capacity"].add_metric(label, t.capacity_bytes)
            gauges["used"].add_metric(label, t.used_bytes)
            gauges["blocks"].add_metric(label, t.blocks)
        yield from gauges.values()
        yield GaugeMetricFamily("kvstore_blocks", "Blocks in the store", value=s.blocks)
        yield GaugeMetricFamily("kvstore_leases_held", "Write leases held now", value=s.leases_held)
        yield GaugeMetricFamily("kvstore_pins_held", "Read pins held now", value=s.pins_held)
        yield GaugeMetricFamily("kvstore_draining", "1 while the server admits no writes", value=0 if self.store.admitting else 1)


def _status(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if failed and code in (None, grpc.StatusCode.OK):
        return grpc.StatusCode.UNKNOWN.name
    return (code or grpc.StatusCode.OK).name


class RequestMetrics(grpc.ServerInterceptor):
    """Counts and times every RPC by service, method and final status code.

    Calls served over the local control socket (kvstore/local_control.py) are counted in the
    same series, so request rates, errors and latency cover every call whichever way it came,
    and once more in kvstore_local_control_requests, which says how many came that way.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("kvstore_grpc_requests", "RPCs finished (over gRPC or the local control socket), by service, method and status code", ["service", "method", "code"], registry=registry)
        self.latency = Histogram("kvstore_grpc_request_duration_seconds", "RPC handling time, by service and method", ["service", "method"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.local_requests = Counter("kvstore_local_control_requests", "RPCs served over the local control socket, by method and status code", ["method", "code"], registry=registry)
        self._call_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._local_series: dict[tuple[str, str], Any] = {}

    def _observe(self, service: str, method: str, started: float, code: str) -> None:
        latency, requests = self._series(service, method, code)
        latency.observe(time.perf_counter() - started)
        requests.inc()

    def observe_local(self, service: str, method: str, started: float, code: str) -> None:
        self._observe(service, method, started, code)
        local = self._local_series.get((method, code))
        if local is None:
            local = self._local_series.setdefault((method, code), self.local_requests.labels(method, code))
        local.inc()

    def _series(self, service: str, method: str, code: str) -> tuple[Any, Any]:
        """A call's latency and count series, looked up once per (service, method, code): labels() checks and locks
        on every call (~8 us of a local call's three lookups), and the label sets are few (methods by status)."""
        series = self._call_series.get((service, method, code))
        if series is None:
            series = self._call_series.setdefault((service, method, code),
                                                  (self.latency.labels(service, method), self.requests.labels(service, method, code)))
        return series

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        observe = functools.partial(self._observe, service, method)
        if handler.unary_unary:
            return handler._replace(unary_unary=_timed(handler.unary_unary, observe))
        if handler.stream_unary:
            return handler._replace(stream_unary=_timed(handler.stream_unary, observe))
        if handler.unary_stream:
            return handler._replace(unary_stream=_timed_stream(handler.unary_stream, observe))
        return handler._replace(stream_stream=_timed_stream(handler.stream_stream, observe))


def _timed(behavior: Callable, observe: Callable) -> Callable:
    def wrapper(request, context):
        started, failed = time.perf_counter(), True
        try:
            response = behavior(request, context)
            failed = False
            return response
        finally:
            observe(started, _status(context, failed))

    return wrapper


def _timed_stream(behavior: Callable, observe: Callable) -> Callable:
    def wrapper(request, context):
        started, failed = time.perf_counter(), True
        try:
            yield from behavior(request, context)
            failed = False
        except GeneratorExit:
            failed = False
            context.set_code(grpc.StatusCode.CANCELLED)
            raise
        finally:
            observe(started, _status(context, failed))

    return wrapper


def admin_only(app: Callable, auth: Authenticator) -> Callable:
    """A WSGI app answering only requests with `Authorization: Bearer <admin token>`, checked by the server's
    Authenticator: 401 without a valid token, 403 with a tenant's."""

    def guarded(environ, start_response):
        try:
            auth.require_admin(auth.caller([(AUTH_METADATA, environ.get("HTTP_AUTHORIZATION", ""))]))
        except PermissionDeniedError as err:
            return _refuse(start_response, "403 Forbidden", str(err))
        except KVStoreError as err:
            return _refuse(start_response, "401 Unauthorized", str(err), (("WWW-Authenticate", 'Bearer realm="kvstore"'),))
        return app(environ, start_response)

    return guarded


def _refuse(start_response, status: str, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    body = f"{detail}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # one line per scrape on stderr is noise
        pass


class Metrics:
    """The server's metrics registry and its /metrics HTTP endpoint (off when port is 0).

    With auth not insecure, the endpoint wants an admin token (admin_only)."""

    def __init__(self, store: Store, host: str, port: int, auth: Authenticator) -> None:
        disable_created_metrics()  # *_created series double the output and no dashboard reads them
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(store))
        ProcessCollector(registry=self.registry)
        self.interceptor = RequestMetrics(self.registry)
        self.host, self.port, self.auth = host, port, auth
        self._httpd = None

    def start(self) -> None:
        if not self.port:
            return
        app = make_wsgi_app(self.registry)
        if not self.auth.insecure:
            app = admin_only(app, self.auth)

        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        self._httpd = make_server(self.host, self.port, app, Server, handler_class=_QuietHandler)
        threading.Thread(target=self._httpd.serve_forever, name="kvstore-metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics%s", self.host, self.port, "" if self.auth.insecure else " (admin token required)")

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
