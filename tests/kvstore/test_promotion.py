"""The promotion policy in process: what makes a block hot (recent hits), in which order hot blocks go (prefix
position), which HBM copies may give way, and that the read history stays cheap to feed and bounded."""
from __future__ import annotations

from kvstore.index import BlockMeta
from kvstore.promotion import MAX_PENDING_READS, PromotionPolicy, ReadHistory
from kvwire.types import Slot, Tier

FP = b"f" * 16


def block(i: int, size: int = 4096) -> BlockMeta:
    return BlockMeta(b"t" * 8 + i.to_bytes(16, "big"), "t", FP, size, 0)


def read(history: ReadHistory, metas: list[BlockMeta], at: float) -> None:
    history.note(metas, now=at)


def test_a_block_is_hot_once_read_min_hits_times_within_the_window():
    policy = PromotionPolicy(min_hits=2, window_s=10)
    history = policy.history()
    a, b, c = block(1), block(2), block(3)
    read(history, [a, b, c], at=100.0)
    read(history, [a], at=105.0)
    read(history, [b], at=111.0)  # b's two reads are 11 s apart: not within the window
    history.fold()
    heat = {h.meta.key: h for h in history}
    assert policy.is_hot(heat[a.key], now=106.0)
    assert not policy.is_hot(heat[b.key], now=111.0)
    assert not policy.is_hot(heat[c.key], now=106.0)  # one read is what every prompt costs
    assert not policy.is_hot(heat[a.key], now=116.0)  # its first counted read left the window
    read(history, [b], at=112.0)
    history.fold()
    assert policy.is_hot(history.get(b), now=112.0)  # the last min_hits reads count, not all of them


def test_hot_blocks_go_shallowest_first_then_most_recent():
    policy = PromotionPolicy(min_hits=2, window_s=60)
    history = policy.history()
    chain_a = [block(i) for i in range(4)]
    chain_b = [block(10 + i) for i in range(4)]
    for at in (1.0, 2.0):
        read(history, chain_a, at)
    for at in (3.0, 4.0):
        read(history, chain_b[2:], at)  # b's blocks 2 and 3 were read as positions 0 and 1 of their chain
    history.fold()
    ranked = [h.meta for h in policy.ranked(history, now=5.0)]
    assert ranked == [chain_b[2], chain_a[0], chain_b[3], chain_a[1], chain_a[2], chain_a[3]]
    # A block read deep in one chain and shallow in another keeps the shallowest position.
    read(history, [chain_a[3]], at=6.0)
    history.fold()
    assert history.get(chain_a[3]).position == 0


def test_candidates_are_ranked_up_to_the_batch():
    policy = PromotionPolicy(min_hits=2, window_s=60, batch_bytes=3 * 4096, batch_blocks=8)
    history = policy.history()
    metas = [block(i) for i in range(6)]
    for at in (1.0, 2.0):
        read(history, metas, at)
    touched = history.fold()
    assert [h.meta for h in touched] == metas  # each block once, however often it was read
    chosen = policy.candidates(touched[1:], now=3.0)
    assert [h.meta for h in chosen] == metas[1:4]  # three blocks' bytes
    few = PromotionPolicy(min_hits=2, window_s=60, batch_blocks=2)
    assert [h.meta for h in few.candidates(touched, now=3.0)] == metas[:2]  # a batch holds the store lock briefly


def test_only_copies_not_read_lately_or_deeper_ones_give_way():
    policy = PromotionPolicy(min_hits=2, window_s=60)
    history = policy.history()
    incoming = block(4)
    for at in (1.0, 2.0):
        read(history, [block(0), incoming], at)  # incoming sits at position 1 of its prompt
    history.fold()
    heat = history.get(incoming)
    resident = block(1)
    resident.last_access = 100.0  # read 50 s before now: within the window
    assert policy.may_displace(heat, resident, resident_position=2, now=150.0)  # deeper
    assert not policy.may_displace(heat, resident, resident_position=1, now=150.0)  # equals never take turns
    assert not policy.may_displace(heat, resident, resident_position=0, now=150.0)
    assert not policy.may_displace(heat, resident, resident_position=None, now=150.0)  # forgotten: stays while read
    assert policy.may_displace(heat, resident, resident_position=0, now=161.0)  # not read within the window


def test_reads_of_resident_blocks_are_not_folded_and_their_positions_are_kept():
    policy = PromotionPolicy(min_hits=2, window_s=10)
    history = policy.history()
    resident, other = block(1), block(2)
    read(history, [resident, other], at=1.0)
    history.fold()
    resident.copies[Tier.HBM] = Slot(0, 4096)
    read(history, [other, resident], at=2.0)  # a hot prefix names its resident blocks on every load
    assert [h.meta for h in history.fold(skip_tier=Tier.HBM)] == [other]
    assert list(history.get(resident).reads) == [1.0] and history.get(resident).position == 0
    history.prune(now=30.0, window_s=10, keep_tier=Tier.HBM)
    assert [h.meta for h in history] == [resident]  # where it was promoted from still counts


def test_history_forgets_old_and_deleted_blocks_and_a_new_block_under_an_old_key():
    policy = PromotionPolicy(min_hits=2, window_s=10)
    history = policy.history()
    old, gone, kept = block(1), block(2), block(3)
    read(history, [old, gone, kept], at=1.0)
    read(history, [kept], at=9.0)
    history.fold()
    gone.deleted = True
    history.prune(now=12.0, window_s=10)
    assert {h.meta.key for h in history} == {kept.key}
    again = block(3)  # kept deleted and put again: a new block, with no reads yet
    read(history, [again], at=10.0)
    history.fold()
    assert history.get(kept) is None and len(history.get(again).reads) == 1


def test_noting_a_read_is_one_append_and_memory_is_bounded():
    history = ReadHistory(keep_reads=2, max_blocks=100)
    metas = [block(i) for i in range(512)]
    history.note(metas, now=1.0)  # a 512-key prefix Pin: no per-key work on the request thread
    assert len(history._events) == 1
    history.fold()
    assert len(history) == 100 and not history._events
    assert [h.meta for h in history] == metas[-100:]  # the most recently read are kept
    for _ in range(MAX_PENDING_READS + 10):
        history.note(metas[:1], now=2.0)
    assert len(history._events) == MAX_PENDING_READS  # a stalled worker does not grow memory without bound
