"""StoreAPI in process: a Store on tmp_path, callers of two tenants, exact records, outcomes and errors, and the Wait caps."""
from __future__ import annotations

import threading
import time

import pytest
import xxhash

from kvstore.api import DataPlane, StoreAPI
from kvstore.config import ServerConfig
from kvstore.store import Caller, Store
from kvwire.errors import (BlockNotFoundError, CapacityExhaustedError, FingerprintMismatchError, InvalidRequestError, KVStoreError,
                           LeaseError, PermissionDeniedError)
from kvwire.hostid import host_id
from kvwire.types import BlockState, KeyStatus, LeaseInfo, LeaseOutcome, PutOutcome, Slot, Tier

pytestmark = pytest.mark.timeout(60)

FP = b"f" * 16
OTHER_FP = b"g" * 16
BLOCK = 4096
ALICE = Caller("alice", "alice-1")
ALICE_2 = Caller("alice", "alice-2")
BOB = Caller("bob", "bob-1")
OPS = Caller("ops", "ops-1", is_admin=True)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(i: int, size: int = BLOCK) -> bytes:
    return bytes([i % 251]) * size


def inline(i: int) -> tuple[bytes, bytes, int]:
    data = block(i)
    return key(i), data, xxhash.xxh3_64_intdigest(data)


def config(tmp_path, **overrides) -> ServerConfig:
    values = dict(data_dir=str(tmp_path / "data"), host_memory=8 << 20, ssd_capacity=32 << 20, max_block_bytes=1 << 20,
                  persist_on_shutdown=False, grpc_workers=6, max_waits_per_tenant=2)
    return ServerConfig(**{**values, **overrides}).validate()


@pytest.fixture
def api(tmp_path):
    store = Store(config(tmp_path))
    try:
        yield StoreAPI(store)
    finally:
        store.close()


def test_put_lookup_and_get_return_kvwire_records_scoped_to_the_tenant(api):
    assert api.put(ALICE, FP, [inline(0), inline(1)]) == [PutOutcome.STORED, PutOutcome.STORED]
    assert api.put(ALICE_2, FP, [inline(1), inline(2)]) == [PutOutcome.ALREADY_PRESENT, PutOutcome.STORED]
    statuses, prefix = api.lookup(ALICE, FP, [key(0), key(1), key(3), key(2)])
    assert prefix == 2
    assert statuses == [KeyStatus(key(0), BlockState.PRESENT, Tier.HOST, BLOCK), KeyStatus(key(1), BlockState.PRESENT, Tier.HOST, BLOCK),
                        KeyStatus(key(3), BlockState.MISSING), KeyStatus(key(2), BlockState.PRESENT, Tier.HOST, BLOCK)]
    assert all(type(s.state) is BlockState and type(s.tier) is Tier for s in statuses)
    assert api.prefix_length(ALICE, FP, [key(0), key(1), key(3), key(2)]) == 2
    # Another tenant's namespace is its own: the same keys are missing there, and it stores its own copy.
    assert api.lookup(BOB, FP, [key(0)]) == ([KeyStatus(key(0), BlockState.MISSING)], 0)
    assert api.put(BOB, FP, [inline(0)]) == [PutOutcome.STORED]
    got = list(api.get(ALICE, FP, [key(0), key(2)]))
    assert got == [inline(0), inline(2)]
    assert api.delete(BOB, FP, [key(0), key(1)]) == 1  # bob's key 0 only
    assert api.prefix_length(ALICE, FP, [key(0), key(1)]) == 2


def test_leases_are_owned_by_tenant_and_client(api):
    granted = api.acquire(ALICE, FP, [key(5)], ttl_ms=5_000)
    assert len(granted) == 1 and granted[0].outcome is LeaseOutcome.GRANTED and granted[0].lease_id > 0
    assert granted[0].owner == "alice-1" and granted[0].slot is None
    pending = api.acquire(ALICE_2, FP, [key(5)])
    assert pending == [LeaseInfo(key(5), LeaseOutcome.PENDING, 0, "alice-1", granted[0].expires_unix_ms)]
    assert api.acquire(BOB, FP, [key(5)])[0].outcome is LeaseOutcome.GRANTED  # bob's key 5 is another block
    statuses, _ = api.lookup(ALICE_2, FP, [key(5)])
    assert statuses == [KeyStatus(key(5), BlockState.PENDING, lease_owner="alice-1", lease_expires_unix_ms=granted[0].expires_unix_ms)]
    lease_id = granted[0].lease_id
    for stranger in (ALICE_2, BOB):  # one answer for another's lease and an unknown one: it names nobody
        with pytest.raises(LeaseError) as err:
            api.renew(stranger, [lease_id])
        assert "alice-1" not in str(err.value)
        assert api.release(stranger, [lease_id]) == 0
    assert len(api.renew(ALICE, [lease_id], ttl_ms=5_000)) == 1
    assert api.release(ALICE, [lease_id]) == 1
    assert api.acquire(ALICE_2, FP, [key(5)])[0].outcome is LeaseOutcome.GRANTED


