"""kvstore._native (the prefix Pin's per-key bookkeeping in C) against block_table's Python definition:
two tables given the same blocks and the same calls end in the same state, pin counts, LRU order,
counters and answers alike."""
from __future__ import annotations

import random

import pytest

from kvwire import native as native_selection
from kvwire.errors import FingerprintMismatchError
from kvwire.types import Slot, Tier
from kvstore import block_table
from kvstore.block_table import BlockTable, Caller, Limits, host_columns
from kvstore.index import BlockMeta, storage_key
from kvstore.tiers.base import Record

FP, OTHER_FP = b"f" * 16, b"g" * 16
ALICE = Caller("alice", "c1")


@pytest.fixture(scope="module", autouse=True)
def compiled():
    if native_selection.disabled():
        pytest.skip(f"the native code is off here ({native_selection.status})")
    assert block_table.pin_table is not None, f"kvstore._native is not in use: {block_table.pin_table_status}"


@pytest.fixture
def both_ways(monkeypatch):
    """run(table, metas) on a fresh table of 64 blocks with the C code, then with block_table's Python
    definition: the two (answer, end state) pairs, which must be equal."""

    def run_both(run, seed: int) -> list:
        ends = []
        for use_native in (True, False):
            if not use_native:
                monkeypatch.setattr(block_table, "pin_table", None)
            table = BlockTable(Limits())
            metas = populate(table, 64, random.Random(seed))
            ends.append((run(table, metas), state(table, metas)))
        monkeypatch.undo()
        assert ends[0] == ends[1]
        return ends[0]

    return run_both


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def populate(table: BlockTable, n: int, rng: random.Random) -> list[BlockMeta]:
    metas = []
    for i in range(n):
        skey = storage_key("alice", key(i))
        copies = {Tier.HOST: Slot(i * 8192, 4096 + i)}
        if rng.random() < 0.3:
            copies[Tier.SSD] = Record(skey, 4096 + i)
        if i % 3 == 0:  # a second LRU order to keep in step, alternating with the host's (no draw: the seeds' layouts stay)
            copies[Tier.HBM] = Slot(i * 4096, 4096 + i)
        if rng.random() < 0.1:
            copies = {Tier.SSD: Record(skey, 4096 + i)}
        meta = BlockMeta(skey, "alice", OTHER_FP if i in (40, 41) else FP, 4096 + i, rng.getrandbits(64), copies=copies)
        table.add(meta)
        metas.append(meta)
    return metas


def state(table: BlockTable, metas: list[BlockMeta]):
    return ([m.pins for m in metas], {t: list(order) for t, order in table.index.lru.items()}, dict(table.counters), table.pin_count)


def test_pin_leading_changes_what_the_reference_changes(both_ways):
    def run(table, metas):
        answers = []
        for keys in ([key(i) for i in range(64)],  # stops at block 40, of another fingerprint
                     [key(i) for i in (5, 3, 9, 1)],
                     [key(i) for i in range(60, 70)],  # the run reaches past the last block
                     [key(100)], [], [key(2)] * 3):
            before = [m.last_access for m in metas]
            found = table.pin_leading("alice", FP, keys)
            answers.append([metas.index(m) for m in found])
            assert all(m.last_access > b for m, b in zip(found, before))
        return answers + [table.pin_leading("bob", FP, [key(1)])]  # another tenant's key space

    answers, (pins, lru, counters, pin_count) = both_ways(run, seed=3)
    assert answers[:3] == [list(range(40)), [5, 3, 9, 1], list(range(60, 64))] and answers[3:] == [[], [], [2, 2, 2], []]
    assert pin_count == sum(pins) == 40 + 4 + 4 + 3
    assert counters["lookup_blocks_hit"] == 51 and counters["lookup_blocks_miss"] == (64 - 40) + 0 + (10 - 4) + 1 + 0 + 0 + 1
    touched_last = storage_key("alice", key(2))
    assert len(lru) == 3 and all((order[-1] == touched_last) == (order.count(touched_last) == 1) for order in lru.values())


