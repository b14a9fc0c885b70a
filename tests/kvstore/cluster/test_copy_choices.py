"""The pure parts of copies between nodes, in process: copy groups, the rate cap, eviction ranks, target choices."""
from __future__ import annotations

import random
from collections import Counter

from kvstore.cluster.replicas import replica_targets
from kvstore.cluster.replicator import GROUP_MAX_KEYS, RateCap, group_blocks
from kvstore.cluster.spill import PeerRoom, choose_target
from kvstore.cluster.view import ClusterView, Member, MemberState
from kvstore.eviction import keep_rank, ranked
from kvstore.index import BlockMeta, Origin


def test_groups_split_by_tenant_fingerprint_and_size_in_order_met() -> None:
    rows = [(b"a%d" % i, "t1", b"f1", 6, i) for i in range(5)] + [(b"b0", "t2", b"f1", 1, 9), (b"a9", "t1", b"f1", 6, 7)]
    groups = group_blocks(rows, max_bytes=12)
    assert [(g.tenant, g.skeys) for g in groups] == [
        ("t1", (b"a0", b"a1")), ("t1", (b"a2", b"a3")), ("t1", (b"a4", b"a9")), ("t2", (b"b0",))]
    assert groups[0].sizes == (6, 6) and groups[0].checksums == (0, 1) and groups[0].bytes == 12
    one_too_big = group_blocks([(b"x", "t", b"f", 100, 0)], max_bytes=12)  # a block larger than a group still goes, alone
    assert [g.skeys for g in one_too_big] == [(b"x",)]
    many = group_blocks([(b"k%d" % i, "t", b"f", 0, 0) for i in range(GROUP_MAX_KEYS + 1)])
    assert [len(g.skeys) for g in many] == [GROUP_MAX_KEYS, 1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_rate_cap_holds_the_long_run_rate_after_one_burst() -> None:
    clock = FakeClock()
    cap = RateCap(100.0, burst_bytes=50, clock=clock, sleep=clock.sleep)
    assert cap.take(50) == 0  # the burst
    for _ in range(10):
        cap.take(25)
    assert abs(clock.now - 2.5) < 1e-9  # 250 bytes past the burst at 100 B/s
    clock.now += 10  # idle: the bucket refills to its burst, no more
    start = clock.now
    cap.take(50)
    cap.take(50)
    assert abs(clock.now - start - 0.5) < 1e-9
    start = clock.now
    cap.take(500)  # larger than the burst: waits for a full bucket, then leaves the debt for the next
    cap.take(1)
    assert clock.now - start >= 4.5


def meta(origin: Origin = Origin.LOCAL, elsewhere: bool = False, name: bytes = b"") -> BlockMeta:
    return BlockMeta(name or b"k", "t", b"f", 1, 0, origin=origin, elsewhere=elsewhere)


def test_eviction_takes_read_through_copies_then_blocks_held_elsewhere_then_sole_copies() -> None:
    assert keep_rank(meta(Origin.COPY)) == 0
    assert keep_rank(meta(Origin.REPLICA)) == keep_rank(meta(Origin.LOCAL, elsewhere=True)) == 1
    assert keep_rank(meta(Origin.LOCAL)) == keep_rank(meta(Origin.SPILL)) == keep_rank(meta(Origin.HANDOFF)) == 2
    lru = [meta(Origin.LOCAL, name=b"sole1"), meta(Origin.REPLICA, name=b"rep1"), meta(Origin.COPY, name=b"copy1"),
           meta(Origin.SPILL, name=b"sole2"), meta(Origin.LOCAL, True, name=b"rep2"), meta(Origin.COPY, name=b"copy2")]
    assert [m.skey for m in ranked(lru)] == [b"copy1", b"copy2", b"rep1", b"rep2", b"sole1", b"sole2"]
    # Only the coldest `window` blocks are ranked; the rest follow in LRU order.
    assert [m.skey for m in ranked(lru, window=3)] == [b"copy1", b"rep1", b"sole1", b"sole2", b"rep2", b"copy2"]


def test_spill_target_capacity_weighted_power_of_two_choices() -> None:
    rng = random.Random(7)
    # No room (past the high watermark with the run): never chosen; none left: None.
    full = PeerRoom("full", 100, 12)
    assert choose_target([full], 5, 0.9, rng) is None
    assert choose_target([full, PeerRoom("ok", 100, 50)], 5, 0.9, rng) == "ok"
    # Two with room: the larger free fraction wins, whatever the draw.
    assert {choose_target([PeerRoom("a", 100, 90), PeerRoom("b", 100, 20)], 1, 0.9, rng) for _ in range(200)} == {"a"}
    # Three: the fullest loses to either other, so it is never chosen.
    three = [PeerRoom("x", 100, 80), PeerRoom("y", 100, 60), PeerRoom("z", 100, 40)]
    picks = Counter(choose_target(three, 1, 0.9, rng) for _ in range(3000))
    assert picks["z"] == 0 and picks["x"] > picks["y"] > 0
    # Equal free fractions: draws go by capacity, so a node twice as big is chosen about twice as often.
    picks = Counter(choose_target([PeerRoom("big", 200, 100), PeerRoom("small", 100, 50)], 1, 0.9, rng) for _ in range(3000))
    assert 0.6 < picks["big"] / 3000 < 0.73


def test_replica_targets_skip_this_node_draining_members_and_holders() -> None:
    members = {n: Member(n, i + 1, f"h:{i}", n, state=MemberState.DRAINING if n == "d" else MemberState.ACTIVE)
               for i, n in enumerate(["a", "b", "c", "d", "e"])}
    view = ClusterView(7, members)
    for i in range(50):
        skey = bytes([i]) * 24
        two = replica_targets(view, "a", skey, 2)
        assert len(two) == 2 and not {"a", "d"} & set(two)
        assert replica_targets(view, "a", skey, 1) == two[:1]  # the same ranking: the first is the first of two
        assert replica_targets(view, "", skey, 1, exclude=two[:1]) != two[:1]
    assert replica_targets(ClusterView(1, {"a": members["a"]}), "a", b"k" * 24, 1) == []
