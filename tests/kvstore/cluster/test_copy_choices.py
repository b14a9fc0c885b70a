"""The pure parts of copies between nodes, in process: copy groups, the rate cap, eviction ranks."""
from __future__ import annotations

from kvstore.cluster.replicator import GROUP_MAX_KEYS, RateCap, group_blocks
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