def test_host_columns_are_the_references_and_none_without_a_host_copy(both_ways):
    def run(table, metas):
        on_host = [m for m in metas if Tier.HOST in m.copies]
        expected = ([m.copies[Tier.HOST].offset for m in on_host], [m.copies[Tier.HOST].size_bytes for m in on_host],
                    [m.checksum for m in on_host], sum(m.size for m in on_host))
        return host_columns(on_host), expected, host_columns(metas), host_columns([]), len(on_host)

    (columns, expected, with_ssd_only, empty, on_host), _ = both_ways(run, seed=4)
    assert columns == expected and 0 < on_host < 64
    assert with_ssd_only is None and empty == ([], [], [], 0)


def test_pin_leading_columns_is_pin_leading_then_host_columns(both_ways):
    """The prefix Pin's one-call walk changes what pin_leading changes and answers host_columns of the run,
    None when a block of the run has no host copy (it is pinned all the same, for the caller to stage)."""

    def run(table, metas):
        answers = []
        for keys in ([key(i) for i in range(64)], [key(i) for i in (5, 3, 9, 1)], [key(i) for i in range(60, 70)],
                     [key(100)], [], [key(2)] * 3, [key(7), key(8)[:3] + key(9), key(9)]):  # a key of another length
            found, columns = table.pin_leading_columns("alice", FP, keys)
            assert columns == host_columns(found)
            answers.append(([metas.index(m) for m in found], columns))
        return answers + [table.pin_leading_columns("bob", FP, [key(1)])]

    answers, (pins, _, counters, pin_count) = both_ways(run, seed=3)
    assert answers[6][0] == [7] and answers.pop(6)[1][0] == [7 * 8192]  # the walk ends at the odd-length key
    assert [found for found, _ in answers[:3]] == [list(range(40)), [5, 3, 9, 1], list(range(60, 64))]
    assert answers[0][1] is None  # seed 3 leaves some of blocks 0..39 on the ssd tier only
    assert answers[1][1] is not None and answers[1][1][0] == [i * 8192 for i in (5, 3, 9, 1)]
    assert answers[4] == ([], ([], [], [], 0)) and answers[6] == ([], ([], [], [], 0))
    assert pin_count == sum(pins) == 40 + 4 + 4 + 3 + 1 and counters["lookup_blocks_hit"] == 52


def test_a_slot_is_read_at_its_fields_or_by_attribute_alike():
    """host_columns reads a bound Slot's fields at their offsets, and any other copy object by attribute."""
    table = BlockTable(Limits())
    metas = populate(table, 8, random.Random(9))
    on_host = [m for m in metas if Tier.HOST in m.copies]
    expected = host_columns(on_host)

    class OtherSlot:
        def __init__(self, slot: Slot) -> None:
            self.offset, self.size_bytes = slot.offset, slot.size_bytes

    for meta in on_host:
        meta.copies[Tier.HOST] = OtherSlot(meta.copies[Tier.HOST])
    assert block_table.pin_table.host_columns(on_host, Tier.HOST) == expected
    on_host[0].copies[Tier.HOST] = object()  # no such fields: left to Python, which raises as it would
    assert block_table.pin_table.host_columns(on_host, Tier.HOST) is NotImplemented


