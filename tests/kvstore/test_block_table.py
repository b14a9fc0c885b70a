"""The block table in process, on a clock of the test's own: exact lease outcomes, ownership refusals,
pin counts, expiry, quarantine and quotas, in milliseconds and without a server."""
from __future__ import annotations

import pytest

from kvwire.errors import CapacityExhaustedError, FingerprintMismatchError, LeaseError
from kvwire.types import BlockState, LeaseOutcome, Slot, Tier
from kvstore.block_table import BlockTable, Caller, Limits
from kvstore.index import BlockMeta, storage_key
from kvstore.tiers.base import Record

FP, OTHER_FP = b"f" * 16, b"g" * 16
ALICE, ALICE_2, BOB = Caller("alice", "c1"), Caller("alice", "c2"), Caller("bob", "c1")
ADMIN = Caller("alice", "ops", is_admin=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> BlockTable:
    return BlockTable(Limits(tenant_max_held_ids=4, tenant_held_bytes=1 << 20, stale_write_quarantine_s=30), clock=clock)


def block(caller: Caller, i: int, size: int = 4096, copies: dict | None = None) -> BlockMeta:
    skey = storage_key(caller.tenant, key(i))
    return BlockMeta(skey, caller.tenant, FP, size, 0xC0FFEE, copies=copies if copies is not None else {Tier.HOST: Slot(i * 4096, size)})


def drained(table: BlockTable) -> tuple[list, list, list]:
    box = table.outbox
    out = (list(box.release), list(box.zero), list(box.erase))
    box.release.clear(), box.zero.clear(), box.erase.clear()
    box.changed = False
    return out


# ---- lease outcomes ---------------------------------------------------------------

def test_one_writer_per_missing_key_and_present_keys_need_none(table):
    outcome, lease = table.lease_for(ALICE, FP, key(1), ttl_s=10)
    assert outcome == LeaseOutcome.GRANTED and lease.owner == "c1"
    assert table.lease_for(ALICE_2, FP, key(1), ttl_s=10) == (LeaseOutcome.PENDING, lease)  # singleflight: the holder's lease
    assert table.lease_for(ALICE, FP, key(1), ttl_s=10) == (LeaseOutcome.GRANTED, lease)  # its own, renewed
    assert table.lease_for(BOB, FP, key(1), ttl_s=10)[0] == LeaseOutcome.GRANTED  # another tenant's key space
    table.add(block(ALICE, 2))
    assert table.lease_for(ALICE_2, FP, key(2), ttl_s=10) == (LeaseOutcome.ALREADY_PRESENT, None)
    with pytest.raises(FingerprintMismatchError):
        table.lease_for(ALICE, OTHER_FP, key(2), ttl_s=10)
    assert table.counters["lease_grants"] == 2


def test_statuses_follow_the_state_machine(table, clock):
    assert table.status("alice", FP, key(1)).state == BlockState.MISSING
    _, lease = table.lease_for(ALICE, FP, key(1), ttl_s=10)
    pending = table.status("alice", FP, key(1))
    assert (pending.state, pending.lease_owner) == (BlockState.PENDING, "c1")
    assert table.status("bob", FP, key(1)).state == BlockState.MISSING
    table.add(block(ALICE, 3, copies={Tier.SSD: Record(b"x", 4096)}))
    present = table.status("alice", FP, key(3))
    assert (present.state, present.tier, present.size_bytes) == (BlockState.PRESENT, Tier.SSD, 4096)
    assert table.status("alice", OTHER_FP, key(3)).state == BlockState.MISSING  # another fingerprint's block is a miss
    clock.now += 11
    assert table.status("alice", FP, key(1)).state == BlockState.MISSING  # lapsed


def test_lease_ids_are_random_and_one_id_space_serves_leases_and_pins(table):
    ids = [table.lease_for(ALICE, FP, key(i), ttl_s=10)[1].lease_id for i in range(3)]
    pin = table.add_pin(ALICE, [], ttl_s=10)
    assert len({*ids, pin.pin_id}) == 4
    assert sorted(ids) != list(range(ids[0], ids[0] + 3))


# ---- ownership --------------------------------------------------------------------

def test_only_the_holder_may_use_a_lease_and_refusals_say_nothing_of_whose_it_is(table):
    _, lease = table.lease_for(ALICE, FP, key(1), ttl_s=10)
    refusals = []
    for caller, lease_id in ((ALICE_2, lease.lease_id), (BOB, lease.lease_id), (Caller("bob", "c1"), lease.lease_id), (ALICE, 12345)):
        with pytest.raises(LeaseError) as err:
            table.owned_lease(caller, lease_id)
        refusals.append(str(err.value).replace(str(lease_id), "N"))
    assert len(set(refusals)) == 1  # unknown, another client's, another tenant's: one answer
    assert table.owned_lease(ALICE, lease.lease_id) is lease
    assert table.release(ALICE_2, [lease.lease_id]) == 0 and table.release(BOB, [lease.lease_id]) == 0
    assert table.release(ALICE, [lease.lease_id, 999]) == 1
    assert table.leases == {}


def test_pins_belong_to_their_tenant_and_client(table):
    meta = block(ALICE, 1)
    table.add(meta)
    table.pin_blocks([meta])
    pin = table.add_pin(ALICE, [meta], ttl_s=10)
    assert table.owned_pin(ALICE_2, pin.pin_id) is None and table.owned_pin(BOB, pin.pin_id) is None
    assert table.unpin(BOB, [pin.pin_id]) == 0 and meta.pins == 1
    assert table.unpin(ALICE, [pin.pin_id]) == 1 and meta.pins == 0
    assert table.unpin(ALICE, [pin.pin_id]) == 0


# ---- slots, pins and what the table frees -----------------------------------------

def test_a_released_lease_frees_its_slot_at_once(table):
    _, lease = table.lease_for(ALICE, FP, key(1), ttl_s=10)
    slot = Slot(8192, 5000)
    table.assign_slot(lease, slot)
    assert table.held_bytes["alice"] == 5000
    assert table.release(ALICE, [lease.lease_id]) == 1
    assert drained(table) == ([(Tier.HOST, slot)], [], [])
    assert table.held_bytes["alice"] == 0 and table.held_ids["alice"] == 0


def test_an_expired_leases_slot_is_zeroed_now_quarantined_and_still_counted(table, clock):
    _, lease = table.lease_for(ALICE, FP, key(1), ttl_s=10)
    slot = Slot(0, 4096)
    table.assign_slot(lease, slot)
    drained(table)
    clock.now += 10
    outcome, again = table.lease_for(ALICE_2, FP, key(1), ttl_s=10)  # a lapsed lease ends when the key is asked for
    assert outcome == LeaseOutcome.GRANTED and again is not lease
    assert drained(table) == ([], [(Tier.HOST, slot)], [])  # zeroed, not released: its writer may still copy into it
    assert table.held_bytes["alice"] == 4096  # still alice's until released
    assert table.counters["lease_expiries"] == 1 and table.counters["slots_quarantined"] == 1
    clock.now += 29
    table.reap()
    assert drained(table)[0] == []
    clock.now += 1
    table.reap()
    assert drained(table)[0] == [(Tier.HOST, slot)]
    assert table.held_bytes["alice"] == 0


def test_reap_ends_lapsed_leases_and_pins_but_not_leases_being_committed(table, clock):
    _, lapsing = table.lease_for(ALICE, FP, key(1), ttl_s=1)
    _, committing = table.lease_for(ALICE, FP, key(2), ttl_s=1)
    meta = block(ALICE, 3)
    table.add(meta)
    table.pin_blocks([meta])
    pin = table.add_pin(ALICE, [meta], ttl_s=1)
    table.assign_slot(committing, Slot(0, 4096))
    table.begin_commit([committing])
    clock.now += 2
    table.reap()
    assert list(table.leases) == [committing.lease_id] and table.pins == {}
    assert meta.pins == 0 and table.pin_count == 0
    assert table.counters["lease_expiries"] == 1 and table.counters["pin_expiries"] == 1
    with pytest.raises(LeaseError, match="being committed"):  # nor does it take writes meanwhile
        table.writable_lease(ALICE, committing.lease_id)
    table.end_commit([committing])
    table.reap()
    assert table.leases == {} and pin.pin_id not in table.pins


def test_a_committed_leases_slot_becomes_the_blocks(table):
    _, lease = table.lease_for(ALICE, FP, key(1), ttl_s=10)
    table.assign_slot(lease, Slot(4096, 100))
    slot = table.commit_lease(lease)
    assert slot == Slot(4096, 100) and table.leases == {}
    assert drained(table)[0] == []  # not freed: the block owns it now
    assert table.held_bytes["alice"] == 0 and table.held_ids["alice"] == 0


def test_pin_counts_and_a_delete_under_readers(table):
    host_slot, record = Slot(0, 4096), Record(storage_key("alice", key(1)), 4096)
    meta = block(ALICE, 1, copies={Tier.HOST: host_slot, Tier.SSD: record})
    table.add(meta)
    table.pin_blocks([meta, meta])
    assert (meta.pins, table.pin_count) == (2, 2)
    assert table.delete(meta)
    assert not table.delete(meta)  # once
    assert table.find("alice", FP, key(1)) is None
    # The record goes now; the slot stays until the last reader is done copying out of it.
    assert drained(table) == ([(Tier.SSD, record)], [], [(Tier.SSD, record)])
    table.unpin_blocks([meta])
    assert drained(table)[0] == []
    table.unpin_blocks([meta])
    assert drained(table)[0] == [(Tier.HOST, host_slot)]
    assert (meta.pins, table.pin_count, meta.copies) == (0, 0, {})


def test_dropping_a_last_copy_removes_the_block(table):
    host_slot, record = Slot(0, 4096), Record(b"s", 4096)
    meta = block(ALICE, 1, copies={Tier.HOST: host_slot, Tier.SSD: record})
    table.add(meta)
    assert table.index.blocks_in(Tier.HOST) == table.index.blocks_in(Tier.SSD) == 1
    assert not table.drop_copy(meta, Tier.HOST)  # demoted: still readable from the ssd tier
    assert table.index.blocks_in(Tier.HOST) == 0 and table.find("alice", FP, key(1)) is meta
    assert table.drop_copy(meta, Tier.SSD)  # evicted
    assert table.find("alice", FP, key(1)) is None and meta.deleted
    assert drained(table) == ([(Tier.HOST, host_slot), (Tier.SSD, record)], [], [(Tier.SSD, record)])


def test_leading_present_stops_at_a_miss_or_another_fingerprint(table):
    metas = [block(ALICE, i) for i in range(4)]
    metas[2].fingerprint_id = OTHER_FP
    for meta in metas:
        table.add(meta)
    assert table.leading_present("alice", FP, [key(i) for i in range(4)]) == metas[:2]
    assert table.leading_present("bob", FP, [key(0)]) == []
    assert (table.counters["lookup_blocks_hit"], table.counters["lookup_blocks_miss"]) == (2, 3)


# ---- quotas -----------------------------------------------------------------------

def test_a_tenant_holds_at_most_its_share_of_ids_and_bytes(table):
    leases = [table.lease_for(ALICE, FP, key(i), ttl_s=10)[1] for i in range(3)]
    table.add_pin(ALICE_2, [], ttl_s=10)  # pins count too, and per tenant, whichever client holds them
    with pytest.raises(CapacityExhaustedError, match="tenant_max_held_ids"):
        table.lease_for(ALICE, FP, key(9), ttl_s=10)
    assert table.lease_for(BOB, FP, key(9), ttl_s=10)[0] == LeaseOutcome.GRANTED
    assert table.lease_for(ADMIN, FP, key(9), ttl_s=10)[0] == LeaseOutcome.GRANTED  # admins act for the server
    table.assign_slot(leases[0], Slot(0, 1 << 19))
    table.check_quota(ALICE, new_bytes=1 << 19)
    with pytest.raises(CapacityExhaustedError, match="tenant_held_fraction"):
        table.check_quota(ALICE, new_bytes=(1 << 19) + 1)
    table.check_quota(BOB, new_bytes=1 << 20)


def test_a_prefix_pin_beyond_the_quota_is_cut_short_and_a_plain_one_refused(table):
    metas = [block(ALICE, i, size=400 << 10) for i in range(4)]  # 1.6 MiB against a 1 MiB share
    for meta in metas:
        table.add(meta)
    table.pin_blocks(metas)
    kept = table.within_quota(ALICE, metas, prefix=True)
    assert kept == metas[:2] and [m.pins for m in metas] == [1, 1, 0, 0]
    table.pin_blocks(metas)
    with pytest.raises(CapacityExhaustedError):
        table.within_quota(ALICE, metas, prefix=False)
    assert [m.pins for m in metas] == [1, 1, 0, 0]


# ---- what an operator sees and does -------------------------------------------------

def test_revoke_ends_leases_stale_and_drops_pins(table):
    _, lease = table.lease_for(ALICE, FP, key(1), ttl_s=10)
    slot = Slot(0, 4096)
    table.assign_slot(lease, slot)
    meta = block(BOB, 2)
    table.add(meta)
    table.pin_blocks([meta])
    pin = table.add_pin(BOB, [meta], ttl_s=10)
    drained(table)
    views = {v.id: v for v in table.lease_views()}
    assert (views[lease.lease_id].kind, views[pin.pin_id].kind, views[pin.pin_id].keys) == ("write", "pin", (key(2),))
    assert table.revoke(lambda v: v.tenant == "alice") == (1, 0)
    assert drained(table)[1] == [(Tier.HOST, slot)]  # its holder may still be writing: quarantined
    assert table.revoke(lambda v: v.id == pin.pin_id) == (0, 1)
    assert meta.pins == 0 and table.in_flight() == 0
