"""/metrics: over HTTP after a scripted workload every counter matches the workload exactly; in process,
every store event has one series and the names and labels dashboards read stay the same."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError
from kvstore.counters import Direction, Event, Transport, request_error, transport_bytes
from kvstore.metrics import EVENT_SERIES, StoreCollector
from kvstore.store import StoreStats, TierStats
from kvwire.errors import ERROR_TYPES
from kvwire.types import PutOutcome, Tier
from tests.kvstore.admin_util import admin_json, patterned_blocks, scrape
from tests.serverproc import free_port


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_metrics_match_a_scripted_workload(make_server, fingerprint, transport):
    port = free_port()
    srv = make_server(host_memory="32MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", metrics_port=port)
    before = scrape(port)
    assert before[("kvstore_blocks_stored_total", frozenset())] == 0  # known counters exist from the start
    small, large = patterned_blocks(8, 4096, 1), patterned_blocks(4, 12288, 2)
    with KVClient(srv.address, fingerprint, tenant="metrics", transport=transport) as client:
        keys = client.block_keys(list(range(12 * 16)))
        assert client.put(keys, small + large) == [PutOutcome.STORED] * 12  # Put #1
        assert client.put(keys[:2], small[:2]) == [PutOutcome.ALREADY_PRESENT] * 2  # Put #2: transport bytes only
        client.get(keys[:5])  # Get #1: 5 host hits
        with pytest.raises(BlockNotFoundError):
            client.get(client.block_keys(list(range(5000, 5016))))  # Get #2: 1 miss
        assert admin_json(srv, "evict", "--watermark", "0.0001", "--tier", "host", token=None)["demoted"] == 12  # insecure: local caller is admin
        got = client.get(keys[8:10])  # Get #3: 2 ssd hits, promoted back
        assert all(np.array_equal(a, b) for a, b in zip(got, large[:2]))
    m = scrape(port)

    def value(name: str, **labels: str) -> float:
        return m[(name, frozenset(labels.items()))]

    bytes_in = 8 * 4096 + 4 * 12288
    bytes_out = 5 * 4096 + 2 * 12288
    assert value("kvstore_blocks_stored_total") == 12
    assert value("kvstore_payload_bytes_total", direction="in") == bytes_in
    assert value("kvstore_payload_bytes_total", direction="out") == bytes_out
    assert value("kvstore_blocks_served_total") == 7
    assert value("kvstore_hits_total", tier="host") == 5
    assert value("kvstore_hits_total", tier="ssd") == 2
    assert value("kvstore_misses_total") == 1
    assert value("kvstore_lease_grants_total") == 12
    assert value("kvstore_demotions_total") == 12
    assert value("kvstore_promotions_total") == 2
    assert value("kvstore_evictions_total", reason="capacity") == 0
    assert value("kvstore_checksum_failures_total") == 0
    assert value("kvstore_request_errors_total", code="not_found") == 1

    assert value("kvstore_grpc_requests_total", service="kvstore.v1.Admin", method="Evict", code="OK") == 1
    if transport == "grpc":  # payload inside the RPCs: one Put per put call, one Get stream per get call
        assert value("kvstore_transport_bytes_total", transport="grpc", direction="in") == bytes_in + 2 * 4096
        assert value("kvstore_transport_bytes_total", transport="grpc", direction="out") == bytes_out
        rpc = {"service": "kvstore.v1.KVStore"}
        assert value("kvstore_grpc_requests_total", **rpc, method="Put", code="OK") == 2
        assert value("kvstore_grpc_requests_total", **rpc, method="Get", code="OK") == 2
        assert value("kvstore_grpc_requests_total", **rpc, method="Get", code="NOT_FOUND") == 1
        assert value("kvstore_grpc_request_duration_seconds_count", **rpc, method="Get") == 3
        assert value("kvstore_grpc_request_duration_seconds_bucket", **rpc, method="Put", le="+Inf") == 2

    assert value("kvstore_tier_blocks", tier="host") == 2
    assert value("kvstore_tier_blocks", tier="ssd") == 12
    assert value("kvstore_tier_used_bytes", tier="host") == 2 * 16384  # 12 KiB blocks take 16 KiB slots
    assert value("kvstore_tier_used_bytes", tier="ssd") == bytes_in
    assert value("kvstore_tier_capacity_bytes", tier="host") == 32 << 20
    assert value("kvstore_blocks") == 12


# ---- in process: the event table ------------------------------------------------------------------

# What each store counter has always been exported as (family with _total, labels). Dashboards read these.
EXPORTED_SERIES = {
    "puts": ("kvstore_blocks_stored_total", {}),
    "gets": ("kvstore_blocks_served_total", {}),
    "hits_host": ("kvstore_hits_total", {"tier": "host"}),
    "hits_ssd": ("kvstore_hits_total", {"tier": "ssd"}),
    "hits_hbm": ("kvstore_hits_total", {"tier": "hbm"}),
    "misses": ("kvstore_misses_total", {}),
    "bytes_in": ("kvstore_payload_bytes_total", {"direction": "in"}),
    "bytes_out": ("kvstore_payload_bytes_total", {"direction": "out"}),
    "lookup_blocks_hit": ("kvstore_lookup_blocks_total", {"result": "present"}),
    "lookup_blocks_miss": ("kvstore_lookup_blocks_total", {"result": "absent"}),
    "checksum_failures": ("kvstore_checksum_failures_total", {}),
    "lease_grants": ("kvstore_lease_grants_total", {}),
    "lease_waits": ("kvstore_lease_waits_total", {}),
    "lease_waits_abandoned": ("kvstore_store_events_total", {"event": "lease_waits_abandoned"}),
    "lease_expiries": ("kvstore_lease_expiries_total", {"kind": "write"}),
    "pin_expiries": ("kvstore_lease_expiries_total", {"kind": "pin"}),
    "lease_revocations": ("kvstore_lease_revocations_total", {"kind": "write"}),
    "pin_revocations": ("kvstore_lease_revocations_total", {"kind": "pin"}),
    "slots_quarantined": ("kvstore_store_events_total", {"event": "slots_quarantined"}),
    "demotions": ("kvstore_demotions_total", {}),
    "promotions": ("kvstore_promotions_total", {}),
    "host_evictions": ("kvstore_tier_evictions_total", {"tier": "host"}),
    "ssd_evictions": ("kvstore_tier_evictions_total", {"tier": "ssd"}),
    "evictions": ("kvstore_evictions_total", {"reason": "capacity"}),
    "admin_evictions": ("kvstore_evictions_total", {"reason": "admin"}),
    "admin_deletes": ("kvstore_admin_deleted_blocks_total", {}),
    "secure_deletes": ("kvstore_secure_deletes_total", {}),
    "hbm_promotions": ("kvstore_hbm_promotions_total", {}),
    "hbm_evictions": ("kvstore_tier_evictions_total", {"tier": "hbm"}),
    "hbm_verify_failures": ("kvstore_store_events_total", {"event": "hbm_verify_failures"}),
    "hbm_device_errors": ("kvstore_store_events_total", {"event": "hbm_device_errors"}),
    "ucx_pins_staged_off_loop": ("kvstore_store_events_total", {"event": "ucx_pins_staged_off_loop"}),
    "ucx_hbm_sends": ("kvstore_store_events_total", {"event": "ucx_hbm_sends"}),
    "cluster_joins": ("kvstore_cluster_events_total", {"event": "joins"}),
    "cluster_fences": ("kvstore_cluster_events_total", {"event": "fences"}),
    "cluster_view_changes": ("kvstore_cluster_events_total", {"event": "view_changes"}),
    "cluster_keepalive_failures": ("kvstore_cluster_events_total", {"event": "keepalive_failures"}),
    "tombstones_issued": ("kvstore_cluster_events_total", {"event": "tombstones_issued"}),
    "tombstones_applied": ("kvstore_cluster_events_total", {"event": "tombstones_applied"}),
    "cluster_ssd_wipes": ("kvstore_cluster_events_total", {"event": "ssd_wipes"}),
    **{f"cluster_{name}": ("kvstore_cluster_copies_total", {"event": name}) for name in (
        "copies_taken", "copy_bytes_taken", "copies_sent", "copy_bytes_sent", "copy_failures", "replica_pushes_dropped",
        "repair_keys", "spilled", "handed_off", "sole_copies_evicted")},
    "cluster_claims_granted": ("kvstore_cluster_events_total", {"event": "claims_granted"}),
    "cluster_claims_pending": ("kvstore_cluster_events_total", {"event": "claims_pending"}),
    "cluster_claims_local": ("kvstore_cluster_events_total", {"event": "claims_local"}),
    "remote_locate_found": ("kvstore_remote_locate_keys_total", {"result": "found"}),
    "remote_locate_absent": ("kvstore_remote_locate_keys_total", {"result": "absent"}),
    "remote_fetch_blocks": ("kvstore_remote_fetch_blocks_total", {}),
    "remote_fetch_bytes": ("kvstore_remote_fetch_bytes_total", {}),
    "remote_fetch_ucx_blocks": ("kvstore_remote_fetch_ucx_blocks_total", {}),
    "remote_fetches_complete": ("kvstore_remote_fetches_total", {"outcome": "complete"}),
    "remote_fetches_short": ("kvstore_remote_fetches_total", {"outcome": "short"}),
    "remote_locate_errors": ("kvstore_remote_fetch_errors_total", {"reason": "locate"}),
    "remote_fetch_failures": ("kvstore_remote_fetch_errors_total", {"reason": "transfer"}),
    "remote_fetch_not_found": ("kvstore_remote_fetch_errors_total", {"reason": "not_found"}),
    "remote_checksum_failures": ("kvstore_remote_fetch_errors_total", {"reason": "checksum"}),
    "remote_fetch_busy": ("kvstore_remote_fetch_errors_total", {"reason": "busy"}),
    "peer_served_blocks": ("kvstore_peer_served_blocks_total", {}),
    "peer_served_bytes": ("kvstore_peer_served_bytes_total", {}),
    "peer_served_not_found": ("kvstore_directory_events_total", {"event": "served_not_found"}),
    "peer_rejected_fenced": ("kvstore_peer_rejected_total", {"reason": "fenced"}),
    "peer_rejected_stale_view": ("kvstore_peer_rejected_total", {"reason": "stale_view"}),
    "peer_rejected_zombie": ("kvstore_peer_rejected_total", {"reason": "zombie"}),
    "peer_rejected_busy": ("kvstore_peer_rejected_total", {"reason": "busy"}),
    "peer_breaker_opens": ("kvstore_peer_breaker_events_total", {"event": "opened"}),
    "peer_calls_short_circuited": ("kvstore_peer_breaker_events_total", {"event": "short_circuited"}),
    **{f"directory_{name}": ("kvstore_directory_events_total", {"event": name}) for name in (
        "locates", "announces", "resyncs", "resyncs_requested", "repairs", "repairs_sent", "batches_sent", "resyncs_sent",
        "announce_failures", "rehomed", "commit_waits_expired", "hot_pushes", "hot_push_failures")},
    "grpc_bytes_in": ("kvstore_transport_bytes_total", {"transport": "grpc", "direction": "in"}),
    "grpc_bytes_out": ("kvstore_transport_bytes_total", {"transport": "grpc", "direction": "out"}),
    "ucx_bytes_in": ("kvstore_transport_bytes_total", {"transport": "ucx", "direction": "in"}),
    "ucx_bytes_out": ("kvstore_transport_bytes_total", {"transport": "ucx", "direction": "out"}),
    **{f"errors_{code}": ("kvstore_request_errors_total", {"code": code}) for code in (
        "invalid_argument", "failed_precondition", "not_found", "resource_exhausted", "data_loss", "unauthenticated",
        "permission_denied", "unavailable", "aborted", "deadline_exceeded", "internal", "unknown")},
}


class StatsOnly:
    """What StoreCollector reads of a Store: stats() and admitting."""

    admitting = True

    def __init__(self, counts: Counter, tiers=((Tier.HOST, 1 << 20, 4096, 1), (Tier.SSD, 1 << 30, 0, 0))) -> None:
        self.counts, self.tiers = counts, [TierStats(*t) for t in tiers]

    def stats(self) -> StoreStats:
        return StoreStats(tuple(self.tiers), blocks=1, leases_held=2, pins_held=3, counters=dict(self.counts))


def collected(store: StatsOnly) -> dict[tuple[str, frozenset], float]:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_event_maps_to_one_series_of_its_family():
    assert set(EVENT_SERIES) == set(Event)
    for event, (family, labels) in EVENT_SERIES.items():
        assert len(labels) == len(family.label_names), event
    series = [(family.name, labels) for family, labels in EVENT_SERIES.values()]
    assert len(set(series)) == len(series)  # no two events share a series


def test_exported_names_and_labels_are_unchanged():
    assert {e.value for e in Event} == set(EXPORTED_SERIES)
    counts = Counter({event: i + 1 for i, event in enumerate(Event)})
    m = collected(StatsOnly(counts))
    for event in Event:
        name, labels = EXPORTED_SERIES[event.value]
        assert m[(name, frozenset(labels.items()))] == counts[event], event
    counters = {key for key in m if key[0].endswith("_total")}
    assert counters == {(name, frozenset(labels.items())) for name, labels in EXPORTED_SERIES.values()}
    assert m[("kvstore_tier_used_bytes", frozenset({"tier": "host"}.items()))] == 4096
    assert m[("kvstore_tier_capacity_bytes", frozenset({"tier": "ssd"}.items()))] == 1 << 30
    assert (m[("kvstore_blocks", frozenset())], m[("kvstore_leases_held", frozenset())], m[("kvstore_pins_held", frozenset())]) == (1, 2, 3)
    assert m[("kvstore_draining", frozenset())] == 0


def test_string_keys_and_events_are_one_counter_and_untyped_names_still_show():
    counts = Counter()
    counts["puts"] += 2
    counts[Event.PUTS] += 1
    counts["errors_not_found"] += 1
    counts["not_an_event_yet"] += 5
    assert len(counts) == 3 and counts[Event.PUTS] == 3
    m = collected(StatsOnly(counts, tiers=[(2, 10, 1, 1), (3, 20, 2, 2)]))  # tiers as proto numbers, too
    assert m[("kvstore_blocks_stored_total", frozenset())] == 3
    assert m[("kvstore_request_errors_total", frozenset({"code": "not_found"}.items()))] == 1
    assert m[("kvstore_store_events_total", frozenset({"event": "not_an_event_yet"}.items()))] == 5
    assert m[("kvstore_tier_blocks", frozenset({"tier": "ssd"}.items()))] == 2


def test_labelled_events_come_from_typed_constructors():
    assert transport_bytes(Transport.UCX, Direction.OUT) is Event.UCX_BYTES_OUT
    assert transport_bytes("grpc", "in") is Event.GRPC_BYTES_IN
    with pytest.raises(ValueError):
        transport_bytes("shm", "in")  # shm moves bytes without the server
    for cls in ERROR_TYPES.values():  # every status a domain error carries has its own event
        assert request_error(cls.status) is not Event.ERRORS_UNKNOWN, cls
        assert request_error(cls.status) == f"errors_{cls.status.lower()}"
    assert request_error("NOT_A_STATUS") is Event.ERRORS_UNKNOWN
