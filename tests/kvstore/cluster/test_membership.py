"""Membership against a real etcd: join and view, incarnations, leave, expulsion of a stopped member, self-fence
when etcd goes away, and no false fence when a 3-member etcd loses its leader (docs/cluster.md C5, C10, C11)."""
from __future__ import annotations

import threading
import time

import pytest

from kvstore.cluster.etcd import EtcdClient
from kvstore.cluster.membership import FENCE_MARGIN_S, Membership, MemberSpec, NodeNameInUseError
from kvstore.cluster.view import ClusterView, MemberState
from kvstore.counters import Event
from tests.etcdproc import etcd_version, revokes_from_stale_leader
from tests.kvstore.cluster.member_proc import MemberProc
from tests.netns import Bridge, need_netns

pytestmark = pytest.mark.etcd


@pytest.fixture
def members(etcd, cluster_name):
    """members(n, ttl_s=2, endpoints=None) -> n started Memberships (n0, n1, ...), each with its own client; closed at teardown."""
    made: list[tuple[Membership, EtcdClient]] = []

    def make(name: str, ttl_s: float = 2.0, endpoints: str | None = None, host_id: str = "", start: bool = True) -> Membership:
        client = EtcdClient(endpoints or etcd.endpoints)
        m = Membership(client, cluster_name, MemberSpec(name, f"127.0.0.1:{7000 + len(made)}", host_id or f"host-{name}"), ttl_s)
        made.append((m, client))
        if start:
            m.start()
        return m

    def start_many(n: int, **kw) -> list[Membership]:
        return [make(f"n{i}", **kw) for i in range(n)]

    start_many.one = make
    yield start_many
    for m, client in made:
        m.close()
        client.close()


def sees(names: set[str]):
    return lambda view: set(view.members) == names


def test_three_members_join_and_share_one_view(members):
    ms = members(3)
    incarnations = [m.incarnation for m in ms]
    assert all(incarnations) and len(set(incarnations)) == 3
    for m in ms:
        assert m.wait_view(sees({"n0", "n1", "n2"}), 2), m.view()
        assert not m.fenced
        view = m.view()
        assert [view.incarnation_of(f"n{i}") for i in range(3)] == incarnations
        assert [p.name for p in view.peers_of(m.me.name)] == sorted({"n0", "n1", "n2"} - {m.me.name})
        assert view.members[m.me.name].grpc_address == m.me.grpc_address and view.members[m.me.name].state is MemberState.ACTIVE
    assert ms[0].counters[Event.CLUSTER_JOINS] == 1 and ms[0].counters[Event.CLUSTER_FENCES] == 0


def test_incarnations_strictly_increase_across_rejoin_and_restart(members, etcd, cluster_name):
    a, b = members(2)
    first = b.incarnation
    b.leave()
    assert b.incarnation == 0 and b.fenced
    assert a.wait_view(lambda v: "n1" not in v.members, 1)
    b2 = members.one("n1")
    assert b2.incarnation > first
    # A fast restart (the old process died, its lease has not expired) on the same host takes the name over...
    b2.close()
    b3 = members.one("n1")
    assert b3.incarnation > b2.incarnation
    assert a.wait_view(lambda v: v.incarnation_of("n1") == b3.incarnation, 1)
    assert not a.view().is_live("n1", b2.incarnation)
    # ...from another host it is refused, and the holder keeps its incarnation.
    with pytest.raises(NodeNameInUseError):
        members.one("n1", host_id="some-other-host")
    assert a.view().incarnation_of("n1") == b3.incarnation and not b3.fenced


def test_two_processes_given_one_name_do_not_take_it_from_each_other(members):
    first = members.one("n0")
    before = first.incarnation
    second = members.one("n0")  # same host id: to etcd this is a fast restart, so it takes the name over
    assert second.incarnation > before
    deadline = time.monotonic() + 2
    while not first.fenced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.fenced and first.counters[Event.CLUSTER_FENCES] == 1
    time.sleep(1.5)  # the first keeps trying to rejoin: it may take back only its own incarnation
    assert first.fenced and first.incarnation == 0
    assert not second.fenced and second.view().incarnation_of("n0") == second.incarnation
    assert second.counters[Event.CLUSTER_FENCES] == 0


def test_graceful_leave_is_seen_by_the_others_within_a_second(members):
    a, b, c = members(3)
    assert a.wait_view(sees({"n0", "n1", "n2"}), 2)
    c.drain()
    assert a.wait_view(lambda v: v.members.get("n2") is not None and v.members["n2"].state is MemberState.DRAINING, 1)
    assert a.view().incarnation_of("n2") == c.incarnation  # draining keeps the incarnation
    started = time.monotonic()
    c.leave()
    assert a.wait_view(sees({"n0", "n1"}), 1) and b.wait_view(sees({"n0", "n1"}), 1)
    assert time.monotonic() - started < 1.0
    assert c.status(lease_ttls=False).state == "left"