def test_unpin_blocks_frees_what_the_reference_frees(both_ways):
    """Deleted blocks are freed (their copies released) when their last pin goes, in order; a block
    named twice is unpinned twice."""

    def run(table, metas):
        table.pin_blocks(metas + metas[:4])
        for meta in metas[:16:3]:
            table.delete(meta)
        released_at_delete = len(table.outbox.release)
        table.unpin_blocks(metas[2:12] + [metas[0], metas[0]])
        return table.outbox.release[released_at_delete:], list(table.outbox.erase), [sorted(m.copies) for m in metas]

    (released, _, copies), (pins, *_, pin_count) = both_ways(run, seed=6)
    assert pins[:4] == [0, 2, 1, 1] and pins[12:16] == [1, 1, 1, 1] and pin_count == sum(pins)
    # Of the deleted blocks (0, 3, 6, 9, 12, 15), those whose last pin went (0, 6, 9) gave their copies back.
    assert [i for i in range(16) if not copies[i]] == [0, 6, 9]
    assert {tier for tier, _ in released} == {Tier.HOST, Tier.HBM}  # their host and HBM slots (records went at delete)


def test_what_the_native_code_does_not_know_is_left_to_python():
    pin_table = block_table.pin_table
    table = BlockTable(Limits())
    metas = populate(table, 4, random.Random(5))
    metas[1].pins = 1.0  # not an int: changing nothing, the C code hands the whole call back
    assert pin_table.pin_leading(table.index.blocks, table.index.lru, b"x" * 8, [key(0)], FP, 1.0) == []  # no such tenant
    tag = storage_key("alice", b"")
    assert pin_table.pin_leading(table.index.blocks, table.index.lru, tag, [key(0), key(1)], FP, 1.0) is NotImplemented
    assert [m.pins for m in metas] == [0, 1.0, 0, 0]
    assert pin_table.pin_leading(table.index.blocks, table.index.lru, tag, [bytearray(key(0))], FP, 1.0) is NotImplemented
    assert pin_table.host_columns([object()], Tier.HOST) is NotImplemented
    assert pin_table.unpin_blocks([metas[0], metas[1]]) is NotImplemented and metas[0].pins == 0  # checked before any change
    assert table.pin_leading("alice", FP, [key(0), key(1)]) == metas[:2]  # the method itself falls back
    assert [m.pins for m in metas] == [1, 2.0, 0, 0]


def test_distinct_keys_holds_only_when_both_of_check_keys_rules_hold():
    distinct = block_table.pin_table.distinct_keys
    keys = [key(i) for i in range(512)]
    assert distinct(keys, 16) is True and distinct(tuple(keys), 16) is True and distinct([], 16) is True
    assert distinct(keys + [key(7)], 16) is False  # named twice
    assert distinct(keys[:3] + [b"x" * 15], 16) is False and distinct([b"x" * 17], 16) is False
    assert distinct([bytearray(key(1))], 16) is False and distinct(iter(keys), 16) is False


def test_pin_found_changes_what_the_reference_changes_and_refuses_alike(both_ways):
    def run(table, metas):
        answers = []
        for keys in ([key(i) for i in range(30)], [key(i) for i in (70, 3, 71, 5)], [key(99)], []):
            missing: list[bytes] = [b"already"]
            found = table.pin_found("alice", FP, keys, missing)
            answers.append(([metas.index(m) for m in found], missing))
        with pytest.raises(FingerprintMismatchError, match=key(40).hex()):
            table.pin_found("alice", FP, [key(1), key(40), key(2)], [])
        return answers

    answers, (pins, *_) = both_ways(run, seed=8)
    assert answers[1] == ([3, 5], [b"already", key(70), key(71)]) and answers[2] == ([], [b"already", key(99)])
    assert pins[:6] == [1, 1, 1, 2, 1, 2]  # the refused call pinned nothing


def test_present_flags_what_the_reference_flags_and_changes_nothing(both_ways):
    """A flag a key: stored under the fingerprint asked (1), absent or under another fingerprint (0), another tenant's (0)."""
    names = [key(i) for i in (0, 5, 40, 41, 63, 64, 1000)] + [key(i) for i in range(64)]

    def run(table: BlockTable, metas):
        return (table.present("alice", FP, names), table.present("alice", OTHER_FP, names), table.present("bob", FP, names),
                table.present("alice", FP, []))

    ours, other, bob, empty = both_ways(run, 7)[0]
    assert ours[:7] == bytes([1, 1, 0, 0, 1, 0, 0]) and other[:7] == bytes([0, 0, 1, 1, 0, 0, 0])
    assert bob == bytes(len(names)) and empty == b""
    assert block_table.pin_table.present(dict(), b"t", [key(1), "not bytes"], FP) is NotImplemented


