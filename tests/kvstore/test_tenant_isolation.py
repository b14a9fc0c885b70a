"""A hostile tenant against leases, pins, quotas and request limits, over gRPC and the local control socket.

Each test is one defect a hostile-tenant campaign found (issue 11): a client id is only a name,
so ownership must be (token's tenant, client id); ids must not be guessable; errors must not
name another tenant's owners or fingerprints; one tenant must not be able to hold the whole pool,
block the store lock, or smuggle duplicate keys past the lease table.
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import xxhash

from tests.kvclient.local_stub import LocalControlStub
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.admin_util import ADMIN_TOKEN, admin_json, auth_flags, run_admin

pytestmark = pytest.mark.timeout(120)
BLOCK = 64 << 10
FP = xxhash.xxh3_128_digest(b"isolation-fingerprint")
OTHER_FP = xxhash.xxh3_128_digest(b"another-fingerprint")
SHARED_ID = "engine-0"  # both tenants pick the same client id: it must not matter


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(i.to_bytes(8, "little"))


def md(token: str, client_id: str = SHARED_ID) -> tuple:
    return (("authorization", f"Bearer {token}"), ("kvstore-client-id", client_id))


ALICE, BOB = md("alice-secret"), md("bob-secret")


@pytest.fixture
def srv(make_server, tmp_path):
    return make_server(**auth_flags(tmp_path, host_memory="32MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", lease_ttl_s=30))


@pytest.fixture(params=["grpc", "local"])
def stub(request, srv):
    channel = grpc.insecure_channel(srv.address)
    grpc_stub = pb_grpc.KVStoreStub(channel)
    yield grpc_stub if request.param == "grpc" else LocalControlStub(str(srv.data_dir / "control.sock"), grpc_stub)
    channel.close()


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def put_block(stub: pb_grpc.KVStoreStub, meta, k: bytes, data: bytes) -> None:
    response = stub.Put(pb.PutRequest(fingerprint_id=FP, blocks=[pb.InlineBlock(key=k, data=data, checksum=xxhash.xxh3_64_intdigest(data))]), metadata=meta, timeout=10)
    assert list(response.outcomes) == [pb.PUT_STORED]


def write(stub: pb_grpc.KVStoreStub, meta, lease_id: int, data: bytes):
    """Write is client-streaming, which only gRPC carries."""
    return stub.Write(iter([pb.WriteChunk(lease_id=lease_id, offset=0, data=data)]), metadata=meta, timeout=10)


def test_same_client_id_in_another_tenant_owns_nothing(srv, stub):
    """Alice names Bob's client id and Bob's lease and pin ids: she can write, commit, renew, release or
    unpin none of them, and no answer names Bob's tenant, client id or fingerprint."""
    k = key(1)
    (lease,) = stub.Reserve(pb.ReserveRequest(fingerprint_id=FP, blocks=[pb.BlockSpec(key=k, size_bytes=BLOCK)]), metadata=BOB, timeout=10).leases
    assert lease.outcome == pb.LEASE_GRANTED
    bob_id = lease.lease_id

    grpc_stub = pb_grpc.KVStoreStub(grpc.insecure_channel(srv.address))
    attempts = {
        "write": lambda: write(grpc_stub, ALICE, bob_id, b"A" * BLOCK),
        "commit": lambda: stub.Commit(pb.CommitRequest(fingerprint_id=FP, items=[pb.CommitItem(lease_id=bob_id, checksum=1)]), metadata=ALICE, timeout=10),
        "commit-other-fp": lambda: stub.Commit(pb.CommitRequest(fingerprint_id=OTHER_FP, items=[pb.CommitItem(lease_id=bob_id, checksum=1)]), metadata=ALICE, timeout=10),
        "renew": lambda: stub.RenewLeases(pb.RenewLeasesRequest(lease_ids=[bob_id]), metadata=ALICE, timeout=10),
    }
    for name, call in attempts.items():
        err = failure(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, err.details())
        for secret in ("bob", SHARED_ID, FP.hex(), OTHER_FP.hex()):
            assert secret not in err.details(), (name, err.details())
    assert stub.ReleaseLeases(pb.ReleaseLeasesRequest(lease_ids=[bob_id]), metadata=ALICE, timeout=10).released == 0

    # Bob's lease is intact: his bytes, his commit, his block.
    data = bytes(range(256)) * (BLOCK // 256)
    write(grpc_stub, BOB, bob_id, data)
    outcome = stub.Commit(pb.CommitRequest(fingerprint_id=FP, items=[pb.CommitItem(lease_id=bob_id, checksum=xxhash.xxh3_64_intdigest(data))]), metadata=BOB, timeout=10)
    assert list(outcome.outcomes) == [pb.PUT_STORED]
    pieces = [p for r in grpc_stub.Get(pb.GetRequest(fingerprint_id=FP, keys=[k]), metadata=BOB, timeout=10) for p in r.pieces]
    assert b"".join(p.data for p in pieces) == data

    # Bob's pin survives Alice's Unpin, and her own Pin's release list, naming it.
    pin = stub.Pin(pb.PinRequest(fingerprint_id=FP, keys=[k]), metadata=BOB, timeout=10)
    assert stub.Unpin(pb.UnpinRequest(pin_ids=[pin.pin_id]), metadata=ALICE, timeout=10).released == 0
    failure(lambda: stub.Pin(pb.PinRequest(fingerprint_id=FP, keys=[k], release_pin_ids=[pin.pin_id]), metadata=ALICE, timeout=10))
    pins = [e for e in admin_json(srv, "leases")["leases"] if e["kind"] == "pin"]
    assert [(p["id"], p["tenant"]) for p in pins] == [(pin.pin_id, "bob")]
    assert stub.Unpin(pb.UnpinRequest(pin_ids=[pin.pin_id]), metadata=BOB, timeout=10).released == 1


def test_lease_and_pin_ids_are_not_a_counter(srv, stub):
    leases = stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[key(i) for i in range(16)]), metadata=ALICE, timeout=10).leases
    ids = sorted(lease.lease_id for lease in leases)
    assert len(set(ids)) == 16
    assert all(b - a > 1 << 20 for a, b in zip(ids, ids[1:])), ids  # 16 random 62-bit ids are never near neighbours


