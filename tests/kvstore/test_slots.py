"""Host pool slots between tenants: a freed slot carries nothing of its last block, Commit is no
checksum oracle, a writer that outlived its lease cannot touch the next writer's block, and a pool
with more block sizes than slabs still finds room.

Raw gRPC where the client library hides the steps (Reserve, Write, Commit are one call each).
"""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest
import xxhash

from kvclient import KVClient
from kvclient.errors import LeaseError
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import eventually, map_pool
from tests.kvstore.admin_util import auth_flags, patterned_blocks

FP = make_fingerprint()
ALICE, BOB = "alice-secret", "bob-secret"


def crc(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


def new_key() -> bytes:
    return os.urandom(16)


class Tenant:
    """One tenant's raw gRPC calls, authenticated by its bearer token."""

    def __init__(self, srv, token: str, client_id: str = "") -> None:
        self.channel = grpc.insecure_channel(srv.address)
        self.stub = pb_grpc.KVStoreStub(self.channel)
        self.md = (("authorization", f"Bearer {token}"), ("kvstore-client-id", client_id or token))

    def __enter__(self) -> "Tenant":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def reserve(self, specs: list[tuple[bytes, int]], ttl_ms: int = 0) -> list[pb.Lease]:
        blocks = [pb.BlockSpec(key=k, size_bytes=n) for k, n in specs]
        return list(self.stub.Reserve(pb.ReserveRequest(fingerprint_id=FP.id, blocks=blocks, ttl_ms=ttl_ms), metadata=self.md).leases)

    def write(self, lease: pb.Lease, data: bytes) -> None:
        self.stub.Write(iter([pb.WriteChunk(lease_id=lease.lease_id, offset=0, data=data)]), metadata=self.md)

    def commit(self, lease: pb.Lease, checksum: int) -> int:
        items = [pb.CommitItem(lease_id=lease.lease_id, checksum=checksum)]
        return self.stub.Commit(pb.CommitRequest(fingerprint_id=FP.id, items=items), metadata=self.md).outcomes[0]

    def put(self, key: bytes, data: bytes) -> None:
        block = pb.InlineBlock(key=key, data=data, checksum=crc(data))
        assert self.stub.Put(pb.PutRequest(fingerprint_id=FP.id, blocks=[block]), metadata=self.md).outcomes == [pb.PUT_STORED]

    def get(self, key: bytes) -> bytes:
        return b"".join(p.data for r in self.stub.Get(pb.GetRequest(fingerprint_id=FP.id, keys=[key]), metadata=self.md) for p in r.pieces)

    def offsets(self, keys: list[bytes]) -> list[int]:
        """Where the blocks sit in the pool now (a pin, dropped at once)."""
        pin = self.stub.Pin(pb.PinRequest(fingerprint_id=FP.id, keys=keys), metadata=self.md)
        self.stub.Unpin(pb.UnpinRequest(pin_ids=[pin.pin_id]), metadata=self.md)
        return list(pin.offsets)

    def tiers(self, keys: list[bytes]) -> list[int]:
        return [s.tier for s in self.stub.Lookup(pb.LookupRequest(fingerprint_id=FP.id, keys=keys), metadata=self.md).statuses]

    def shm_name(self) -> str:
        return self.stub.DataPlane(pb.DataPlaneRequest(), metadata=self.md).shm_name


def assert_no_oracle_and_zeroed(alice: Tenant, lease: pb.Lease, secret: bytes) -> None:
    """Commit with a wrong checksum says nothing of the slot's bytes; the slot holds zeros, not the secret."""
    with pytest.raises(grpc.RpcError) as err:
        alice.commit(lease, 0)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    message = err.value.details()
    assert "0x" not in message and f"{crc(secret):x}" not in message and f"{crc(bytes(len(secret))):x}" not in message, message
    assert alice.commit(lease, crc(bytes(len(secret)))) == pb.PUT_STORED  # nobody wrote it: zeros
    assert alice.get(lease.key) == bytes(len(secret))


def test_a_deleted_blocks_slot_reaches_the_next_tenant_zeroed(make_server, tmp_path):
    srv = make_server(**auth_flags(tmp_path, host_memory="16MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False))
    secret = patterned_blocks(1, 100_000, seed=1)[0].tobytes()
    with Tenant(srv, BOB) as bob, Tenant(srv, ALICE) as alice:
        kb = new_key()
        bob.put(kb, secret)
        [offset] = bob.offsets([kb])
        assert bob.stub.Delete(pb.DeleteRequest(fingerprint_id=FP.id, keys=[kb]), metadata=bob.md).deleted == 1
        [lease] = alice.reserve([(new_key(), len(secret))])
        assert lease.slot.offset == offset  # the attack's premise: the freed slot is handed out again
        assert_no_oracle_and_zeroed(alice, lease, secret)


def test_a_demoted_blocks_slot_reaches_the_next_tenant_zeroed(make_server, tmp_path):
    # 16 slabs of 1 MiB, one block each: 15 blocks pass the 90% watermark and the demoter frees four.
    srv = make_server(**auth_flags(tmp_path, host_memory="16MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False))
    size = (1 << 20) - 4096
    secrets = [b.tobytes() for b in patterned_blocks(15, size, seed=2)]
    with Tenant(srv, BOB) as bob, Tenant(srv, ALICE) as alice:
        keys = [new_key() for _ in secrets]
        offsets = {}
        for key, secret in zip(keys, secrets):
            bob.put(key, secret)
            offsets[key] = bob.offsets([key])[0]
        eventually(lambda: pb.TIER_SSD in bob.tiers(keys))
        time.sleep(0.2)  # the demoter frees its victims' slots after writing them all
        demoted = {offsets[k]: s for k, s, t in zip(keys, secrets, bob.tiers(keys)) if t == pb.TIER_SSD}
        [lease] = alice.reserve([(new_key(), size)])
        assert lease.slot.offset in demoted  # the attack's premise: a demoted block's slot is handed out again
        assert_no_oracle_and_zeroed(alice, lease, demoted[lease.slot.offset])


def test_a_writer_that_outlived_its_lease_cannot_overwrite_the_next_writers_block(make_server, tmp_path):
    srv = make_server(**auth_flags(tmp_path, host_memory="16MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False,
                                   stale_write_quarantine_s=30))
    size = 300_000
    with Tenant(srv, BOB, "stale-writer") as x, Tenant(srv, ALICE, "next-writer") as y:
        pool = map_pool(x.shm_name())  # as the shm transport maps it
        [stale] = x.reserve([(new_key(), size)], ttl_ms=100)
        time.sleep(0.4)  # expired, and reaped by the server's worker (every 50 ms)
        [lease] = y.reserve([(new_key(), size)])
        block = patterned_blocks(1, size, seed=3)[0].tobytes()
        y.write(lease, block)
        assert y.commit(lease, crc(block)) == pb.PUT_STORED
        pool[stale.slot.offset : stale.slot.offset + size] = 0xAB  # the stale writer copies its block at last
        assert y.get(lease.key) == block
        assert crc(pool[lease.slot.offset : lease.slot.offset + size]) == crc(block)


def test_a_quarantined_slot_comes_back_zeroed(make_server, tmp_path):
    srv = make_server(**auth_flags(tmp_path, host_memory="16MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False,
                                   stale_write_quarantine_s=0.5))
    size = (1 << 20) - 4096  # one slot a slab: the slot freed last is the one handed out next
    with Tenant(srv, BOB, "stale-writer") as x, Tenant(srv, ALICE, "next-writer") as y:
        pool = map_pool(x.shm_name())
        [stale] = x.reserve([(new_key(), size)], ttl_ms=100)
        time.sleep(0.3)
        pool[stale.slot.offset : stale.slot.offset + size] = 0xAB  # after expiry, inside the quarantine
        time.sleep(0.6)  # the quarantine ends; the slot goes back to the free list, zeroed
        [lease] = y.reserve([(new_key(), size)])
        assert lease.slot.offset == stale.slot.offset
        assert y.commit(lease, crc(bytes(size))) == pb.PUT_STORED


def test_quarantined_slots_still_count_against_their_tenant(make_server, tmp_path):
    # Else reserving and letting leases lapse would park the whole pool in quarantine, out of everyone's reach.
    srv = make_server(**auth_flags(tmp_path, host_memory="16MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False,
                                   stale_write_quarantine_s=30, tenant_held_fraction=0.5))
    size = (1 << 20) - 4096
    with Tenant(srv, BOB) as bob, Tenant(srv, ALICE) as alice:
        assert len(bob.reserve([(new_key(), size) for _ in range(7)], ttl_ms=100)) == 7
        time.sleep(0.4)  # expired and quarantined
        with pytest.raises(grpc.RpcError) as err:
            bob.reserve([(new_key(), size) for _ in range(7)])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(l.outcome == pb.LEASE_GRANTED for l in alice.reserve([(new_key(), size) for _ in range(7)]))


@pytest.mark.parametrize("lease_ttl_s", [0.05, 2])
def test_the_shm_writer_refuses_a_slot_whose_lease_ends_before_it_could_copy(make_server, tmp_path, lease_ttl_s):
    srv = make_server(**auth_flags(tmp_path, host_memory="16MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False,
                                   lease_ttl_s=lease_ttl_s))
    blocks = patterned_blocks(2, 100_000, seed=4)
    with KVClient(srv.address, FP, token=BOB, transport="shm") as client:
        assert client.transport_choice.chosen == "shm"
        keys = client.block_keys(range(32))
        if lease_ttl_s >= 1:  # the control: a lease with time left is written as ever
            client.put(keys, blocks)
            assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks))
            return
        with pytest.raises(LeaseError):
            client.put(keys, blocks)  # every lease ends within the writer's margin
        assert client.lookup(keys) == 0
        statuses, _ = client.status(keys)
        assert all(s.state.name != "PENDING" for s in statuses)  # the leases were given back


# ---- more block sizes than slabs -------------------------------------------------------


def pool_flags(tmp_path) -> dict:
    # 4 slabs of 1 MiB and 8 size classes (4 KiB .. 512 KiB)
    return auth_flags(tmp_path, host_memory="4MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False)


def test_more_sizes_than_slabs_share_slots_of_larger_classes(make_server, tmp_path):
    srv = make_server(**pool_flags(tmp_path))
    sizes = [256 << 10, 128 << 10, 64 << 10, 32 << 10, 16 << 10, 8 << 10, 4 << 10, 3000]  # largest first: each has a larger class
    with Tenant(srv, ALICE) as alice:
        leases = alice.reserve([(new_key(), n) for n in sizes])
        assert [l.outcome for l in leases] == [pb.LEASE_GRANTED] * len(sizes)
        spans = sorted((l.slot.offset, l.slot.offset + l.slot.length) for l in leases)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        blocks = patterned_blocks(len(sizes), max(sizes), seed=5)
        for lease, block, n in zip(leases, blocks, sizes):
            alice.write(lease, block[:n].tobytes())
            assert alice.commit(lease, crc(block[:n])) == pb.PUT_STORED
        for lease, block, n in zip(leases, blocks, sizes):
            assert alice.get(lease.key) == block[:n].tobytes()


def test_a_refusal_says_the_pool_is_fragmented_not_pinned(make_server, tmp_path):
    srv = make_server(**pool_flags(tmp_path))
    sizes = [4 << 10, 8 << 10, 16 << 10, 32 << 10]  # smallest first: one slab each, none larger to share
    with Tenant(srv, ALICE) as alice:
        assert all(l.outcome == pb.LEASE_GRANTED for l in alice.reserve([(new_key(), n) for n in sizes]))
        with pytest.raises(grpc.RpcError) as err:
            alice.reserve([(new_key(), 64 << 10)])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = err.value.details()
    assert "no free 65536-byte slot" in message and "free space is in smaller size classes" in message, message
    assert "pinned or reserved" in message and "bytes free" not in message, message  # no pool-wide numbers for a tenant


def test_room_for_a_new_size_class_costs_one_slab_not_the_cache(make_server, tmp_path):
    srv = make_server(**pool_flags(tmp_path))
    with KVClient(srv.address, FP, token=ALICE, transport="grpc") as client:
        old = client.block_keys(range(200 * 16))
        client.put(old, patterned_blocks(200, 4 << 10, seed=6))  # one slab of 4 KiB slots, least recently used
        newer = []
        for i, size in enumerate([8 << 10, 16 << 10, 32 << 10]):  # a slab each, one block in it
            keys = client.block_keys(range(10_000 + i * 16, 10_000 + (i + 1) * 16))
            client.put(keys, patterned_blocks(1, size, seed=7 + i))
            newer += keys
        big = client.block_keys(range(20_000, 20_016))
        client.put(big, patterned_blocks(1, 64 << 10, seed=10))  # a fifth class: a slab must be emptied
        statuses, _ = client.status(old + newer + big)
    on_host = [s.tier.name == "HOST" for s in statuses]
    assert on_host[-1]
    assert sum(on_host[: len(old)]) == len(old), "the 200 older blocks were evicted to empty one slab"
    assert sum(on_host[len(old) : -1]) == len(newer) - 1  # one single-block slab was emptied instead