def test_tier_columns_are_the_placements_definition(monkeypatch):
    """HbmPlacement's per-block columns of a Pin (fastest tier, offset there) from C and from the comprehensions alike,
    for blocks with and without an HBM copy, and none at all."""
    from kvstore import hbm_placement

    table = BlockTable(Limits())
    metas = populate(table, 64, random.Random(5))
    answers = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(block_table, "pin_table", None)
        answers.append([hbm_placement.placement_columns(group) for group in (metas, metas[:1], [], [m for m in metas if Tier.HBM not in m.copies])])
    assert answers[0] == answers[1]
    tiers, offsets = answers[0][0]
    assert tiers == [Tier.HBM.value if Tier.HBM in m.copies else Tier.HOST.value for m in metas]
    assert offsets == [m.copies[Tier.HBM].offset if Tier.HBM in m.copies else 0 for m in metas]
    assert 0 < tiers.count(Tier.HBM.value) < 64 and all(type(t) is int for t in tiers)
    assert answers[0][3][0] == [Tier.HOST.value] * len(answers[0][3][0])


def test_a_deferred_touch_leaves_the_orders_as_an_immediate_one_would(both_ways):
    """pin_leading_columns(defer_touch=True) pins and answers without touching; the queued touches are applied before
    anything adds to or reads the LRU orders, so a block added after the read still comes after the blocks read,
    and the end state is the immediate touch's. A block that left the index meanwhile is skipped, not an error."""

    def run(table, metas):
        immediate = BlockTable(Limits())
        twins = populate(immediate, 64, random.Random(5))
        reads = ([key(i) for i in (5, 3, 9, 1)], [key(i) for i in range(30)], [key(12), key(13)])
        orders_before = {t: list(o) for t, o in table.index.lru.items()}
        for keys in reads:
            deferred = table.pin_leading_columns("alice", FP, keys, defer_touch=True)
            assert {t: list(o) for t, o in table.index.lru.items()} == orders_before  # answered, not moved yet
            assert immediate.pin_leading_columns("alice", FP, keys)[1] == deferred[1]
        assert table.index.pending_touch_blocks == 4 + 30 + 2
        gone = metas[3]
        table.index.remove(gone)  # left the index with its touch queued
        immediate.index.remove(twins[3])
        late = BlockMeta(storage_key("alice", key(200)), "alice", FP, 100, 7, copies={Tier.HOST: Slot(1 << 30, 100)})
        table.add(late)  # applies the queue first: the reads are older than this block
        immediate.add(BlockMeta(late.skey, "alice", FP, 100, 7, copies={Tier.HOST: Slot(1 << 30, 100)}))
        assert table.index.pending_touch_blocks == 0
        assert {t: list(o) for t, o in table.index.lru.items()} == {t: list(o) for t, o in immediate.index.lru.items()}
        assert list(table.index.lru[Tier.HOST])[-1] == late.skey
        table.pin_leading_columns("alice", FP, [key(20)], defer_touch=True)
        order = [m.skey for m in table.index.in_lru_order(Tier.HOST)]  # a reader of the order applies the queue
        assert order[-1] == storage_key("alice", key(20)) and table.index.pending_touch_blocks == 0
        return [m.last_access > 0 for m in metas]

    both_ways(run, seed=5)


