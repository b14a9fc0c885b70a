"""/metrics over HTTP after a scripted workload: every counter matches the workload exactly."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError
from kvwire.types import PutOutcome
from tests.kvstore.admin_util import admin_json, patterned_blocks
from tests.serverproc import free_port


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


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