def test_subscribers_see_every_change_in_revision_order(members):
    a = members(1)[0]
    seen: list[ClusterView] = []
    a.subscribe(seen.append)
    b = members.one("n1")
    assert a.wait_view(sees({"n0", "n1"}), 2)  # else the join and the leave may reach a in one view change
    b.leave()
    assert a.wait_view(sees({"n0"}), 1)
    revisions = [v.revision for v in seen]
    assert revisions == sorted(revisions) and len(seen) >= 2
    assert any("n1" in v.members for v in seen) and "n1" not in seen[-1].members


def test_a_stopped_member_is_expelled_within_ttl_plus_1s_then_fences_and_rejoins(members, etcd, cluster_name):
    ttl = 2.0
    a = members(1, ttl_s=ttl)[0]
    proc = MemberProc(etcd.endpoints, cluster_name, "zombie", ttl_s=ttl)
    try:
        old = proc.wait_for("joined", 10)["incarnation"]
        assert a.wait_view(lambda v: v.incarnation_of("zombie") == old, 2)
        proc.pause()
        stopped = time.monotonic()
        assert a.wait_view(lambda v: "zombie" not in v.members, ttl + 1.5)
        gone_after = time.monotonic() - stopped
        assert gone_after <= ttl + 1.0, gone_after
        time.sleep(0.3)
        proc.resume()
        fenced = proc.wait_for("fenced", 5)
        rejoined = proc.wait_for("joined", 10, after=1)
        assert fenced["t"] <= rejoined["t"]
        assert rejoined["incarnation"] > old
        assert a.wait_view(lambda v: v.incarnation_of("zombie") == rejoined["incarnation"], 2)
        assert not a.view().is_live("zombie", old)
    finally:
        proc.stop()


def test_a_member_partitioned_from_everyone_fences_within_the_ttl_and_rejoins_after_the_heal(make_etcd, cluster_name):
    """Silent drops (connects time out, as on a dead link), not a stopped process: the member's own clock fences it."""
    need_netns()
    ttl = 2.0
    with Bridge() as bridge:
        ns = bridge.add("p")
        etcd = make_etcd(host=bridge.root_address)
        client = EtcdClient(etcd.endpoints)
        a = Membership(client, cluster_name, MemberSpec("a", "127.0.0.1:1", "host-a"), ttl)
        a.start()
        proc = MemberProc(etcd.endpoints, cluster_name, "p", ttl_s=ttl, wrap=ns.command)
        try:
            old = proc.wait_for("joined", 10)["incarnation"]
            assert a.wait_view(lambda v: v.incarnation_of("p") == old, 2)
            bridge.isolate("p")
            cut = time.monotonic()
            fenced = proc.wait_for("fenced", ttl + 1)
            assert fenced["t"] - cut <= ttl - FENCE_MARGIN_S + 0.2
            assert a.wait_view(lambda v: "p" not in v.members, ttl + 1.5)
            assert time.monotonic() - cut <= ttl + 1.0
            time.sleep(0.5)
            bridge.heal()
            healed = time.monotonic()
            rejoined = proc.wait_for("joined", 5, after=1)
            assert rejoined["incarnation"] > old
            assert a.wait_view(lambda v: v.incarnation_of("p") == rejoined["incarnation"], 5 - (time.monotonic() - healed))
        finally:
            proc.stop()
            a.close()
            client.close()