def test_pending_answer_shows_owner_only_within_the_tenant(srv, stub):
    k = key(2)
    stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[k]), metadata=md("bob-secret", "bob-engine"), timeout=10)
    other = md("bob-secret", "bob-engine-2")
    (mine,) = stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[k]), metadata=other, timeout=10).leases
    assert mine.outcome == pb.LEASE_PENDING and mine.owner == "bob-engine"  # a tenant sees its own engines
    (alice,) = stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[k]), metadata=ALICE, timeout=10).leases
    assert alice.outcome == pb.LEASE_GRANTED and alice.owner == SHARED_ID


def test_secure_delete_revokes_written_but_uncommitted_leases(srv):
    """The writer cannot commit after the delete, so the deleted block never becomes readable again."""
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.KVStoreStub(channel)
    k = key(3)
    (lease,) = stub.Reserve(pb.ReserveRequest(fingerprint_id=FP, blocks=[pb.BlockSpec(key=k, size_bytes=BLOCK)]), metadata=BOB, timeout=10).leases
    data = b"\xbb" * BLOCK
    write(stub, BOB, lease.lease_id, data)

    proc = run_admin(srv, "--json", "delete", "--secure", "--tenant", "bob")
    assert proc.returncode == 0, proc.stderr

    err = failure(lambda: stub.Commit(pb.CommitRequest(fingerprint_id=FP, items=[pb.CommitItem(lease_id=lease.lease_id, checksum=xxhash.xxh3_64_intdigest(data))]), metadata=BOB, timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = stub.Lookup(pb.LookupRequest(fingerprint_id=FP, keys=[k]), metadata=BOB, timeout=10).statuses[0]
    assert status.state == pb.BLOCK_MISSING
    assert not [e for e in admin_json(srv, "leases")["leases"] if e["tenant"] == "bob"]
    channel.close()


def test_one_tenant_cannot_hold_the_pool(srv, stub):
    """Reserving or pinning past the tenant's share is refused; another tenant's puts still work;
    TTLs are bounded."""
    half = 16 << 20  # tenant_held_fraction 0.5 of the 32 MiB pool
    specs = [pb.BlockSpec(key=key(100 + i), size_bytes=1 << 20) for i in range(half // (1 << 20))]
    granted = stub.Reserve(pb.ReserveRequest(fingerprint_id=FP, blocks=specs), metadata=ALICE, timeout=10).leases
    assert all(lease.outcome == pb.LEASE_GRANTED for lease in granted)
    err = failure(lambda: stub.Reserve(pb.ReserveRequest(fingerprint_id=FP, blocks=[pb.BlockSpec(key=key(99), size_bytes=4096)]), metadata=ALICE, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "alice" in err.details() and "bob" not in err.details()

    # Bob, a different tenant, still stores his blocks in the half Alice cannot take.
    bob_specs = [pb.BlockSpec(key=key(200 + i), size_bytes=1 << 20) for i in range(8)]
    assert all(lease.outcome == pb.LEASE_GRANTED for lease in stub.Reserve(pb.ReserveRequest(fingerprint_id=FP, blocks=bob_specs), metadata=BOB, timeout=10).leases)

    week_ms = 7 * 24 * 3600 * 1000
    for call in (
        lambda: stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[key(300)], ttl_ms=week_ms), metadata=BOB, timeout=10),
        lambda: stub.RenewLeases(pb.RenewLeasesRequest(lease_ids=[granted[0].lease_id], ttl_ms=week_ms), metadata=ALICE, timeout=10),
        lambda: stub.Pin(pb.PinRequest(fingerprint_id=FP, keys=[key(300)], ttl_ms=week_ms), metadata=BOB, timeout=10),
    ):
        err = failure(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_lease_ttl_s" in err.details()


def test_a_prefix_pin_is_cut_to_the_tenants_share(srv, make_server):
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.KVStoreStub(channel)
    keys = [key(400 + i) for i in range(24)]
    for i, k in enumerate(keys):
        put_block(stub, ALICE, k, bytes([i]) * (1 << 20))
    first = stub.Pin(pb.PinRequest(fingerprint_id=FP, keys=keys[:12], prefix_only=True), metadata=ALICE, timeout=10)
    assert len(first.offsets) == 12
    second = stub.Pin(pb.PinRequest(fingerprint_id=FP, keys=keys[12:], prefix_only=True), metadata=ALICE, timeout=10)
    assert len(second.offsets) == 4  # 16 MiB share, 12 MiB already pinned
    err = failure(lambda: stub.Pin(pb.PinRequest(fingerprint_id=FP, keys=keys[16:20]), metadata=ALICE, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()


def test_request_sizes_are_bounded_and_big_requests_do_not_stall_others(make_server, tmp_path):
    srv = make_server(**auth_flags(tmp_path, host_memory="32MiB", max_block_bytes="1MiB", max_keys_per_request=65536))
    channel = grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.KVStoreStub(channel)
    too_many = [key(i) for i in range(65537)]
    for call in (
        lambda: stub.Lookup(pb.LookupRequest(fingerprint_id=FP, keys=too_many), metadata=ALICE, timeout=60),
        lambda: stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=too_many), metadata=ALICE, timeout=60),
        lambda: stub.Unpin(pb.UnpinRequest(pin_ids=list(range(1, 65538))), metadata=ALICE, timeout=60),
    ):
        err = failure(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_keys_per_request" in err.details()

    # The largest allowed request takes turns with another tenant's small ones.
    big = too_many[:65536]
    stop, worst = threading.Event(), []

    def small_lookups() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            stub.Lookup(pb.LookupRequest(fingerprint_id=FP, keys=[key(7)]), metadata=BOB, timeout=30)
            worst.append(time.perf_counter() - started)

    thread = threading.Thread(target=small_lookups)
    thread.start()
    try:
        for _ in range(3):
            assert stub.Lookup(pb.LookupRequest(fingerprint_id=FP, keys=big, prefix_only=False), metadata=ALICE, timeout=60).prefix_length == 0
    finally:
        stop.set()
        thread.join()
    assert worst and max(worst) < 2.0, max(worst)
    channel.close()


def test_duplicate_keys_are_refused_and_change_nothing(srv, stub):
    k = key(5)
    for call in (
        lambda: stub.Reserve(pb.ReserveRequest(fingerprint_id=FP, blocks=[pb.BlockSpec(key=k, size_bytes=BLOCK)] * 2), metadata=ALICE, timeout=10),
        lambda: stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[k, key(6), k]), metadata=ALICE, timeout=10),
        lambda: stub.Put(pb.PutRequest(fingerprint_id=FP, blocks=[pb.InlineBlock(key=k, data=b"d" * BLOCK, checksum=xxhash.xxh3_64_intdigest(b"d" * BLOCK))] * 2), metadata=ALICE, timeout=10),
    ):
        err = failure(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "once" in err.details(), err.details()
    statuses = stub.Lookup(pb.LookupRequest(fingerprint_id=FP, keys=[k, key(6)]), metadata=ALICE, timeout=10).statuses
    assert [s.state for s in statuses] == [pb.BLOCK_MISSING, pb.BLOCK_MISSING]  # nothing left PENDING
    (lease,) = stub.Reserve(pb.ReserveRequest(fingerprint_id=FP, blocks=[pb.BlockSpec(key=k, size_bytes=BLOCK)]), metadata=ALICE, timeout=10).leases
    err = failure(lambda: stub.Commit(pb.CommitRequest(fingerprint_id=FP, items=[pb.CommitItem(lease_id=lease.lease_id, checksum=1)] * 2), metadata=ALICE, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    counters = admin_json(srv, "stats")
    assert counters["store"]["counters"].get("checksum_failures", 0) == 0, counters


def test_clients_that_send_no_client_id_do_not_share_ownership(srv):
    """Two connections with the same token and no client id are two owners: one's lease is PENDING to the other,
    and the other cannot release it."""
    token_only = (("authorization", "Bearer alice-secret"),)
    first, second = grpc.insecure_channel(srv.address), grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)])
    a, b = pb_grpc.KVStoreStub(first), pb_grpc.KVStoreStub(second)
    k = key(8)
    (held,) = a.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[k]), metadata=token_only, timeout=10).leases
    assert held.outcome == pb.LEASE_GRANTED
    (other,) = b.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=FP, keys=[k]), metadata=token_only, timeout=10).leases
    assert other.outcome == pb.LEASE_PENDING
    assert b.ReleaseLeases(pb.ReleaseLeasesRequest(lease_ids=[held.lease_id]), metadata=token_only, timeout=10).released == 0
    assert a.ReleaseLeases(pb.ReleaseLeasesRequest(lease_ids=[held.lease_id]), metadata=token_only, timeout=10).released == 1
    first.close()
    second.close()
