"""The core's round-trip, prefix-lookup and lease behaviour over every transport (grpc, shm, ucx), byte-exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError, ChecksumMismatchError, InvalidRequestError, UnavailableError
from kvwire.types import BlockState, LeaseOutcome, PutOutcome
from tests.kvclient.transport_util import TRANSPORTS, UCX_SERVER_ENV, eventually, map_pool, random_blocks, tokens
from tests.serverproc import ServerProc

BLOCK = 64 << 10


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("dataplane") / "data", flags={"host_memory": "512MiB", "ssd_capacity": "2GiB", "lease_ttl_s": 2}, env=UCX_SERVER_ENV)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


def client_for(srv, fingerprint, transport: str, tenant: str) -> KVClient:
    return KVClient(srv.address, fingerprint, tenant=f"{tenant}-{transport}", transport=transport)


def test_round_trip_and_prefix_lookup(dp_server, fingerprint, transport):
    with client_for(dp_server, fingerprint, transport, "rt") as client:
        assert client.stats()["client"]["transport"] == transport
        keys = client.block_keys(tokens(300))
        blocks = random_blocks(300, BLOCK)
        assert set(client.put(keys, blocks)) == {PutOutcome.STORED}
        got = client.get(keys)
        assert all(np.array_equal(a, b) for a, b in zip(got, blocks))
        assert client.lookup(keys) == 300
        longer = client.block_keys(tokens(310))
        assert client.lookup(longer) == 300
        client.delete([keys[150]])
        assert client.lookup(keys) == 150
        assert client.contains(keys[149:152]) == [True, False, True]
        assert client.put(keys[149:151], blocks[149:151]) == [PutOutcome.ALREADY_PRESENT, PutOutcome.STORED]
        with pytest.raises(BlockNotFoundError, match="1 of 2 blocks not found"):
            client.get([keys[0], client.block_keys(tokens(400))[399]])


@pytest.mark.parametrize("size", [1, 4097, 1 << 20, 4 << 20])
def test_sizes_byte_exact_into_caller_buffers(dp_server, fingerprint, transport, size):
    with client_for(dp_server, fingerprint, transport, f"sz{size}") as client:
        keys = client.block_keys(tokens(3, start=10_000))
        t = torch.from_numpy(random_blocks(1, size, seed=1)[0].copy())
        arr = random_blocks(1, size, seed=2)[0]
        raw = bytes(random_blocks(1, size, seed=3)[0])
        assert client.put(keys, [t, arr, raw]) == [PutOutcome.STORED] * 3
        out_t, out_a, out_r = torch.empty_like(t), np.empty_like(arr), bytearray(size)
        got = client.get(keys, out=[out_t, out_a, out_r])
        assert torch.equal(out_t, t) and np.array_equal(out_a, arr) and bytes(out_r) == raw
        assert np.shares_memory(got[1], out_a)
        with pytest.raises(InvalidRequestError, match="holds"):
            client.get(keys[:1], out=[bytearray(size + 1)])


def test_leases_over_transport(dp_server, fingerprint, transport):
    with client_for(dp_server, fingerprint, transport, "lease") as a, client_for(dp_server, fingerprint, transport, "lease") as b:
        keys = a.block_keys(tokens(2, start=20_000))
        assert [l.outcome for l in a.acquire(keys)] == [LeaseOutcome.GRANTED] * 2
        assert [l.outcome for l in b.acquire(keys)] == [LeaseOutcome.PENDING] * 2
        assert b.put(keys, random_blocks(2, BLOCK)) == [PutOutcome.PENDING_ELSEWHERE] * 2
        block = random_blocks(1, BLOCK, seed=9)
        assert a.put(keys[:1], block) == [PutOutcome.STORED]
        assert a.release(keys[1:]) == 1
        assert b.wait(keys, timeout_s=2) == [BlockState.PRESENT, BlockState.MISSING]
        assert np.array_equal(b.get(keys[:1])[0], block[0])


def test_batch_costs_constant_control_round_trips(dp_server, fingerprint, transport):
    with client_for(dp_server, fingerprint, transport, "batch") as client:
        rpcs = []
        for n in (1, 64):
            keys = client.block_keys(tokens(n, start=30_000 + 1000 * n))
            client.put(keys, random_blocks(n, BLOCK))
            put_rpcs = client.last_transfer.control_rpcs
            client.get(keys)
            rpcs.append((put_rpcs, client.last_transfer.control_rpcs))
        assert rpcs[0] == rpcs[1]
        assert max(rpcs[1]) <= 2


def test_transfer_telemetry_attributes_time(dp_server, fingerprint, transport):
    with client_for(dp_server, fingerprint, transport, "tele") as client:
        keys = client.block_keys(tokens(8, start=40_000))
        client.put(keys, random_blocks(8, 1 << 20))
        client.get(keys)
        s = client.last_transfer
        assert s.bytes == 8 << 20 and s.blocks == 8
        assert s.transfer_s > 0 and (s.validate_s > 0 or s.extra.get("checked_in_copy"))  # shm hashes in its copy's pass
        assert s.control_rpcs >= 1
        if transport != "grpc":
            assert s.control_s > 0
        if transport == "ucx":
            assert s.queue_s > 0


def test_corrupted_block_raises_and_releases_pin(dp_server, fingerprint, transport):
    with client_for(dp_server, fingerprint, transport, "corrupt") as client:
        keys = client.block_keys(tokens(2, start=50_000))
        client.put(keys, random_blocks(2, BLOCK))
        pin = client.control.pin(client.fingerprint_id, [keys[1].digest])
        client.control.unpin([pin.pin_id])
        info = client.control.data_plane()
        pool = map_pool(info.shm_name)
        offset = pin.offsets[0]
        pool[offset + 100] ^= 0xFF
        out = [np.zeros(BLOCK, np.uint8), np.zeros(BLOCK, np.uint8)]
        with pytest.raises(ChecksumMismatchError, match=keys[1].hex()):
            client.get(keys, out=out)
        eventually(lambda: client.stats()["pins_held"] == 0)  # UCX: the server unpins once its sends fail
        pool[offset + 100] ^= 0xFF
        assert np.array_equal(client.get(keys[1:])[0], pool[offset : offset + BLOCK])


def test_auto_picks_shm_on_same_host_and_falls_back_visibly(dp_server, make_server, fingerprint):
    with KVClient(dp_server.address, fingerprint) as client:
        assert client.stats()["client"] == {"transport": "shm", "transport_requested": "auto", "transport_fallbacks": [], "control": "local", "control_fallback": ""}
    bare = make_server("bare", shm=False, ucx=False)
    with KVClient(bare.address, fingerprint) as client:
        info = client.stats()["client"]
        assert info["transport"] == "grpc"
        assert [f.split(":")[0] for f in info["transport_fallbacks"]] == ["shm", "ucx"]
        keys = client.block_keys(tokens(4))
        blocks = random_blocks(4, BLOCK)
        client.put(keys, blocks)
        assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks))
    with pytest.raises(UnavailableError, match="shared-memory"):
        KVClient(bare.address, fingerprint, transport="shm")
    with pytest.raises(UnavailableError, match="UCX"):
        KVClient(bare.address, fingerprint, transport="ucx")
    with pytest.raises(InvalidRequestError, match="transport must be"):
        KVClient(bare.address, fingerprint, transport="carrier-pigeon")