@pytest.mark.parametrize("outage", ["pause", "kill"])
def test_members_fence_before_their_lease_can_expire_when_etcd_is_gone_and_rejoin_after(make_etcd, cluster_name, outage):
    ttl = 2.0
    etcd = make_etcd()
    clients = [EtcdClient(etcd.endpoints) for _ in range(2)]
    ms = [Membership(c, cluster_name, MemberSpec(f"n{i}", f"127.0.0.1:{7100 + i}", f"host-{i}"), ttl) for i, c in enumerate(clients)]
    fenced_at: dict[str, tuple[float, float]] = {}  # name -> (when the fence fired, send time of the last acked keepalive)

    def on_fence(m: Membership) -> None:
        now = time.monotonic()
        fenced_at.setdefault(m.me.name, (now, now - m.status(lease_ttls=False).last_keepalive_age_s))

    for m in ms:
        m.on_fence(lambda m=m: on_fence(m))
        m.start()
    try:
        old = [m.incarnation for m in ms]
        time.sleep(0.5)
        member = etcd.members[0]
        member.pause() if outage == "pause" else member.kill()
        time.sleep(0.1)  # SIGSTOP lands asynchronously
        down = time.monotonic()
        deadline = down + ttl + 1
        while len(fenced_at) < len(ms) and time.monotonic() < deadline:
            time.sleep(0.01)
        for m in ms:
            assert m.fenced and m.incarnation == 0
            fired, last_ack = fenced_at[m.me.name]
            # etcd cannot expire a lease before (send time of its last acknowledged keepalive) + TTL;
            # the fence fired TTL - margin after that send (0.15 s of scheduling slack on a busy 2-core box).
            assert last_ack <= down
            assert fired - last_ack <= ttl - FENCE_MARGIN_S + 0.15, (fired - last_ack)
        time.sleep(1.0)
        member.resume() if outage == "pause" else member.start()
        back = time.monotonic()
        for m, before in zip(ms, old):
            assert m.wait_view(lambda v: True, 0)  # never blocks
            deadline = back + 10
            while m.fenced and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not m.fenced, f"{m.me.name} not rejoined 10 s after etcd returned"
            assert m.incarnation > before
        rejoin_s = time.monotonic() - back
        assert rejoin_s < 10
        for m in ms:
            assert m.wait_view(lambda v: all(v.is_live(x.me.name, x.incarnation) for x in ms), 3), m.view()
            assert m.counters[Event.CLUSTER_FENCES] == 1 and m.counters[Event.CLUSTER_JOINS] == 2
    finally:
        for m, c in zip(ms, clients):
            m.close()
            c.close()


def test_a_3_member_etcd_losing_its_leader_fences_nobody(make_etcd, cluster_name):
    """TTL 5 s (the default): keepalives move to the surviving members, and the view never loses anyone."""
    etcd = make_etcd(members=3)
    clients = [EtcdClient(etcd.endpoints) for _ in range(3)]
    ms = [Membership(c, cluster_name, MemberSpec(f"n{i}", f"127.0.0.1:{7200 + i}", f"host-{i}"), 5.0) for i, c in enumerate(clients)]
    smallest_view = [3]
    lock = threading.Lock()

    def watch_size(view: ClusterView) -> None:
        with lock:
            if len(view.members) > 0:
                smallest_view[0] = min(smallest_view[0], len(view.members))

    for m in ms:
        m.start()
    try:
        for m in ms:
            assert m.wait_view(lambda v: len(v.members) == 3, 3)
            m.subscribe(watch_size)
        incarnations = [m.incarnation for m in ms]
        leader = etcd.leader()
        leader.pause()
        time.sleep(6.0)  # past the TTL: had the leases lapsed, the members would be gone by now
        assert all(not m.fenced for m in ms)
        assert [m.incarnation for m in ms] == incarnations
        assert all(m.counters[Event.CLUSTER_FENCES] == 0 for m in ms)
        with lock:
            assert smallest_view[0] == 3  # nobody left any view while the leader was stopped
        leader.resume()
        if revokes_from_stale_leader(etcd_version()):
            # This etcd's resumed old leader may revoke the leases it saw lapse (tests/etcdproc.py): then every
            # member must be back, under a new incarnation, in every view within a second or two.
            for m in ms:
                assert m.wait_view(lambda v: all(v.is_live(x.me.name, x.incarnation) for x in ms), 3)
            return
        time.sleep(0.5)
        assert [m.incarnation for m in ms] == incarnations
        assert all(m.counters[Event.CLUSTER_FENCES] == 0 for m in ms)
        assert smallest_view[0] == 3
        for m in ms:
            assert all(m.view().is_live(x.me.name, x.incarnation) for x in ms)
    finally:
        for m, c in zip(ms, clients):
            m.close()
            c.close()


def test_status_reports_members_and_the_fence_clock(members):
    a, b = members(2, ttl_s=3.0)
    assert a.wait_view(sees({"n0", "n1"}), 2)
    s = a.status()
    assert (s.name, s.incarnation, s.state, s.fenced) == ("n0", a.incarnation, "active", False)
    assert 0 <= s.last_keepalive_age_s < 1.5 and 0 < s.fence_in_s <= 3.0 - FENCE_MARGIN_S
    assert [(m.name, m.incarnation) for m in s.members] == [("n0", a.incarnation), ("n1", b.incarnation)]
    assert all(0 < m.lease_ttl_left_s <= 3 for m in s.members)
    assert s.counters["cluster_joins"] == 1