def test_the_native_touch_is_the_references_and_refuses_what_it_does_not_know():
    tables = [BlockTable(Limits()), BlockTable(Limits())]
    metas = [populate(t, 64, random.Random(6)) for t in tables]
    picked = [[m[i] for i in (9, 2, 33, 2, 50)] for m in metas]
    for t, m in zip(tables, metas):
        t.index.remove(m[33])
    assert block_table.pin_table.touch(picked[0], tables[0].index.lru, 12.5) is None
    tables[1].index.touch(picked[1], 12.5)
    assert [list(o) for o in tables[0].index.lru.values()] == [list(o) for o in tables[1].index.lru.values()]
    assert [m.last_access for m in picked[0]] == [m.last_access for m in picked[1]] == [12.5] * 5
    assert block_table.pin_table.touch(tuple(picked[0]), tables[0].index.lru, 1.0) is NotImplemented
    assert block_table.pin_table.touch(picked[0] + ["x"], tables[0].index.lru, 1.0) is NotImplemented
    assert block_table.pin_table.touch(picked[0], tables[0].index.lru, 1) is NotImplemented


def test_a_touch_made_at_once_comes_after_the_ones_queued_before_it(both_ways):
    """A get's or an all-or-nothing Pin's touch (pin_found, pin_leading) applies the queued touches first: the block
    it reads ends up after the blocks a prefix Pin read before it, as the reads were answered."""

    def run(table, metas):
        table.pin_leading_columns("alice", FP, [key(i) for i in (1, 2, 3)], defer_touch=True)
        table.pin_found("alice", FP, [key(7)], [])
        table.pin_leading_columns("alice", FP, [key(4)], defer_touch=True)
        table.pin_leading("alice", FP, [key(9)])
        return [block_table.block_key(skey) for skey in list(table.index.lru[Tier.HOST])[-6:]]

    order, _ = both_ways(run, seed=3)
    assert order == [key(i) for i in (1, 2, 3, 7, 4, 9)]


def prefix_answer(table: BlockTable, metas: list[BlockMeta], keys: list[bytes], tenant: str = "alice", fp: bytes = FP):
    """pin_prefix's answer in terms both ways share: the blocks (as indices), the host columns and the HBM placement (the
    reference reads it after the walk, as the store did: placement_columns, None where no block is in HBM)."""
    from kvstore.hbm_placement import placement_columns

    run = table.pin_prefix(tenant, fp, keys, (Tier.HBM.value, Tier.HOST.value))
    placement = run.placement
    if not run.placed and run.columns is not None:
        tiers, offsets = placement_columns(run.metas)
        placement = (tiers, offsets, tiers.count(Tier.HBM.value)) if Tier.HBM.value in tiers else None
    return [metas.index(m) for m in run.metas], run.columns, placement


def test_pin_prefix_over_the_flat_rows_is_the_references_walk(both_ways):
    """The compiled walk over the flat rows pins, counts and answers what pin_leading_columns and placement_columns do:
    the run ends at a missing key, another fingerprint's block, another tenant's key space or a key of another length;
    no host copy in the run: no columns; no HBM copy: no placement; and the touches are queued alike."""

    def run(table, metas):
        assert table.index.flat is not None or block_table.pin_table is None
        answers = []
        for keys in ([key(i) for i in range(64)], [key(i) for i in (5, 3, 9, 1)], [key(i) for i in range(60, 70)],
                     [key(100)], [], [key(2)] * 3, [key(7), key(8)[:3] + key(9), key(9)], [key(i) for i in (0, 3, 6, 9, 15, 18)],
                     [key(i) for i in (1, 4, 7, 10, 13)]):
            answers.append(prefix_answer(table, metas, keys))
        answers.append(prefix_answer(table, metas, [key(1)], tenant="bob"))
        answers.append(prefix_answer(table, metas, [key(1)], fp=OTHER_FP))
        answers.append(prefix_answer(table, metas, [key(40), key(41), key(1)], fp=OTHER_FP))
        answers.append(prefix_answer(table, metas, [key(1)], fp=b"short"))
        assert table.index.pending_touch_blocks == sum(len(a[0]) for a in answers)
        table.index.flush_touches()
        return answers

    answers, (pins, lru, counters, pin_count) = both_ways(run, seed=3)
    assert [a[0] for a in answers[:3]] == [list(range(40)), [5, 3, 9, 1], list(range(60, 64))]
    assert answers[0][1] is None and answers[1][1][0] == [i * 8192 for i in (5, 3, 9, 1)]  # seed 3: some of 0..39 on ssd only
    assert answers[1][2] == ([Tier.HOST.value, Tier.HBM.value, Tier.HBM.value, Tier.HOST.value], [0, 3 * 4096, 9 * 4096, 0], 2)
    assert answers[3] == ([], ([], [], [], 0), None) and answers[6][0] == [7]
    assert answers[7][2] == ([Tier.HBM.value] * 6, [i * 4096 for i in (0, 3, 6, 9, 15, 18)], 6)  # every third block is in HBM
    assert answers[8][0] == [1, 4, 7, 10, 13] and answers[8][1] is not None and answers[8][2] is None
    assert answers[9][0] == [] and answers[10][0] == [] and answers[11][0] == [40, 41] and answers[12][0] == []
    assert pin_count == sum(pins) and counters["lookup_blocks_hit"] == sum(len(a[0]) for a in answers)


