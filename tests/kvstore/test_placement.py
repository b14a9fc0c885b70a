"""Placement in process: a Store over an unshared host pool and a tmp_path LMDB. Which blocks are demoted
and which stay, that LMDB writes happen outside the store lock (requests are answered while one is held
up), durable puts that refuse honestly, a refusing disk, promotion, zeroed and quarantined slots."""
from __future__ import annotations

import threading
import time

import lmdb
import pytest
import xxhash

from kvwire.errors import BlockNotFoundError, NotDurableError, SsdWriteError
from kvwire.types import BlockState, KeyStatus, LeaseInfo, LeaseOutcome, PutOutcome, Slot, Tier
from kvstore.config import ServerConfig
from kvstore.store import Caller, Store
from kvstore.tiers.host import HostPool

pytestmark = pytest.mark.timeout(60)  # threads wait on gates: a bug must fail, not hang

KIB, MIB = 1 << 10, 1 << 20
FP = b"f" * 16
ALICE = Caller("alice", "c1")


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = 64 * KIB) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def crc(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(**settings) -> Store:
        values = dict(data_dir=str(tmp_path / "data"), host_memory=4 * MIB, max_block_bytes=MIB, ssd_capacity=64 * MIB)
        cfg = ServerConfig(**{**values, **settings}).validate()
        store = Store(cfg, host=HostPool(cfg.host_memory, cfg.max_block_bytes, shared=False))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def put(store: Store, ids, size: int = 64 * KIB, durable: bool = False, caller: Caller = ALICE) -> list[PutOutcome]:
    outcomes = []
    ids = list(ids)
    for start in range(0, len(ids), 16):  # within the tenant's share of the pool
        chunk = ids[start : start + 16]
        outcomes += store.put_inline(caller, FP, [(key(i), payload(i, size), crc(payload(i, size))) for i in chunk], durable)
    return outcomes


def tiers(store: Store, ids) -> list[frozenset[Tier]]:
    """Which tiers hold each block (empty: gone)."""
    views = {v.key: v.tiers for v in store.blocks(lambda v: v.tenant == "alice")}
    return [views.get(key(i), frozenset()) for i in ids]


HOST_ONLY, SSD_ONLY, BOTH = frozenset({Tier.HOST}), frozenset({Tier.SSD}), frozenset({Tier.HOST, Tier.SSD})


class Gate:
    """Holds every write to a tier until the test opens it."""

    def __init__(self, tier) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        self._write = tier.write
        tier.write = self.write

    def write(self, items) -> None:
        self.entered.set()
        assert self.opened.wait(10), "the test never opened the gate"
        self._write(items)


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the test
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def answered_quickly(fn, *args, limit_s: float = 2.0):
    """fn's answer, from another thread, within limit_s: it did not wait for the held write."""
    thread, result = in_thread(fn, *args)
    thread.join(limit_s)
    assert not thread.is_alive(), f"{fn.__name__} waited for the tier write"
    if "error" in result:
        raise result["error"]
    return result["value"]


# ---- the store speaks kvwire records --------------------------------------------------

def test_answers_are_kvwire_records(make_store):
    store = make_store()
    (info,) = store.reserve(ALICE, FP, [(key(1), 5000)])
    assert isinstance(info, LeaseInfo) and info.outcome is LeaseOutcome.GRANTED
    assert info.slot == Slot(info.slot.offset, 5000) and info.expires_unix_ms > time.time() * 1000
    store.write(ALICE, info.lease_id, 0, payload(1, 5000))
    assert store.commit(ALICE, FP, [(info.lease_id, crc(payload(1, 5000)))]) == [PutOutcome.STORED]
    statuses, prefix = store.lookup(ALICE, FP, [key(1), key(2)])
    assert statuses == [KeyStatus(key(1), BlockState.PRESENT, Tier.HOST, 5000), KeyStatus(key(2), BlockState.MISSING)] and prefix == 1
    stats = store.stats()
    assert [(t.tier, t.blocks) for t in stats.tiers] == [(Tier.HOST, 1), (Tier.SSD, 0)] and stats.blocks == 1


# ---- which blocks move --------------------------------------------------------------

def test_background_demotion_takes_the_coldest_unpinned_blocks_down_to_the_low_watermark(make_store):
    store = make_store()
    assert set(put(store, range(60))) == {PutOutcome.STORED}  # 60 of the pool's 64 slots: above the 90% mark
    pin = store.pin(ALICE, FP, [key(0)])  # the oldest, pinned
    list(store.get(ALICE, FP, [key(1), key(2), key(3)]))  # used again
    assert store.demote_cold() == 16  # down to 70%: 44 blocks of 64 KiB
    expected = [HOST_ONLY] * 4 + [SSD_ONLY] * 16 + [HOST_ONLY] * 40
    assert tiers(store, range(60)) == expected
    assert store.counters["demotions"] == 16 and store.stats().tiers[0].used_bytes == 44 * 64 * KIB
    assert store.demote_cold() == 0  # under the high mark now
    store.unpin(ALICE, [pin.pin_id])


def test_a_prefix_pins_deferred_touch_counts_as_a_use_when_demotion_chooses(make_store, tmp_path):
    """A prefix Pin answers before its LRU moves (index.touch_later). The blocks it read rank as used when it was
    answered: younger than the blocks put before it, older than those put after, whether the store settled the reads
    (as a door does after sending its answer) or demotion found them still queued."""
    for settle in (True, False):
        store = make_store(data_dir=str(tmp_path / f"data-{settle}"))
        put(store, range(10))
        pin = store.pin(ALICE, FP, [key(i) for i in range(4)], prefix=True)  # the oldest four, read again
        assert store.index.pending_touch_blocks == 4
        if settle:
            store.settle_reads()
            assert store.index.pending_touch_blocks == 0
        store.unpin(ALICE, [pin.pin_id])
        put(store, range(10, 60))  # above the high mark
        assert store.demote_cold() == 16  # the coldest: 4..9, then the four read, then 10..15
        assert tiers(store, range(60)) == [SSD_ONLY] * 16 + [HOST_ONLY] * 44


def test_lookups_pins_and_puts_proceed_while_a_demotion_writes_lmdb(make_store):
    store = make_store()
    put(store, range(60))
    gate = Gate(store.ssd)
    demotion, result = in_thread(store.demote_cold)
    assert gate.entered.wait(5)
    # The write is held with the victims pinned; everything that needs no ssd write is answered meanwhile.
    assert answered_quickly(store.prefix_length, ALICE, FP, [key(i) for i in range(60)]) == 60
    info = answered_quickly(store.pin, ALICE, FP, [key(59)])
    answered_quickly(store.unpin, ALICE, [info.pin_id])
    assert answered_quickly(put, store, [100]) == [PutOutcome.STORED]
    assert answered_quickly(store.delete, ALICE, FP, [key(58)]) == 1
    gate.opened.set()
    demotion.join(5)
    assert result["value"] == 16 and store.counters["demotions"] == 16


def test_a_reserve_that_finds_the_pool_full_makes_room_without_holding_the_lock(make_store):
    store = make_store()
    put(store, range(64))  # every slot taken
    gate = Gate(store.ssd)
    reserve, result = in_thread(store.reserve, ALICE, FP, [(key(100), 64 * KIB)])
    assert gate.entered.wait(5)
    assert answered_quickly(store.lookup, ALICE, FP, [key(0)])[1] == 1  # the victim, readable while it is written
    gate.opened.set()
    reserve.join(5)
    (info,) = result["value"]
    assert info.outcome == LeaseOutcome.GRANTED and info.slot is not None
    assert tiers(store, [0, 1]) == [SSD_ONLY, HOST_ONLY]  # one eviction, the least recently used block
    assert store.counters["demotions"] == 1


def test_a_durable_put_writes_lmdb_outside_the_lock(make_store):
    store = make_store()
    gate = Gate(store.ssd)
    writer, result = in_thread(put, store, [1], durable=True)
    assert gate.entered.wait(5)
    assert answered_quickly(put, store, [2]) == [PutOutcome.STORED]
    statuses, _ = answered_quickly(store.lookup, ALICE, FP, [key(1)])
    assert statuses[0].state == BlockState.PENDING  # not visible before it is durable
    gate.opened.set()
    writer.join(5)
    assert result["value"] == [PutOutcome.STORED]
    assert tiers(store, [1, 2]) == [BOTH, HOST_ONLY]


# ---- durability: honest refusals ------------------------------------------------------

def test_a_durable_commit_refused_leaves_nothing_committed_and_the_lease_the_callers(make_store):
    store = make_store(ssd_capacity=MIB, host_memory=16 * MIB)
    assert put(store, range(3), size=256 * KIB, durable=True) == [PutOutcome.STORED] * 3  # the ssd tier is full
    pin = store.pin(ALICE, FP, [key(i) for i in range(3)])
    (info,) = store.reserve(ALICE, FP, [(key(3), 256 * KIB)])
    store.write(ALICE, info.lease_id, 0, payload(3, 256 * KIB))
    with pytest.raises(NotDurableError, match="pinned"):
        store.commit(ALICE, FP, [(info.lease_id, crc(payload(3, 256 * KIB)))], durable=True)
    assert store.lookup(ALICE, FP, [key(3)])[0][0].state == BlockState.PENDING  # uncommitted, still the caller's lease
    store.unpin(ALICE, [pin.pin_id])
    assert store.commit(ALICE, FP, [(info.lease_id, crc(payload(3, 256 * KIB)))], durable=True) == [PutOutcome.STORED]
    assert tiers(store, range(4)) == [HOST_ONLY, BOTH, BOTH, BOTH]  # the least recently used block made room
    with pytest.raises(NotDurableError, match="larger than the ssd tier"):
        put(store, [9], size=MIB, durable=True)
    assert tiers(store, [9]) == [frozenset()]


def test_a_durable_put_of_a_cached_block_makes_it_durable(make_store):
    store = make_store()
    put(store, range(4))
    assert put(store, range(4), durable=True) == [PutOutcome.ALREADY_PRESENT] * 4
    assert tiers(store, range(4)) == [BOTH] * 4


def test_a_durable_put_whose_cached_block_is_deleted_meanwhile_is_refused(make_store):
    store = make_store()
    put(store, range(60))
    gate = Gate(store.ssd)
    demotion, _ = in_thread(store.demote_cold)  # holds the ssd writer
    assert gate.entered.wait(5)
    durable, result = in_thread(put, store, [59], durable=True)
    time.sleep(0.2)  # it found block 59 present and waits to write it
    assert store.delete(ALICE, FP, [key(59)]) == 1
    gate.opened.set()
    demotion.join(5)
    durable.join(5)
    assert isinstance(result.get("error"), NotDurableError) and "left the store" in str(result["error"])
    assert tiers(store, [59]) == [frozenset()] and store.ssd.used_bytes == 16 * 64 * KIB
    assert put(store, [59], durable=True) == [PutOutcome.STORED]  # the retry stores it


def test_a_refusing_disk_keeps_dirty_blocks_in_the_host_tier(make_store):
    store = make_store()
    put(store, range(60))

    def refuse(items):
        raise SsdWriteError("ssd tier write failed: no space left (a test)")

    store.ssd.write = refuse
    assert store.demote_cold() == 16
    assert tiers(store, range(60)) == [HOST_ONLY] * 60  # a broken disk must not turn demotion into data loss
    assert store.counters["demotions"] == 0 and store.counters["evictions"] == 0
    with pytest.raises(NotDurableError, match="no space left"):
        put(store, [100], durable=True)
    assert tiers(store, [100]) == [frozenset()]


def test_a_block_deleted_while_it_is_demoted_stays_deleted(make_store):
    store = make_store()
    put(store, range(60))
    gate = Gate(store.ssd)
    demotion, _ = in_thread(store.demote_cold)
    assert gate.entered.wait(5)
    assert store.delete(ALICE, FP, [key(0)]) == 1  # a victim, being written
    gate.opened.set()
    demotion.join(5)
    assert tiers(store, [0, 1]) == [frozenset(), SSD_ONLY]
    store.close()
    again = make_store()
    assert again.lookup(ALICE, FP, [key(0), key(1)])[0][0].state == BlockState.MISSING  # its record was erased
    assert len(again.index) == 59


# ---- promotion -------------------------------------------------------------------------

def test_a_pin_stages_ssd_only_blocks_back_into_the_host_pool(make_store):
    store = make_store()
    put(store, range(8))
    assert store.flush_to_ssd() == 8
    report = store.evict_to_watermark(Tier.HOST, 0.0)
    assert (report.evicted, report.demoted) == (0, 8) and tiers(store, range(8)) == [SSD_ONLY] * 8
    assert store.needs_staging(ALICE, FP, [key(i) for i in range(8)])
    assert not store.needs_staging(ALICE, FP, [key(100), key(1)], prefix=True)  # the prefix ends before it
    info = store.pin(ALICE, FP, [key(i) for i in range(8)])
    assert bytes(store.host.view[info.slots.offsets[5] : info.slots.offsets[5] + 64 * KIB]) == payload(5)
    assert store.counters["hits_ssd"] == 8 and store.counters["promotions"] == 8
    assert tiers(store, range(8)) == [BOTH] * 8 and not store.needs_staging(ALICE, FP, [key(i) for i in range(8)])
    store.unpin(ALICE, [info.pin_id])


def test_a_corrupt_record_ends_a_prefix_pin_and_is_dropped_for_good(make_store, tmp_path):
    store = make_store()
    put(store, range(6), durable=True)
    store.close()
    env = lmdb.open(str(tmp_path / "data" / "ssd"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        target = next(k for k, v in txn.cursor() if bytes(v).endswith(payload(2)))
        value = bytearray(txn.get(target))
        value[-100] ^= 0xFF  # one flipped payload byte; the header still parses
        txn.put(target, bytes(value))
    env.close()
    store = make_store()
    info = store.pin(ALICE, FP, [key(i) for i in range(6)], prefix=True)
    assert len(info.slots) == 2 and store.counters["checksum_failures"] == 1
    store.unpin(ALICE, [info.pin_id])
    with pytest.raises(BlockNotFoundError):
        store.pin(ALICE, FP, [key(2)])
    store.placement.erase_pending()  # the background worker's job each tick
    store.close()
    store = make_store()
    assert [s.state for s in store.lookup(ALICE, FP, [key(i) for i in range(6)])[0]] == [BlockState.PRESENT] * 2 + [BlockState.MISSING] + [BlockState.PRESENT] * 3


# ---- room, slots, zeros -----------------------------------------------------------------

def test_room_for_a_new_size_class_costs_one_slab_not_the_cache(make_store):
    store = make_store()
    put(store, range(200), size=4 * KIB)  # one slab of 4 KiB slots, least recently used
    for i, size in enumerate([8 * KIB, 16 * KIB, 32 * KIB]):  # a slab each, one block in it
        put(store, [1000 + i], size=size)
    put(store, [2000], size=64 * KIB)  # a fifth class: a slab must be emptied
    assert tiers(store, range(200)) == [HOST_ONLY] * 200
    assert tiers(store, [1000, 1001, 1002, 2000]) == [SSD_ONLY, HOST_ONLY, HOST_ONLY, HOST_ONLY]


def test_freed_slots_are_zeroed_and_a_lapsed_leases_slot_is_quarantined(make_store):
    store = make_store(stale_write_quarantine_s=0.3)
    put(store, [1])
    pin = store.pin(ALICE, FP, [key(1)])
    store.unpin(ALICE, [pin.pin_id])
    offset = pin.slots.offsets[0]
    store.delete(ALICE, FP, [key(1)])
    assert not any(store.host.view[offset : offset + 64 * KIB])  # zeroed on delete
    (lease,) = store.reserve(ALICE, FP, [(key(2), 64 * KIB)], ttl_ms=50)
    store.host.view[lease.slot.offset : lease.slot.offset + 5] = b"stale"  # a writer through the shared pool
    time.sleep(0.1)
    store.reap_expired()
    assert store.counters["slots_quarantined"] == 1
    assert not any(store.host.view[lease.slot.offset : lease.slot.offset + 64 * KIB])
    (other,) = store.reserve(ALICE, FP, [(key(3), 64 * KIB)])
    assert other.slot.offset != lease.slot.offset  # not reused while the late writer might still copy
    time.sleep(0.3)
    store.reap_expired()
    store.release(ALICE, [other.lease_id])
    assert store.stats().tiers[0].used_bytes == 0


def test_admin_evicts_an_ssd_tier_to_its_watermark(make_store):
    store = make_store()
    put(store, range(8))
    store.flush_to_ssd()
    store.evict_to_watermark(Tier.HOST, 0.0)
    put(store, [8, 9])
    store.flush_to_ssd()
    report = store.evict_to_watermark(Tier.SSD, 0.0)
    assert (report.evicted, report.demoted) == (8, 2)  # blocks 8 and 9 keep their host copies
    assert tiers(store, range(10)) == [frozenset()] * 8 + [HOST_ONLY] * 2
    assert store.stats().tiers[1].used_bytes == 0


def test_the_shutdown_flush_survives_a_restart(make_store):
    store = make_store()
    put(store, range(20))
    store.close()
    store = make_store()
    assert tiers(store, range(20)) == [SSD_ONLY] * 20
    assert [data for _, data, _ in store.get(ALICE, FP, [key(i) for i in range(20)])] == [payload(i) for i in range(20)]


def test_cluster_mode_evicts_read_through_copies_first_and_drops_rather_than_demotes_them(make_store):
    store = make_store()
    store.policy.by_rank = True  # what cluster mode sets
    put(store, range(20))  # the coldest: this node's own blocks
    copies = range(100, 120)
    got = store.adopt("alice", FP, [(key(i), payload(i), crc(payload(i))) for i in copies], store.deletions)  # a peer's, read through
    assert got == 20
    put(store, range(20, 40))  # past the high watermark (60 x 64 KiB of 4 MiB)
    store.demote_cold()
    assert tiers(store, range(40)) == [HOST_ONLY] * 40  # no block of its own had to move
    left = tiers(store, copies)
    assert frozenset() in left and SSD_ONLY not in left and BOTH not in left  # copies went, and not to the ssd tier
    assert store.counters["cluster_sole_copies_evicted"] == 0 and store.counters["evictions"] == left.count(frozenset())
