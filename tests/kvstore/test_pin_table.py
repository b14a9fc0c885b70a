"""kvstore._native (the prefix Pin's per-key bookkeeping in C) against block_table's Python definition:
two tables given the same blocks and the same calls end in the same state, pin counts, LRU order,
counters and answers alike."""
from __future__ import annotations

import random

import pytest

from kvwire import native as native_selection
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
def reference(monkeypatch):
    """Run block_table's Python definition in this test."""

    def python_only():
        monkeypatch.setattr(block_table, "pin_table", None)

    def native_again():
        monkeypatch.undo()

    return python_only, native_again


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def populate(table: BlockTable, n: int, rng: random.Random) -> list[BlockMeta]:
    metas = []
    for i in range(n):
        skey = storage_key("alice", key(i))
        copies = {Tier.HOST: Slot(i * 8192, 4096 + i)}
        if rng.random() < 0.3:
            copies[Tier.SSD] = Record(skey, 4096 + i)
        if rng.random() < 0.1:
            copies = {Tier.SSD: Record(skey, 4096 + i)}
        meta = BlockMeta(skey, "alice", OTHER_FP if i in (40, 41) else FP, 4096 + i, rng.getrandbits(64), copies=copies)
        table.add(meta)
        metas.append(meta)
    return metas


def state(table: BlockTable, metas: list[BlockMeta]):
    return ([m.pins for m in metas], {t: list(order) for t, order in table.index.lru.items()}, dict(table.counters), table.pin_count)


def test_pin_leading_changes_what_the_reference_changes(reference):
    python_only, native_again = reference
    ends = []
    for use_native in (True, False):
        (native_again if use_native else python_only)()
        assert (block_table.pin_table is not None) == use_native
        table, rng = BlockTable(Limits()), random.Random(3)
        metas = populate(table, 64, rng)
        answers = []
        for keys in ([key(i) for i in range(64)],  # stops at block 40, of another fingerprint
                     [key(i) for i in (5, 3, 9, 1)],
                     [key(i) for i in range(60, 70)],  # the run reaches past the last block
                     [key(100)], [], [key(2)] * 3):
            before = [m.last_access for m in metas]
            found = table.pin_leading("alice", FP, keys)
            answers.append([metas.index(m) for m in found])
            assert all(m.last_access > b for m, b in zip(found, before)) or not found
        answers.append(table.pin_leading("bob", FP, [key(1)]))  # another tenant's key space
        ends.append((answers, state(table, metas)))
    assert ends[0] == ends[1]
    answers, (pins, lru, counters, pin_count) = ends[0]
    assert answers[:3] == [list(range(40)), [5, 3, 9, 1], list(range(60, 64))] and answers[3:] == [[], [], [2, 2, 2], []]
    assert pin_count == sum(pins) == 40 + 4 + 4 + 3
    touched_last = storage_key("alice", key(2))
    assert len(lru) == 2 and all((order[-1] == touched_last) == (order.count(touched_last) == 1) for order in lru.values())


def test_host_columns_are_the_references_and_none_without_a_host_copy(reference):
    python_only, native_again = reference
    table = BlockTable(Limits())
    metas = populate(table, 64, random.Random(4))
    on_host = [m for m in metas if Tier.HOST in m.copies]
    got = host_columns(on_host)
    assert got[0] == [m.copies[Tier.HOST].offset for m in on_host] and got[2] == [m.checksum for m in on_host]
    assert host_columns(metas) is None and host_columns([]) == ([], [], [])
    python_only()
    assert host_columns(on_host) == got and host_columns(metas) is None


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
    assert table.pin_leading("alice", FP, [key(0), key(1)]) == metas[:2]  # the method itself falls back
    assert [m.pins for m in metas] == [1, 2.0, 0, 0]
