"""Prometheus metrics: the store's event counters and tier gauges, and per-RPC counts and latency.

The store counts each event once, in store.counters; StoreCollector turns that Counter
into metric families at scrape time instead of keeping a second set that could drift.
RequestMetrics is a gRPC server interceptor, so no servicer has to remember to time
itself. This module owns metric names and labels; it changes nothing in the store.
The /metrics endpoint shows store-wide counts that Stats refuses to tenants, so when the
server has tokens it answers only a request bearing an admin token (docs/operations.md).
"""
from __future__ import annotations

import functools
import logging
import re
import socket
import threading
import time
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from kvwire.errors import KVStoreError, PermissionDeniedError
from kvstore.auth import AUTH_METADATA, Authenticator
from kvstore.store import Store
from kvwire.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

# store counter -> (family without _total, help, labels)
STORE_COUNTERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "puts": ("kvstore_blocks_stored", "Blocks committed to the store", {}),
    "gets": ("kvstore_blocks_served", "Blocks served to readers (Get and Pin)", {}),
    "hits_host": ("kvstore_hits", "Blocks served, by the tier that held them", {"tier": "host"}),
    "hits_ssd": ("kvstore_hits", "Blocks served, by the tier that held them", {"tier": "ssd"}),
    "misses": ("kvstore_misses", "Blocks asked for by Get or Pin that were not present", {}),
    "bytes_in": ("kvstore_payload_bytes", "Payload bytes committed (in) and served (out), whatever the transport", {"direction": "in"}),
    "bytes_out": ("kvstore_payload_bytes", "Payload bytes committed (in) and served (out), whatever the transport", {"direction": "out"}),
    "lookup_blocks_hit": ("kvstore_lookup_blocks", "Blocks asked about by Lookup, by answer", {"result": "present"}),
    "lookup_blocks_miss": ("kvstore_lookup_blocks", "Blocks asked about by Lookup, by answer", {"result": "absent"}),
    "lease_grants": ("kvstore_lease_grants", "Write leases granted", {}),
    "lease_waits": ("kvstore_lease_waits", "Wait calls on pending blocks", {}),
    "lease_expiries": ("kvstore_lease_expiries", "Write leases and read pins that expired unreleased", {"kind": "write"}),
    "pin_expiries": ("kvstore_lease_expiries", "Write leases and read pins that expired unreleased", {"kind": "pin"}),
    "lease_revocations": ("kvstore_lease_revocations", "Write leases and read pins revoked by an admin", {"kind": "write"}),
    "pin_revocations": ("kvstore_lease_revocations", "Write leases and read pins revoked by an admin", {"kind": "pin"}),
    "checksum_failures": ("kvstore_checksum_failures", "Blocks whose bytes failed their checksum (commit or ssd read)", {}),
    "demotions": ("kvstore_demotions", "Blocks written from the host tier to the ssd tier to free host memory", {}),
    "promotions": ("kvstore_promotions", "Blocks copied from the ssd tier back into the host tier", {}),
    "evictions": ("kvstore_evictions", "Blocks removed from the store, by reason", {"reason": "capacity"}),
    "admin_evictions": ("kvstore_evictions", "Blocks removed from the store, by reason", {"reason": "admin"}),
    "host_evictions": ("kvstore_tier_evictions", "Copies dropped from one tier while another still holds the block", {"tier": "host"}),
    "ssd_evictions": ("kvstore_tier_evictions", "Copies dropped from one tier while another still holds the block", {"tier": "ssd"}),
    "admin_deletes": ("kvstore_admin_deleted_blocks", "Blocks deleted by an admin", {}),
    "secure_deletes": ("kvstore_secure_deletes", "Secure deletions run (host scrub plus ssd rewrite)", {}),
}
_TRANSPORT_BYTES = re.compile(r"^(?P<transport>[a-z0-9]+)_bytes_(?P<direction>in|out)$")
_ERRORS = re.compile(r"^errors_(?P<code>[a-z_]+)$")
_TIERS = {pb.TIER_HOST: "host", pb.TIER_SSD: "ssd"}

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def classify(counter: str) -> tuple[str, str, dict[str, str]]:
    """Which metric family and labels a store counter belongs to; unknown ones stay visible as events."""
    if counter in STORE_COUNTERS:
        return STORE_COUNTERS[counter]
    if m := _TRANSPORT_BYTES.match(counter):
        return ("kvstore_transport_bytes", "Payload bytes moved, by transport and direction", m.groupdict())
    if m := _ERRORS.match(counter):
        return ("kvstore_request_errors", "Requests refused by the store, by gRPC status code", m.groupdict())
    return ("kvstore_store_events", "Other store events, by name", {"event": counter})


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
        families: dict[str, CounterMetricFamily] = {}
        counts = {**dict.fromkeys(STORE_COUNTERS, 0), **s["counters"]}  # known counters show from the start, at 0
        for counter, value in sorted(counts.items()):
            name, doc, labels = classify(counter)
            family = families.setdefault(name, CounterMetricFamily(name, doc, labels=list(labels)))
            family.add_metric(list(labels.values()), value)
        yield from families.values()
        gauges = {
            "capacity": GaugeMetricFamily("kvstore_tier_capacity_bytes", "Bytes a tier may hold", labels=["tier"]),
            "used": GaugeMetricFamily("kvstore_tier_used_bytes", "Bytes a tier holds now (host: slot bytes; ssd: payload bytes)", labels=["tier"]),
            "blocks": GaugeMetricFamily("kvstore_tier_blocks", "Blocks with a copy in a tier", labels=["tier"]),
        }
        for tier, capacity, used, blocks in s["tiers"]:
            label = [_TIERS.get(tier, str(tier))]
            gauges["capacity"].add_metric(label, capacity)
            gauges["used"].add_metric(label, used)
            gauges["blocks"].add_metric(label, blocks)
        yield from gauges.values()
        yield GaugeMetricFamily("kvstore_blocks", "Blocks in the store", value=s["blocks"])
        yield GaugeMetricFamily("kvstore_leases_held", "Write leases held now", value=s["leases_held"])
        yield GaugeMetricFamily("kvstore_pins_held", "Read pins held now", value=s["pins_held"])
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

    def _observe(self, service: str, method: str, started: float, code: str) -> None:
        self.latency.labels(service, method).observe(time.perf_counter() - started)
        self.requests.labels(service, method, code).inc()

    def observe_local(self, service: str, method: str, started: float, code: str) -> None:
        self._observe(service, method, started, code)
        self.local_requests.labels(method, code).inc()

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