def test_reserve_write_commit_and_the_data_plane_slots(api):
    leases = api.reserve(ALICE, FP, [(key(7), BLOCK), (key(8), 2 * BLOCK)], ttl_ms=5_000)
    assert [i.outcome for i in leases] == [LeaseOutcome.GRANTED] * 2
    assert [i.slot.size_bytes for i in leases] == [BLOCK, 2 * BLOCK] and all(isinstance(i.slot, Slot) for i in leases)
    ids = [i.lease_id for i in leases]
    assert api.claim_write_slots(ALICE, ids) == [i.slot for i in leases]
    with pytest.raises(LeaseError):
        api.claim_write_slots(BOB, ids)
    payloads = [block(7), block(8, 2 * BLOCK)]
    assert api.write(ALICE, [(ids[0], 0, payloads[0]), (ids[1], 0, payloads[1][:BLOCK]), (ids[1], BLOCK, payloads[1][BLOCK:])]) == 3 * BLOCK
    items = [(lid, xxhash.xxh3_64_intdigest(p)) for lid, p in zip(ids, payloads)]
    assert api.commit(ALICE, FP, items) == [PutOutcome.STORED, PutOutcome.STORED]
    assert api.reserve(ALICE_2, FP, [(key(7), BLOCK)]) == [LeaseInfo(key(7), LeaseOutcome.ALREADY_PRESENT)]
    assert api.store.counters["grpc_bytes_in"] == 3 * BLOCK


def test_pin_releases_first_and_the_data_plane_reads_only_its_own_pins(api):
    api.put(ALICE, FP, [inline(i) for i in range(4)])
    first = api.pin(ALICE, FP, [key(0), key(1)])
    assert first.pin_id > 0 and first.slots.sizes == [BLOCK, BLOCK] and len(first.slots) == 2
    assert api.stats(OPS).pins_held == 1
    second = api.pin(ALICE, FP, [key(2)], release_pin_ids=[first.pin_id])  # unpin, then pin
    assert api.unpin(ALICE, [first.pin_id]) == 0  # already gone
    assert api.pinned_slots(ALICE, second.pin_id).offsets == second.slots.offsets
    for stranger in (ALICE_2, BOB):
        with pytest.raises(LeaseError):
            api.pinned_slots(stranger, second.pin_id)
    prefix = api.pin(ALICE, FP, [key(0), key(1), key(9), key(3)], prefix=True)
    assert len(prefix.slots) == 2  # the leading present run
    assert api.pin(BOB, FP, [key(0)], prefix=True).pin_id == 0  # nothing of bob's: no pin
    assert api.unpin(ALICE, [second.pin_id, prefix.pin_id]) == 2


def test_errors_are_domain_errors_that_name_no_other_tenant(api):
    api.put(ALICE, FP, [inline(0)])
    with pytest.raises(InvalidRequestError, match="fingerprint_id must be 16 bytes"):
        api.lookup(ALICE, b"short", [key(0)])
    with pytest.raises(InvalidRequestError, match="key #1"):
        api.acquire(ALICE, FP, [key(0), b"k"])
    with pytest.raises(BlockNotFoundError):
        api.pin(BOB, FP, [key(0)])  # alice's block is not bob's
    with pytest.raises(FingerprintMismatchError):
        api.pin(ALICE, OTHER_FP, [key(0)])
    with pytest.raises(PermissionDeniedError):
        api.stats(ALICE)
    assert api.stats(OPS).blocks == 1


def test_refusal_is_the_one_answer_every_door_encodes(api, caplog):
    refused = BlockNotFoundError("1 of 1 blocks not found")
    assert api.refusal("Pin", refused) is refused
    assert api.store.counters["errors_not_found"] == 1
    bad = api.refusal("Pin", ValueError("not a number"))
    assert type(bad) is InvalidRequestError and str(bad) == "not a number" and bad.status == "INVALID_ARGUMENT"
    with caplog.at_level("ERROR", logger="kvstore.api"):
        bug = api.refusal("Lookup", KeyError("secret-owner"))
        again = api.refusal("Lookup", KeyError("secret-owner"))
    assert type(bug) is KVStoreError and bug.status == "INTERNAL" and "secret-owner" not in str(bug)
    assert str(again) == str(bug) == "internal error in Lookup; the server log has details"
    assert len([r for r in caplog.records if "Lookup failed unexpectedly" in r.getMessage()]) == 1  # throttled


class Sessions:
    port = 4242

    def session_token(self, caller: Caller) -> bytes:
        return f"{caller.tenant}/{caller.client_id}".encode()


def test_data_plane_describes_the_doors_that_are_up(api):
    plain = api.data_plane(BOB)
    assert plain == DataPlane(api.store.host.shm_name, api.store.host.capacity_bytes, host_id(), 1 << 20)
    api.local_control_path, api.ucx = "/tmp/ctl.sock", Sessions()
    with_doors = api.data_plane(BOB)
    assert with_doors.local_control_socket == "/tmp/ctl.sock"
    assert (with_doors.ucx_listener, with_doors.ucx_session_token, with_doors.ucx_session_tenant) == ("127.0.0.1:4242", b"bob/bob-1", "bob")