def test_a_walk_through_a_row_the_table_cannot_hold_exactly_goes_to_python():
    """A block whose host copy's fields are not ints is kept opaque: the walk through it changes nothing and answers
    NotImplemented, and the method runs the reference instead, which answers the copy's fields as they are."""
    import numpy as np

    table = BlockTable(Limits())
    metas = populate(table, 8, random.Random(1))

    class OtherSlot:
        offset, size_bytes = np.int64(1 << 20), 4096

    meta = metas[2]
    for tier in list(meta.copies):
        table.index.detach(meta, tier)
    table.index.attach(meta, Tier.HOST, OtherSlot())
    assert table.index.flat.row(meta.skey)[1] == "opaque"
    tag = storage_key("alice", b"")
    keys = [key(i) for i in range(4)]
    assert table.index.flat.pin_prefix(tag, keys, FP, None, False) is NotImplemented
    assert [m.pins for m in metas] == [0] * 8
    assert table.index.flat.pin_prefix(tag, keys[:2], FP, None, False)[0] == metas[:2]  # short of it: the compiled walk
    run = table.pin_prefix("alice", FP, keys)
    assert run.metas == metas[:4] and [m.pins for m in metas[:4]] == [2, 2, 1, 1]
    assert run.columns is None or run.columns[0][2] == 1 << 20
    assert table.index.flat.pin_prefix(tag, [bytearray(key(0))], FP, None, False) is NotImplemented  # a key of another type


def test_the_flat_rows_follow_the_index_through_every_change():
    """Thousands of blocks added, replaced, removed, given and stripped of copies at random: along the way every indexed
    block has its row and its row says what the block says (the table grows, and deletes in place)."""
    from tests.kvstore.flat_rows import flat_row_mismatches

    rng = random.Random(17)
    table = BlockTable(Limits())
    index = table.index
    live: dict[int, BlockMeta] = {}
    for step in range(15000):
        i = rng.randrange(9000)  # past one chunk of 4096 rows: rows are found across chunks
        choice = rng.random()
        meta = live.get(i)
        if meta is None or choice < 0.2:  # add, or put a new block under the same key
            copies = {Tier.HOST: Slot(rng.randrange(1 << 40), 4096)} if rng.random() < 0.8 else {Tier.SSD: Record(b"r", 1)}
            meta = BlockMeta(storage_key(rng.choice(["alice", "bob"]) if meta is None else meta.tenant, key(i)), "alice",
                             rng.choice([FP, OTHER_FP]), 4096, rng.getrandbits(64), copies=copies)
            table.add(meta)
            live[i] = meta
        elif choice < 0.45:
            index.remove(meta)
            del live[i]
        elif choice < 0.75:
            tier = rng.choice([Tier.HOST, Tier.HBM])
            if tier in meta.copies:
                index.detach(meta, tier)
            else:
                index.attach(meta, tier, Slot(rng.randrange(1 << 40), 4096))
        else:  # a copy on a tier the rows do not hold
            if Tier.SSD in meta.copies:
                index.detach(meta, Tier.SSD)
            else:
                index.attach(meta, Tier.SSD, Record(b"r", 1))
        if step % 2500 == 2499:
            assert not flat_row_mismatches(index)
    assert len(index.flat) == len(index) > 4096
    some = rng.sample(sorted(live), 200)
    for i in some:  # each is found by a walk of one key, and what it answers is its row
        meta = live[i]
        metas = index.flat.pin_prefix(meta.skey[:8], [key(i)], meta.fingerprint_id, None, False)[0]
        assert metas == [meta]


