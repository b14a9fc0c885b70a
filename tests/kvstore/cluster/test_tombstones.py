"""Tombstones against a real etcd: every member applies and acknowledges a delete, a member that was away
replays it before it rejoins and wait_acks names it meanwhile, trimmed tombstones make a late node wipe its
SSD tier (etcd's own history compaction does not), and the watermark survives restarts."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from kvstore.cluster.etcd import EtcdClient
from kvstore.cluster.membership import Membership, MemberSpec
from kvstore.cluster.tombstones import MAX_KEYS_PER_TOMBSTONE, STATE_FILE, Tombstone, Tombstones, load_state
from kvstore.counters import Event
from tests.kvstore.cluster.member_proc import MemberProc

pytestmark = pytest.mark.etcd


class Node:
    """One in-process member with tombstones; records what it applied and whether it wiped."""

    def __init__(self, endpoints: str, cluster: str, name: str, state_dir: Path, ttl_s: float = 2.0) -> None:
        self.client = EtcdClient(endpoints)
        self.applied: list[Tombstone] = []
        self.wipes = 0
        self.cond = threading.Condition()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.tombstones = Tombstones(self.client, cluster, name, state_dir, self._apply, self._wipe,
                                     lease_id=lambda: self.membership.lease_id)
        self.membership = Membership(self.client, cluster, MemberSpec(name, "127.0.0.1:1", f"host-{name}"), ttl_s,
                                     before_join=self.tombstones.replay)
        self.membership.on_join(lambda inc: self.tombstones.ack())

    def _apply(self, t: Tombstone) -> None:
        with self.cond:
            self.applied.append(t)
            self.cond.notify_all()

    def _wipe(self) -> None:
        self.wipes += 1

    def start(self) -> "Node":
        self.membership.start()
        self.tombstones.start()
        return self

    def wait_applied(self, revision: int, timeout_s: float = 3.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(t.revision == revision for t in self.applied), timeout_s)

    def close(self) -> None:
        self.tombstones.close()
        self.membership.close()
        self.client.close()


@pytest.fixture
def nodes(etcd, cluster_name, tmp_path):
    made: list[Node] = []

    def make(name: str, **kw) -> Node:
        node = Node(etcd.endpoints, cluster_name, name, tmp_path / name, **kw)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def test_records_round_trip_and_long_key_lists_split(etcd, cluster_name, tmp_path):
    client = EtcdClient(etcd.endpoints)
    t = Tombstones(client, cluster_name, "solo", tmp_path, lambda t: None, lambda: None)
    try:
        with pytest.raises(ValueError):
            t.issue(Tombstone())  # would delete everything: refused
        keys = tuple(i.to_bytes(32, "big") for i in range(MAX_KEYS_PER_TOMBSTONE + 3))
        last = t.issue(Tombstone(tenant="acme", fingerprint_id=b"\x01" * 16, keys=keys, secure=True))
        kvs, _ = client.get_prefix(t.layout.tombstones)
        records = [Tombstone.decode(kv) for kv in kvs]
        assert len(records) == 2 and max(r.revision for r in records) == last
        assert sorted(k for r in records for k in r.keys) == sorted(keys)
        assert all((r.tenant, r.fingerprint_id, r.secure, r.issued_by) == ("acme", b"\x01" * 16, True, "solo") for r in records)
    finally:
        client.close()


def test_every_member_applies_and_acknowledges_a_tombstone(nodes):
    a, b, c = (nodes(n).start() for n in ("a", "b", "c"))
    revision = a.tombstones.issue(Tombstone(tenant="acme", keys=(b"k1", b"k2")))
    assert a.tombstones.wait_acks(revision, 3) == []
    for node in (a, b, c):
        assert node.wait_applied(revision)
        (t,) = node.applied
        assert (t.tenant, t.keys, t.issued_by) == ("acme", (b"k1", b"k2"), "a")
        assert node.tombstones.applied_revision >= revision
        assert load_state(node.tombstones.state_path).revision >= revision  # persisted
        assert node.tombstones.counters[Event.TOMBSTONES_APPLIED] == 1


def test_a_member_away_is_named_late_and_replays_the_delete_before_it_rejoins(etcd, cluster_name, nodes, tmp_path):
    a = nodes("a").start()
    away_dir = tmp_path / "away"
    away_dir.mkdir()
    proc = MemberProc(etcd.endpoints, cluster_name, "away", ttl_s=2.0, state_dir=away_dir)
    try:
        proc.wait_for("joined", 10)
        before = a.tombstones.issue(Tombstone(tenant="old"))
        assert proc.wait_for("applied", 3)["revision"] == before
        assert a.tombstones.wait_acks(before, 3) == []
        proc.pause()
        revision = a.tombstones.issue(Tombstone(tenant="acme"))
        # Still in the view (its lease has not run out): it is named, not waited for beyond the timeout.
        started = time.monotonic()
        assert a.tombstones.wait_acks(revision, 0.5) == ["away"]
        assert time.monotonic() - started < 1.0
        # Given longer than its lease, the wait ends when the member is expelled, still naming it.
        assert a.tombstones.wait_acks(revision, 4) == ["away"]
        assert time.monotonic() - started < 2.0 + 1.0
        assert a.membership.wait_view(lambda v: "away" not in v.members, 1)
        proc.kill()
        # It comes back from the same data dir: the delete is applied before it registers again.
        proc = MemberProc(etcd.endpoints, cluster_name, "away", ttl_s=2.0, state_dir=away_dir)
        joined = proc.wait_for("joined", 10)
        applied = [e for e in proc.events if e["event"] == "applied"]
        assert [e["revision"] for e in applied] == [revision]  # the old one was not re-applied
        assert applied[0]["t"] < joined["t"]
        assert a.tombstones.wait_acks(revision, 3) == []
    finally:
        proc.stop()


def test_trimmed_tombstones_make_a_late_node_wipe_its_ssd_but_history_compaction_does_not(etcd, cluster_name, nodes, tmp_path):
    a = nodes("a").start()
    late = nodes("late").start()
    first = a.tombstones.issue(Tombstone(tenant="t1"))
    assert late.wait_applied(first)
    late.close()
    second = a.tombstones.issue(Tombstone(tenant="t2"))
    third = a.tombstones.issue(Tombstone(tenant="t3"))
    # etcd compacts its history: the tombstone keys are still there, so a replay loses nothing.
    a.client.compact(third)
    again = Node(etcd.endpoints, cluster_name, "late", tmp_path / "late")
    try:
        again.tombstones.replay()
        assert [t.tenant for t in again.applied] == ["t2", "t3"] and again.wipes == 0
    finally:
        again.close()
    # Now trim past the late node's watermark (it is back at `first` + whatever replay saw: reset it).
    state = json.loads((tmp_path / "late" / STATE_FILE).read_text())
    (tmp_path / "late" / STATE_FILE).write_text(json.dumps({**state, "revision": first}))
    fourth = a.tombstones.issue(Tombstone(tenant="t4"))
    assert a.tombstones.trim(below_revision=third + 1) == 3  # first, second, third
    back = Node(etcd.endpoints, cluster_name, "late", tmp_path / "late").start()
    assert back.wipes == 1 and back.tombstones.counters[Event.CLUSTER_SSD_WIPES] == 1
    assert [t.tenant for t in back.applied] == ["t4"]  # what survives the trim is still applied
    assert back.tombstones.applied_revision >= fourth
    assert a.tombstones.wait_acks(fourth, 3) == []
    back.close()


def test_the_watermark_survives_restarts_and_nothing_is_applied_twice(etcd, cluster_name, nodes, tmp_path):
    a = nodes("a").start()
    revision = a.tombstones.issue(Tombstone(fingerprint_id=b"\x02" * 16))
    assert a.wait_applied(revision)
    a.close()
    again = Node(etcd.endpoints, cluster_name, "a", tmp_path / "a").start()
    try:
        assert again.applied == [] and again.wipes == 0 and again.tombstones.applied_revision >= revision
        newer = again.tombstones.issue(Tombstone(tenant="x"))
        assert again.wait_applied(newer) and [t.tenant for t in again.applied] == ["x"]
    finally:
        again.close()


def test_a_replaced_etcd_means_unknown_deletes_so_the_ssd_tier_is_wiped(make_etcd, cluster_name, tmp_path):
    first, second = make_etcd(), make_etcd()
    node = Node(first.endpoints, cluster_name, "n", tmp_path / "n").start()
    revision = node.tombstones.issue(Tombstone(tenant="t"))
    assert node.wait_applied(revision)
    node.close()
    moved = Node(second.endpoints, cluster_name, "n", tmp_path / "n").start()
    try:
        assert moved.wipes == 1
        assert load_state(moved.tombstones.state_path).etcd_cluster_id == moved.client.cluster_id
    finally:
        moved.close()
