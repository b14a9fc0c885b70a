"""Hot keys in process: the decayed count-min sketch, a home's holder order by load and its pushes, the reader's
two choices, and the wire keeping the home's order (design/cluster.md §3.10)."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import numpy as np
import pytest

from kvstore.cluster.directory import BlockRef, DirectoryShard, Rendezvous, key_words
from kvstore.cluster.holder_choice import ReaderLoad
from kvstore.cluster.hot import HotPush, HotSpread
from kvstore.cluster.peer_service import locate_response
from kvstore.cluster.peers import located
from kvstore.cluster.sketch import DecayedCountMin
from kvstore.cluster.transfer_cap import PeerTransfers
from kvwire.errors import PeerBusyError

FP = b"f" * 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def skeys(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(24) for _ in range(n)]


# ---- the sketch --------------------------------------------------------------------------

def test_sketch_counts_never_under_and_rarely_over() -> None:
    sketch = DecayedCountMin(half_life_s=10, clock=Clock())
    keys = key_words(skeys(2000))
    truth = np.random.default_rng(1).integers(1, 20, len(keys))
    for count in range(1, 20):
        sketch.add(keys[truth >= count])
    est = sketch.estimate(keys)
    assert (est >= truth).all()
    assert (est == truth).mean() > 0.95  # 2000 keys in 4 x 4096 counters: collisions in every row are rare


def test_sketch_add_returns_the_estimate_and_counts_repeats_in_one_batch() -> None:
    sketch = DecayedCountMin(half_life_s=10, clock=Clock())
    word = key_words(skeys(1))
    assert sketch.add(np.concatenate([word, word, word])).tolist() == [3, 3, 3]
    assert sketch.add(word, weight=2).tolist() == [5]


def test_sketch_decays_by_half_each_half_life() -> None:
    clock = Clock()
    sketch = DecayedCountMin(half_life_s=10, clock=clock)
    word = key_words(skeys(1))
    sketch.add(word, weight=64)
    clock.now += 10
    assert sketch.estimate(word)[0] == pytest.approx(32)
    clock.now += 30
    assert sketch.estimate(word)[0] == pytest.approx(4)
    clock.now += 0.1  # under a sixteenth of a half-life: not applied yet, applied later in full
    assert sketch.estimate(word)[0] == pytest.approx(4)
    clock.now += 0.6
    assert sketch.estimate(word)[0] == pytest.approx(4 * 0.5 ** 0.07)


def test_sketch_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError):
        DecayedCountMin(half_life_s=10, width=1000)
    with pytest.raises(ValueError):
        DecayedCountMin(half_life_s=0)


# ---- a home's answers ----------------------------------------------------------------------

def shard_with(keys: list[bytes], holders: list[tuple[str, int]], size: int = 100) -> DirectoryShard:
    shard = DirectoryShard()
    for holder in holders:
        shard.resync(holder, 1, [BlockRef(k, FP, size, 7) for k in keys])
    return shard


def test_a_home_sends_each_new_reader_to_the_least_loaded_holder() -> None:
    """Readers one after another: each new copy is named first to the next reader (a chain, not a star)."""
    keys = skeys(8)
    a, b, c = ("a", 1), ("b", 1), ("c", 1)
    shard = shard_with(keys, [a])
    hot = HotSpread("a", shard, lambda: Rendezvous("abcd"), Counter(), threshold=0, replicas=3, push=print, clock=Clock())
    live = {a, b, c}
    found, order = hot.answer(FP, keys, live)
    assert set(found.holders) == {(a,)} and order == [a]
    shard.resync(b, 1, [BlockRef(k, FP, 100, 7) for k in keys])  # the first reader's copy, announced
    found, order = hot.answer(FP, keys, live)
    assert set(found.holders) == {(b, a)} and order == [b, a]
    shard.resync(c, 1, [BlockRef(k, FP, 100, 7) for k in keys])
    found, _ = hot.answer(FP, keys, live)
    assert set(found.holders) == {(c, b, a)}  # a and b served as much: the newer copy first
    assert hot.load.of(a) == hot.load.of(b) == hot.load.of(c) == 800
    hot.close()
    # A home that answered none of those readers (each asks one home per key) still names the newest copy first.
    fresh = HotSpread("a", shard, lambda: Rendezvous("abcd"), Counter(), threshold=0, replicas=3, push=print, clock=Clock())
    assert set(fresh.answer(FP, keys, live)[0].holders) == {(c, b, a)}
    fresh.load.add(c, 1000)
    assert set(fresh.answer(FP, keys, live)[0].holders) == {(b, a, c)}
    fresh.close()


def test_the_wire_keeps_the_homes_order() -> None:
    keys = skeys(6)
    a, b, c = ("a", 1), ("b", 1), ("c", 1)
    shard = shard_with(keys[:3], [a])
    shard.resync(c, 1, [BlockRef(k, FP, 100, 7) for k in keys[3:]])
    shard.resync(b, 1, [BlockRef(k, FP, 100, 7) for k in keys])
    hot = HotSpread("a", shard, lambda: Rendezvous("abc"), Counter(), threshold=0, replicas=3, push=print)
    hot.load.add(b, 10_000)  # b is the busiest: named last wherever it holds
    found, order = hot.answer(FP, keys, {a, b, c})
    decoded = located(locate_response(found, order))
    assert decoded.holders == found.holders
    assert decoded.holders[0] == (a, b) and decoded.holders[5] == (c, b)
    hot.close()


def first_homed_at(ring: Rendezvous, name: str, n: int, seed: int) -> list[bytes]:
    """n storage keys whose first home on ring is name."""
    pool = skeys(40 * n, seed)
    first = ring.homes(pool, count=1)[:, 0] == ring.names.index(name)
    return [k for k, mine in zip(pool, first.tolist()) if mine][:n]


def test_a_key_past_the_threshold_is_pushed_to_more_nodes_once_and_a_prefix_stays_together() -> None:
    a = ("a", 1)
    ring = Rendezvous(["a", "b", "c", "d"])
    keys = first_homed_at(ring, "a", 4, seed=3)
    shard = shard_with(keys, [a], size=1000)
    pushes: list[HotPush] = []
    done = threading.Event()

    def push(p: HotPush) -> None:
        pushes.append(p)
        if len(pushes) == 2:
            done.set()

    counters: Counter = Counter()
    clock = Clock()
    hot = HotSpread("a", shard, lambda: ring, counters, threshold=3, replicas=3, push=push, clock=clock)
    for _ in range(2):
        hot.answer(FP, keys, {a})
    time.sleep(0.05)
    assert pushes == []  # under the threshold
    hot.answer(FP, keys, {a})
    assert done.wait(5)
    targets = {p.target for p in pushes}
    assert len(targets) == 2 and "a" not in targets  # two more nodes: three holders in all
    assert all(p.source == a and p.skeys == tuple(keys) and p.size_bytes == 4000 for p in pushes)
    assert counters["directory_hot_pushes"] == 2
    # Another home's run of the same prefix (other keys, the same fingerprint and holders) goes to the same nodes.
    other_keys = first_homed_at(ring, "b", 4, seed=5)
    other = HotSpread("b", shard_with(other_keys, [a], size=1000), lambda: ring, Counter(), threshold=1, replicas=3, push=push, clock=clock)
    done.clear()
    other.answer(FP, other_keys, {a})
    deadline = time.monotonic() + 5
    while len(pushes) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {p.target for p in pushes[2:]} == targets
    other.close()
    for _ in range(5):  # still hot: not pushed again while the copies are on their way
        hot.answer(FP, keys, {a})
    time.sleep(0.05)
    assert len(pushes) == 4  # the two above, and the other home's two
    hot.close()


def test_no_push_with_enough_holders_pushes_off_at_a_second_home_or_while_the_view_settles() -> None:
    ring = Rendezvous("abcd")
    keys = first_homed_at(ring, "a", 2, seed=4)
    holders = [("a", 1), ("b", 1), ("c", 1)]
    pushes: list[HotPush] = []
    cases = [("a", 1, 3, holders, False), ("a", 0, 3, holders[:1], False), ("a", 1, 1, holders[:1], False),
             ("b", 1, 3, holders[:1], False),  # b may be a home of these keys, never their first
             ("a", 1, 3, holders[:1], True)]
    for me, threshold, replicas, held, settling in cases:
        hot = HotSpread(me, shard_with(keys, held), lambda: ring, Counter(), threshold, replicas, push=pushes.append,
                        settling=lambda s=settling: s)
        for _ in range(5):
            hot.answer(FP, keys, set(holders))
        hot.close()
    time.sleep(0.05)
    assert pushes == []
    hot = HotSpread("a", shard_with(keys, holders[:1]), lambda: ring, Counter(), 1, 3, push=pushes.append)
    hot.answer(FP, keys, set(holders))
    deadline = time.monotonic() + 5
    while len(pushes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    hot.close()
    assert len(pushes) == 2  # the same keys, at their first home, settled: pushed


# ---- the reader's two choices ---------------------------------------------------------------

def test_a_reader_takes_the_directorys_first_unless_it_knows_better() -> None:
    a, b, c = ("a", 1), ("b", 1), ("c", 1)
    load = ReaderLoad(random.Random(0))
    assert {load.choose([a, b, c]) for _ in range(50)} == {a}  # nothing known: the home's order
    with load.transfer(a):
        picks = Counter(load.choose([a, b, c]) for _ in range(200))
        assert picks[a] == 0 and picks[b] > 50 and picks[c] > 50  # a transfer in flight to a: the other choice
    with load.transfer(a) as moved:
        moved.append(1 << 20)
    load._peers[a].s_per_mib = 1.0
    load._peers[b].s_per_mib = 0.1
    assert load.choose([a, b]) == b  # far faster
    load._peers[b].s_per_mib = 0.8
    assert load.choose([a, b]) == a  # not enough to leave the home's order


def test_reader_load_tracks_inflight_and_an_ewma_per_mib() -> None:
    a = ("a", 1)
    load = ReaderLoad()
    with load.transfer(a) as moved:
        assert load._peers[a].inflight == 1
        time.sleep(0.02)
        moved.append(4 << 20)
    first = load._peers[a].s_per_mib
    assert load._peers[a].inflight == 0 and 0.004 < first < 0.05
    with load.transfer(a):  # moved nothing: no sample
        pass
    assert load._peers[a].s_per_mib == first


# ---- the holder's cap --------------------------------------------------------------------------

def test_transfer_cap_refuses_past_the_limit_and_counts_what_was_served() -> None:
    counters: Counter = Counter()
    per_peer: Counter = Counter()
    cap = PeerTransfers("h", 2, counters, lambda peer, n: per_peer.update({peer: n}))
    with cap.slot("r1") as served1, cap.slot("r2"):
        with pytest.raises(PeerBusyError) as err:
            with cap.slot("r3"):
                pass
        assert err.value.status == "RESOURCE_EXHAUSTED"
        served1(3, 300)
    with cap.slot("r3"):  # slots came back
        assert cap.inflight == 1
    assert cap.inflight == 0
    assert counters["peer_rejected_busy"] == 1 and counters["peer_served_blocks"] == 3 and counters["peer_served_bytes"] == 300
    assert per_peer == {"r1": 300}
