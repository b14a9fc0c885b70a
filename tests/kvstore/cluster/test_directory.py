"""The directory's data structures in process: rendezvous homes, and a home's shard (announces, gaps, resync, repair, liveness)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from kvstore.cluster.directory import HOMES, BlockRef, DirectoryShard, Rendezvous, key_words

FP = b"f" * 16


def skeys(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(24) for _ in range(n)]


def ref(skey: bytes, size: int = 100) -> BlockRef:
    return BlockRef(skey, FP, size, size * 7)


def reference_homes(names: list[str], skey: bytes) -> list[str]:
    """The definition, one key at a time in plain Python: the vectorised version must agree with it."""
    import xxhash

    mask = (1 << 64) - 1
    word = int(key_words([skey])[0])

    def mix(x: int) -> int:
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    scores = {n: mix(word ^ xxhash.xxh64_intdigest(n.encode())) for n in names}
    return sorted(names, key=lambda n: (-scores[n], n))[:HOMES]


def test_vectorised_homes_match_the_per_key_definition() -> None:
    names = [f"node-{i}" for i in range(7)]
    ring = Rendezvous(names)
    keys = skeys(300)
    homes = ring.homes(keys)
    assert homes.shape == (300, 2)
    for key, row in zip(keys, homes.tolist()):
        assert [ring.names[h] for h in row] == reference_homes(names, key)


def test_homes_are_balanced_and_move_little_when_a_member_leaves() -> None:
    names = [f"n{i}" for i in range(8)]
    keys = skeys(8000, seed=1)
    before = Rendezvous(names).homes_by_node(keys)
    load = Counter({n: len(p) for n, p in before.items()})
    assert min(load.values()) > 0.8 * 2 * 8000 / 8 and max(load.values()) < 1.2 * 2 * 8000 / 8
    after = Rendezvous(names[:-1]).homes_by_node(keys)
    # Only the departed member's keys get a new home; everyone else keeps what it had.
    for name in names[:-1]:
        assert set(before[name]) <= set(after[name])
    moved = sum(len(set(after[n]) - set(before[n])) for n in names[:-1])
    assert moved == len(before[names[-1]])


def test_small_rings() -> None:
    keys = skeys(10)
    assert Rendezvous([]).homes_by_node(keys) == {}
    one = Rendezvous(["solo"])
    assert one.homes(keys).shape == (10, 1)
    assert one.homes_by_node(keys) == {"solo": list(range(10))}
    assert Rendezvous(["a", "b"]).is_home("a", keys).all()
    assert not Rendezvous(["a", "b"]).is_home("c", keys).any()


def live(*holders: tuple[str, int]) -> frozenset:
    return frozenset(holders)


def test_announces_apply_in_sequence_and_a_gap_asks_for_resync() -> None:
    shard = DirectoryShard()
    a, b = skeys(2)
    holder = ("A", 10)
    assert shard.announce(holder, 1, [ref(a)], []).applied
    assert shard.announce(holder, 2, [ref(b)], []).applied
    result = shard.announce(holder, 4, [], [a])  # batch 3 was lost
    assert not result.applied and result.expected_sequence == 3
    assert [i for i, _ in shard.locate(FP, [a, b], live(holder))] == [0, 1]  # nothing of batch 4 applied
    # A holder incarnation the home never heard from, past batch 1 (the home restarted): resync too.
    assert not shard.announce(("B", 11), 5, [ref(a)], []).applied
    assert shard.resync(holder, 7, [ref(b)]) == 1
    assert [i for i, _ in shard.locate(FP, [a, b], live(holder))] == [1]
    assert shard.announce(holder, 7, [], [b]).applied
    assert shard.locate(FP, [a, b], live(holder)) == []
    assert len(shard) == 0 and shard.holders == 0


def test_locate_filters_dead_incarnations_and_other_fingerprints() -> None:
    shard = DirectoryShard()
    (k,) = skeys(1)
    shard.announce(("A", 1), 1, [ref(k)], [])
    shard.announce(("B", 2), 1, [ref(k)], [])
    [(i, where)] = shard.locate(FP, [k], live(("A", 1), ("B", 2)))
    assert i == 0 and set(where.holders) == {("A", 1), ("B", 2)} and where.size == 100
    # A restarted: its old incarnation is not live, so its entry no longer counts, and is pruned.
    [(_, where)] = shard.locate(FP, [k], live(("A", 3), ("B", 2)))
    assert where.holders == (("B", 2),)
    assert shard.holders == 1
    assert shard.locate(b"g" * 16, [k], live(("B", 2))) == []  # stored under another fingerprint: not this block


def test_repair_removes_one_holder_claim() -> None:
    shard = DirectoryShard()
    k1, k2 = skeys(2)
    shard.announce(("A", 1), 1, [ref(k1), ref(k2)], [])
    shard.announce(("B", 1), 1, [ref(k1)], [])
    assert shard.repair(("A", 1), [k1]) == 1
    assert shard.repair(("A", 1), [k1]) == 0
    alive = live(("A", 1), ("B", 1))
    assert {i: w.holders for i, w in shard.locate(FP, [k1, k2], alive)} == {0: (("B", 1),), 1: (("A", 1),)}


def test_view_changes_drop_dead_holders_and_keys_homed_elsewhere() -> None:
    shard = DirectoryShard()
    keys = skeys(200, seed=3)
    shard.announce(("A", 1), 1, [ref(k) for k in keys], [])
    shard.announce(("B", 2), 1, [ref(k) for k in keys[:10]], [])
    assert shard.forget_dead(live(("A", 1))) == 1
    assert shard.holders == 1
    ring = Rendezvous(["me", "x", "y", "z"])
    dropped = shard.keep_homed(lambda ks: ring.is_home("me", ks))
    mine = ring.is_home("me", keys)
    assert dropped == int((~mine).sum()) and len(shard) == int(mine.sum())
    shard.clear()
    assert len(shard) == 0


def test_locate_columns_share_holder_sets_and_agree_with_the_per_key_answer() -> None:
    """The columns a Locate is answered from: one holder tuple object per holder set (a home checks each set
    against the view once a call), rows equal to a per-key reading of the shard, dead holders pruned once
    even when a request names a key twice."""
    shard = DirectoryShard()
    keys = skeys(40, seed=5)
    shard.announce(("A", 1), 1, [ref(k) for k in keys[:30]], [])
    shard.announce(("B", 2), 1, [ref(k) for k in keys[10:20]], [])
    shard.announce(("C", 3), 1, [ref(k) for k in keys[15:25]], [])
    asked = keys[::-1] + keys[12:14]  # unknown keys in between, two named twice
    found = shard.locate_columns(FP, asked, live(("A", 1), ("B", 2)))
    per_key = []
    for i, k in enumerate(asked):
        holders = tuple(h for h, lo, hi in ((("A", 1), 0, 30), (("B", 2), 10, 20)) if lo <= keys.index(k) < hi)
        if holders:
            per_key.append((i, 100, 700, holders))
    assert list(zip(*found)) == per_key
    assert len({id(h) for h in found.holders}) == len(set(found.holders)) == 2
    assert shard.holders == 2  # C's claims went with the call that found it dead
    assert shard.locate(FP, asked[10:11], live(("A", 1))) == [(0, found.rows()[0][1])]