def test_the_rows_check_fails_when_a_copy_changes_behind_the_index():
    """The check every in-process test runs at its end can fail: a copy changed on the block, not through the index."""
    from tests.kvstore.flat_rows import flat_row_mismatches

    table = BlockTable(Limits())
    metas = populate(table, 4, random.Random(2))
    assert not flat_row_mismatches(table.index)
    metas[1].copies[Tier.HBM] = Slot(77, 4097)
    assert flat_row_mismatches(table.index) == [f"{metas[1].skey.hex()}: row " + repr(table.index.flat.row(metas[1].skey)[1:])
                                                + f" against the block's {row_fields_of(metas[1])}"]
    table.index.remove(metas[3])
    dict.__setitem__(table.index.blocks, metas[3].skey, metas[3])  # in the dict, not in the rows
    assert any("row missing" in p for p in flat_row_mismatches(table.index))
    del table.index.blocks[metas[3].skey]
    del metas[1].copies[Tier.HBM]
    table.index.detach(metas[1], Tier.HOST)
    table.index.attach(metas[1], Tier.HOST, Slot(1, 4097))


def row_fields_of(meta: BlockMeta) -> tuple:
    from kvstore.index import row_fields

    return row_fields(meta)[2:]


def test_indexed_blocks_leave_the_cycle_collectors_sight_and_the_index_stays_in_it():
    """A block the flat rows hold, its copies dict and its Slot and Record copies are untracked (a full collection no
    longer walks a million blocks); a copy of another type keeps itself and the dict tracked. The index's own dict and
    LRU orders are tracked from the start, so the server's freeze at start takes them (server.settle_heap)."""
    import gc

    table = BlockTable(Limits())
    assert gc.is_tracked(table.index.blocks) and all(gc.is_tracked(order) for order in table.index.lru.values())
    assert len(table.index.lru) == 3
    metas = populate(table, 8, random.Random(4))
    for meta in metas:
        assert not gc.is_tracked(meta) and not gc.is_tracked(meta.copies)
        assert not any(gc.is_tracked(copy) for copy in meta.copies.values())

    class OtherSlot:
        offset, size_bytes = 1 << 20, 4096

    table.index.attach(metas[0], Tier.HBM, OtherSlot())
    assert gc.is_tracked(metas[0].copies) and gc.is_tracked(metas[0].copies[Tier.HBM]) and not gc.is_tracked(metas[0])
    fresh = BlockMeta(storage_key("alice", key(99)), "alice", FP, 10, 1, copies={Tier.HOST: Slot(0, 10)})
    assert gc.is_tracked(fresh)  # not indexed yet
    table.add(fresh)
    assert not gc.is_tracked(fresh)
    table.index.remove(fresh)
    del fresh  # freed by its count, untracked as it is
    gc.collect()


