"""KVClient against a real `kvstore serve` process: round trips, prefix lookup, fingerprints, errors."""
from __future__ import annotations

import dataclasses
import time

import grpc
import numpy as np
import pytest
import torch
import xxhash

from kvclient import KVClient
from kvclient.errors import (
    BlockNotFoundError,
    BlockTooLargeError,
    ChecksumMismatchError,
    FingerprintMismatchError,
    InvalidRequestError,
    KVStoreError,
    LeaseError,
)
from kvwire.keys import BlockKey
from kvwire.types import BlockState, LeaseOutcome, PutOutcome
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc

BLOCK = 64 << 10


def random_blocks(n: int, size: int = BLOCK, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def tokens(n_blocks: int, start: int = 0, block_tokens: int = 16) -> list[int]:
    return list(range(start, start + n_blocks * block_tokens))


def test_thousand_64k_blocks_round_trip_and_prefix_lookup(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-roundtrip") as client:
        keys = client.block_keys(tokens(1000))
        blocks = random_blocks(1000)
        assert set(client.put(keys, blocks)) == {PutOutcome.STORED}
        got = client.get(keys)
        assert len(got) == 1000
        assert all(np.array_equal(a, b) for a, b in zip(got, blocks))
        assert client.lookup(keys) == 1000

        longer = client.block_keys(tokens(1010))
        assert longer[:1000] == keys
        assert client.lookup(longer) == 1000
        # A hole in the chain ends the prefix, even though later blocks exist.
        client.delete([keys[500]])
        assert client.lookup(keys) == 500
        assert client.contains(keys[499:502]) == [True, False, True]
        # Storing again reports what was already there.
        assert client.put(keys[499:501], blocks[499:501]) == [PutOutcome.ALREADY_PRESENT, PutOutcome.STORED]


def test_fingerprint_differing_only_in_dtype_gets_no_hits(server, fingerprint):
    other = dataclasses.replace(fingerprint, dtype="bfloat16")
    toks = tokens(20, start=10_000)
    with KVClient(server.address, fingerprint, tenant="t-fp") as a, KVClient(server.address, other, tenant="t-fp") as b:
        a.put(a.block_keys(toks), random_blocks(20))
        assert a.lookup(a.block_keys(toks)) == 20
        assert b.lookup(b.block_keys(toks)) == 0
        assert b.contains(b.block_keys(toks)) == [False] * 20
        # Even the exact keys of the other fingerprint are refused, never returned.
        with pytest.raises(FingerprintMismatchError, match="fingerprint"):
            b.get(a.block_keys(toks)[:1])
        assert b.lookup(a.block_keys(toks)) == 0


def test_buffers_numpy_torch_bytes_and_out(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-buffers") as client:
        keys = client.block_keys(tokens(3, start=50_000))
        t = torch.arange(BLOCK // 2, dtype=torch.float16)
        arr = np.arange(BLOCK // 4, dtype=np.float32)
        raw = bytes(range(256)) * (BLOCK // 256)
        client.put(keys, [t, arr, raw])
        out_t = torch.empty_like(t)
        out_a = np.empty_like(arr)
        out_r = bytearray(len(raw))
        client.get(keys, out=[out_t, out_a, out_r])
        assert torch.equal(out_t, t)
        assert np.array_equal(out_a, arr)
        assert bytes(out_r) == raw
        with pytest.raises(InvalidRequestError, match="holds"):
            client.get(keys[:1], out=[bytearray(10)])


def test_large_blocks_use_two_phase_put_over_grpc(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-large", transport="grpc") as client:
        keys = client.block_keys(tokens(3, start=70_000))
        blocks = random_blocks(3, size=4 << 20, seed=3)
        before = client.stats()["counters"].get("lease_grants", 0)
        assert client.put(keys, blocks) == [PutOutcome.STORED] * 3
        assert client.last_transfer.control_rpcs == 3  # Reserve, Write, Commit for the whole batch
        assert client.stats()["counters"]["lease_grants"] - before == 3
        assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks))


def test_missing_key_raises_clear_error(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-missing") as client:
        keys = client.block_keys(tokens(2, start=90_000))
        client.put(keys[:1], random_blocks(1))
        with pytest.raises(BlockNotFoundError, match=f"1 of 2 blocks not found: {keys[1].hex()}"):
            client.get(keys)


def test_oversize_block_refused_and_nothing_damaged(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-oversize") as client:
        keys = client.block_keys(tokens(2, start=95_000))
        client.put(keys[:1], random_blocks(1))
        with pytest.raises(BlockTooLargeError, match="max_block_bytes"):
            client.put(keys[1:], [np.zeros((16 << 20) + 1, np.uint8)])
        assert client.contains(keys) == [True, False]
        assert client.get(keys[:1])[0].size == BLOCK


def _raw_stub(server):
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.KVStoreStub(channel)


def test_malformed_requests_get_specific_status(server, fingerprint):
    channel, stub = _raw_stub(server)
    md = (("kvstore-tenant", "t-raw"), ("kvstore-client-id", "raw"))
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(pb.LookupRequest(fingerprint_id=b"short", keys=[]), metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fingerprint_id must be 16 bytes" in err.value.details()

        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(pb.LookupRequest(fingerprint_id=fingerprint.id, keys=[b"x" * 15]), metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "key #0" in err.value.details()

        key = BlockKey(b"k" * 16)
        data = b"payload" * 100
        bad = pb.InlineBlock(key=key.digest, data=data, checksum=xxhash.xxh3_64_intdigest(data) ^ 1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Put(pb.PutRequest(fingerprint_id=fingerprint.id, blocks=[bad]), metadata=md)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS and "checksum" in err.value.details()

        # Two-phase: a commit whose checksum does not match the written bytes is refused.
        resv = stub.Reserve(pb.ReserveRequest(fingerprint_id=fingerprint.id, blocks=[pb.BlockSpec(key=key.digest, size_bytes=len(data))]), metadata=md)
        lease_id = resv.leases[0].lease_id
        stub.Write(iter([pb.WriteChunk(lease_id=lease_id, offset=0, data=data)]), metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            stub.Commit(pb.CommitRequest(fingerprint_id=fingerprint.id, items=[pb.CommitItem(lease_id=lease_id, checksum=1)]), metadata=md)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        # Writing past the reservation is refused.
        with pytest.raises(grpc.RpcError) as err:
            stub.Write(iter([pb.WriteChunk(lease_id=lease_id, offset=len(data) - 1, data=b"xx")]), metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the reserved" in err.value.details()
        # A non-owner cannot commit.
        other = (("kvstore-tenant", "t-raw"), ("kvstore-client-id", "intruder"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Commit(pb.CommitRequest(fingerprint_id=fingerprint.id, items=[pb.CommitItem(lease_id=lease_id, checksum=xxhash.xxh3_64_intdigest(data))]), metadata=other)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a live lease of this client" in err.value.details()
        assert "raw" not in err.value.details()  # the holder's client id is nobody else's business
        # The rightful commit still works: nothing was damaged by the bad requests.
        ok = stub.Commit(pb.CommitRequest(fingerprint_id=fingerprint.id, items=[pb.CommitItem(lease_id=lease_id, checksum=xxhash.xxh3_64_intdigest(data))]), metadata=md)
        assert list(ok.outcomes) == [pb.PUT_STORED]
        pieces = [p for r in stub.Get(pb.GetRequest(fingerprint_id=fingerprint.id, keys=[key.digest]), metadata=md) for p in r.pieces]
        assert b"".join(p.data for p in pieces) == data


def test_errors_map_back_to_types(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-types") as client:
        with pytest.raises(LeaseError):
            client.control.commit(fingerprint.id, [987654], [0])
        with pytest.raises(KVStoreError):
            client.put(client.block_keys(tokens(1)), [])


def test_acquire_then_put_and_release(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-acq") as a, KVClient(server.address, fingerprint, tenant="t-acq") as b:
        keys = a.block_keys(tokens(2, start=120_000))
        assert [l.outcome for l in a.acquire(keys)] == [LeaseOutcome.GRANTED] * 2
        pending = b.acquire(keys)
        assert [l.outcome for l in pending] == [LeaseOutcome.PENDING] * 2
        assert pending[0].owner == a.client_id
        assert b.put(keys, random_blocks(2)) == [PutOutcome.PENDING_ELSEWHERE] * 2
        assert b.wait(keys, timeout_s=0.2) == [BlockState.PENDING] * 2
        assert a.put(keys[:1], random_blocks(1)) == [PutOutcome.STORED]
        assert a.release(keys[1:]) == 1
        # Released lease: the waiter is told the block is missing and may compute it itself.
        assert b.wait(keys, timeout_s=2) == [BlockState.PRESENT, BlockState.MISSING]
        assert [l.outcome for l in b.acquire(keys)] == [LeaseOutcome.ALREADY_PRESENT, LeaseOutcome.GRANTED]


def test_a_writer_given_the_leaseholders_client_id_writes_the_leased_block(server, fingerprint):
    """vLLM's scheduler leases, its worker (another process) writes: the writer speaks as the leaseholder."""
    with KVClient(server.address, fingerprint, tenant="t-id") as scheduler, \
            KVClient(server.address, fingerprint, tenant="t-id") as stranger, \
            KVClient(server.address, fingerprint, tenant="t-id", client_id=scheduler.client_id) as worker:
        keys = scheduler.block_keys(tokens(2, start=125_000))
        assert [l.outcome for l in scheduler.acquire(keys)] == [LeaseOutcome.GRANTED] * 2
        assert worker.client_id == scheduler.client_id
        assert stranger.put(keys, random_blocks(2)) == [PutOutcome.PENDING_ELSEWHERE] * 2
        assert worker.put(keys, random_blocks(2)) == [PutOutcome.STORED] * 2


def test_kept_leases_outlive_their_ttl_and_lapse_once_no_longer_kept(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="t-keep") as a, KVClient(server.address, fingerprint, tenant="t-keep") as b:
        kept, unkept = a.block_keys(tokens(2, start=130_000)), a.block_keys(tokens(1, start=140_000))
        assert [l.outcome for l in a.acquire(kept + unkept, ttl_s=1.5)] == [LeaseOutcome.GRANTED] * 3
        with a.keep_leases(kept, ttl_s=1.5) as keeper:  # renews every 0.5 s: slack for a loaded CI box
            time.sleep(4.0)  # 2.7 TTLs
            assert [l.outcome for l in b.acquire(kept)] == [LeaseOutcome.PENDING] * 2
            assert [l.outcome for l in b.acquire(unkept)] == [LeaseOutcome.GRANTED]  # lapsed: nobody renewed it
        assert keeper.renewals >= 3
        time.sleep(2.0)
        assert [l.outcome for l in b.acquire(kept)] == [LeaseOutcome.GRANTED] * 2