def test_pins_for_a_data_plane_say_when_they_would_read_the_ssd_tier(tmp_path):
    store = Store(config(tmp_path))
    try:
        StoreAPI(store).put(ALICE, FP, [inline(0), inline(1)], durable=True)
    finally:
        store.close()
    store = Store(config(tmp_path))  # reopened: every block is on the ssd tier only
    try:
        api = StoreAPI(store)
        assert api.needs_staging(ALICE, FP, [key(0), key(1)])
        assert not api.needs_staging(BOB, FP, [key(0)])  # nothing of bob's to stage: the pin fails fast
        info = api.pin_for_send(ALICE, FP, [key(0), key(1)])
        assert bytes(api.pool_view[info.slots.offsets[1] : info.slots.offsets[1] + BLOCK]) == block(1)
        api.unpin(ALICE, [info.pin_id])
        assert not api.needs_staging(ALICE, FP, [key(0), key(1)])  # promoted by the pin
    finally:
        store.close()


def _waiter(api: StoreAPI, caller: Caller, leave: threading.Event, results: list) -> None:
    try:
        results.append(api.wait(caller, FP, [key(1)], timeout_ms=30_000, is_active=lambda: not leave.is_set()))
    except KVStoreError as err:
        results.append(err)


def test_waits_are_capped_per_tenant_and_in_all(api):
    """grpc_workers 6: 3 Waits at once in all; max_waits_per_tenant 2."""
    for caller in (ALICE, BOB, OPS):
        api.acquire(Caller(caller.tenant, "writer"), FP, [key(1)], ttl_ms=30_000)  # key 1 pending for each tenant
    leave = threading.Event()
    results: list = []
    threads = [threading.Thread(target=_waiter, args=(api, c, leave, results)) for c in (ALICE, ALICE_2, BOB)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while sum(api.wait_slots._by_tenant.values()) < 3:
        assert time.monotonic() < deadline, "the Waits never blocked"
        time.sleep(0.01)
    with pytest.raises(CapacityExhaustedError, match="tenant 'alice' already has 2 Waits"):
        api.wait(ALICE, FP, [key(1)], timeout_ms=1_000)
    with pytest.raises(CapacityExhaustedError, match="as many Waits as it allows") as err:
        api.wait(OPS, FP, [key(1)], timeout_ms=1_000)
    assert "alice" not in str(err.value) and "bob" not in str(err.value)
    leave.set()  # the callers hang up: their Waits return and give their places back
    for t in threads:
        t.join(5)
    assert len(results) == 3 and all(r == [KeyStatus(key(1), BlockState.PENDING, lease_owner="writer", lease_expires_unix_ms=r[0].lease_expires_unix_ms)] for r in results)
    assert api.wait(OPS, FP, [key(1)], timeout_ms=10)[0].state is BlockState.PENDING


def test_contains_is_lookups_walk_a_byte_a_key_scoped_to_tenant_and_fingerprint(api):
    api.put(ALICE, FP, [inline(0), inline(2), inline(5)])
    api.put(BOB, FP, [inline(1)])
    api.put(ALICE, OTHER_FP, [inline(3)])
    api.acquire(ALICE, FP, [key(4)])  # pending is not present
    keys = [key(i) for i in range(7)]
    assert api.contains(ALICE, FP, keys) == bytes([1, 0, 1, 0, 0, 1, 0])
    assert api.contains(ALICE, FP, keys) == bytes(s.state == BlockState.PRESENT for s in api.lookup(ALICE, FP, keys)[0])
    assert api.contains(BOB, FP, keys) == bytes([0, 1, 0, 0, 0, 0, 0])
    assert api.contains(ALICE, OTHER_FP, keys) == bytes([0, 0, 0, 1, 0, 0, 0])
    assert api.contains(ALICE, FP, []) == b""
    with pytest.raises(InvalidRequestError, match="repeats"):
        api.contains(ALICE, FP, [key(0), key(0)])
    with pytest.raises(InvalidRequestError, match="fingerprint_id"):
        api.contains(ALICE, b"short", keys)


def test_a_get_holds_its_pins_until_closed_even_after_the_last_block(api):
    """Get's payloads are views of pinned slots (rpc_codec.get builds its last message after the last block):
    the pins go when the generator is closed, not when the last block is handed out."""
    api.put(ALICE, FP, [inline(0), inline(1)])
    blocks = api.get(ALICE, FP, [key(0), key(1)])
    got = [next(blocks), next(blocks)]
    assert [bytes(data) for _, data, _ in got] == [block(0), block(1)]
    assert [m.pins for m in api.store.index] == [1, 1]
    assert api.delete(ALICE, FP, [key(0)]) == 1
    assert bytes(got[0][1]) == block(0)  # deleted, but still pinned: its slot is not freed (and zeroed) under the reader
    blocks.close()
    assert [m.pins for m in api.store.index] == [0]