def test_a_packed_walk_answers_the_same_values_and_pins_the_same():
    """packed (the local socket's answer, encoded at once): the columns as array('Q')s of the same values, the same
    blocks pinned and the same placement, as the lists of an unpacked walk over a twin table."""
    from array import array

    tables = [BlockTable(Limits()), BlockTable(Limits())]
    metas = [populate(t, 64, random.Random(3)) for t in tables]
    for keys in ([key(i) for i in (5, 3, 9, 1)], [key(i) for i in (0, 3, 6, 9, 15, 18)], [key(i) for i in range(64)], [key(100)], []):
        runs = [t.pin_prefix("alice", FP, keys, (Tier.HBM.value, Tier.HOST.value), packed) for t, packed in zip(tables, (False, True))]
        assert [metas[0].index(m) for m in runs[0].metas] == [metas[1].index(m) for m in runs[1].metas]
        assert runs[0].placed == runs[1].placed
        if runs[1].columns is not None:
            assert all(type(c) is array for c in runs[1].columns[:3])
            assert [list(c) for c in runs[1].columns[:3]] + [runs[1].columns[3]] == list(runs[0].columns)
        else:
            assert runs[0].columns is None
        if runs[1].placement is not None:
            assert (list(runs[1].placement[0]), list(runs[1].placement[1]), runs[1].placement[2]) == runs[0].placement
        else:
            assert runs[0].placement is None
    assert [m.pins for m in metas[0]] == [m.pins for m in metas[1]] and sum(m.pins for m in metas[1]) > 0


def test_a_walk_over_packed_keys_is_the_walk_over_their_list():
    """PackedKeys (the native Pin decoder's keys, one bytes object) walk, pin and answer as the list of the same keys does,
    over a twin table; keys of another width than a block key's end the run at once, as in a list."""
    from kvwire.keys import PackedKeys, native_keys

    tables = [BlockTable(Limits()), BlockTable(Limits())]
    metas = [populate(t, 64, random.Random(5)) for t in tables]
    for keys in ([key(i) for i in (5, 3, 9, 1)], [key(i) for i in range(64)], [key(i) for i in range(60, 70)], [key(100)],
                 [key(i) for i in (0, 3, 6, 9, 15, 18)]):
        packed = PackedKeys(b"".join(keys), 16)
        assert type(native_keys(packed)) is bytes
        runs = [t.pin_prefix("alice", FP, k, (Tier.HBM.value, Tier.HOST.value)) for t, k in zip(tables, (keys, packed))]
        assert [metas[0].index(m) for m in runs[0].metas] == [metas[1].index(m) for m in runs[1].metas]
        assert (runs[0].columns, runs[0].placement, runs[0].placed) == (runs[1].columns, runs[1].placement, runs[1].placed)
    assert [m.pins for m in metas[0]] == [m.pins for m in metas[1]] and sum(m.pins for m in metas[1]) > 0
    walked = tables[1].index.flat.pin_prefix(storage_key("alice", b""), key(0) + key(1), FP, None, False)  # the compiled walk took them
    assert walked is not NotImplemented and walked[0] == metas[1][:2]
    assert tables[1].index.flat.pin_prefix(storage_key("alice", b""), key(0) + b"x", FP, None, False) is NotImplemented
    halves = PackedKeys(key(1) + key(2), 8)  # four keys of 8 bytes: not block keys, an empty run
    assert native_keys(halves) == [key(1)[:8], key(1)[8:], key(2)[:8], key(2)[8:]]
    assert tables[1].pin_prefix("alice", FP, halves).metas == []


def test_distinct_keys_reads_packed_keys_by_their_width():
    distinct = block_table.pin_table.distinct_keys
    keys = [key(i) for i in range(512)]
    assert distinct(b"".join(keys), 16) is True and distinct(b"", 16) is True
    assert distinct(b"".join(keys + [key(300)]), 16) is False  # named twice
    assert distinct(b"".join(keys) + b"x", 16) is False  # not whole keys
    assert distinct(b"".join(keys), 0) is False
