"""The etcd wrapper against a real etcd: key calls, create-if-absent, leases, prefix watches that survive a
killed or silent server without losing or repeating events, compaction as an explicit error, deadlines,
and failover across the members of a 3-member etcd."""
from __future__ import annotations

import threading
import time

import pytest

from kvstore.cluster.etcd import (
    CompactedError,
    EtcdClient,
    EtcdError,
    EtcdUnavailableError,
    EventKind,
    LeaseNotFoundError,
    WatchEvent,
    parse_endpoints,
    prefix_end,
)

pytestmark = pytest.mark.etcd


@pytest.fixture
def client(etcd):
    c = EtcdClient(etcd.endpoints)
    yield c
    c.close()


class Collector:
    """Gathers watch events and errors; wait() until a condition on them holds."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self.errors: list[EtcdError] = []
        self.cond = threading.Condition()

    def on_events(self, events: list[WatchEvent]) -> None:
        with self.cond:
            self.events.extend(events)
            self.cond.notify_all()

    def on_error(self, err: EtcdError) -> None:
        with self.cond:
            self.errors.append(err)
            self.cond.notify_all()

    def wait(self, predicate, timeout_s: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout_s)


def test_endpoints_parse_and_prefixes_end():
    assert parse_endpoints("a:1, http://b:2,") == ["a:1", "b:2"]
    for bad in ("", "nohost", "h:port"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    assert prefix_end(b"/a/") == b"/a0" and prefix_end(b"a\xff") == b"b"


def test_keys_put_get_prefix_delete(client, cluster_name):
    p = f"/t/{cluster_name}/".encode()
    r1 = client.put(p + b"x", b"1")
    r2 = client.put(p + b"y", b"2")
    client.put(p[:-1] + b"z", b"outside")  # shares the prefix string but not the directory
    assert r2 > r1
    kv, rev = client.get(p + b"x")
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"1", r1, r1, 1) and rev >= r2
    kvs, _ = client.get_prefix(p)
    assert [(k.key, k.value) for k in kvs] == [(p + b"x", b"1"), (p + b"y", b"2")]
    assert client.delete(p + b"x")[0] == 1 and client.get(p + b"x")[0] is None
    assert client.delete(p, prefix=True)[0] == 1 and client.get_prefix(p)[0] == []


def test_create_if_absent_update_and_compare_delete(client, cluster_name):
    key = f"/t/{cluster_name}/k".encode()
    made = client.create(key, b"a")
    assert made.created and made.existing is None
    again = client.create(key, b"b")
    assert not again.created and again.existing.value == b"a" and again.existing.create_revision == made.revision
    assert client.update(key, b"c", create_revision=made.revision)
    assert not client.update(key, b"d", create_revision=made.revision + 1000)
    kv, _ = client.get(key)
    assert kv.value == b"c"
    assert not client.delete_if(key, mod_revision=made.revision)  # written since
    assert client.delete_if(key, mod_revision=kv.mod_revision)
    assert client.get(key)[0] is None


def test_leases_grant_keepalive_revoke(client, cluster_name):
    key = f"/t/{cluster_name}/leased".encode()
    lease = client.lease_grant(2)
    assert lease.ttl_s == 2
    created = client.create(key, b"v", lease.id)
    # A retried create whose first answer was lost finds our own lease there: reported as created.
    assert client.create(key, b"v", lease.id) == type(created)(True, created.revision, None)
    assert client.lease_keepalive(lease.id) == 2
    assert 0 < client.lease_time_to_live(lease.id) <= 2
    client.lease_revoke(lease.id)
    assert client.get(key)[0] is None
    with pytest.raises(LeaseNotFoundError):
        client.lease_keepalive(lease.id)
    client.lease_revoke(lease.id)  # already gone: not an error
    assert client.lease_time_to_live(lease.id) == -1


def test_a_watch_delivers_every_event_in_order_from_its_start_revision(client, cluster_name):
    p = f"/t/{cluster_name}/".encode()
    first = client.put(p + b"a", b"1")
    client.put(p + b"b", b"2")
    client.delete(p + b"a")
    seen = Collector()
    watch = client.watch_prefix(p, first, seen.on_events, seen.on_error)
    try:
        client.put(p + b"c", b"3")
        assert seen.wait(lambda c: len(c.events) == 4)
        assert [(e.kind, e.kv.key) for e in seen.events] == [
            (EventKind.PUT, p + b"a"), (EventKind.PUT, p + b"b"), (EventKind.DELETE, p + b"a"), (EventKind.PUT, p + b"c")]
        assert seen.events[2].prev.value == b"1"  # a delete carries the value it removed
        revisions = [e.kv.mod_revision for e in seen.events]
        assert revisions == sorted(revisions) and revisions[0] == first
    finally:
        watch.cancel()


def test_a_watch_survives_a_killed_etcd_without_losing_or_repeating_events(make_etcd, cluster_name):
    etcd = make_etcd()
    client = EtcdClient(etcd.endpoints)
    p = b"/t/w/"
    seen = Collector()
    watch = client.watch_prefix(p, client.put(b"/t/other", b"") + 1, seen.on_events, seen.on_error)
    try:
        client.put(p + b"1", b"")
        assert seen.wait(lambda c: len(c.events) == 1)
        etcd.members[0].kill()
        time.sleep(0.5)
        etcd.members[0].start()
        etcd.wait_healthy()
        for i in range(2, 5):
            client.put(p + str(i).encode(), b"")
        assert seen.wait(lambda c: len(c.events) == 4, 10), seen.events
        assert [e.kv.key for e in seen.events] == [p + b"1", p + b"2", p + b"3", p + b"4"]
        assert watch.reconnects >= 1 and not seen.errors
    finally:
        watch.cancel()
        client.close()


def test_a_watch_on_a_silent_etcd_reconnects_once_it_answers(make_etcd):
    """SIGSTOP keeps the TCP connection open: only the progress-request watchdog notices."""
    etcd = make_etcd()
    client = EtcdClient(etcd.endpoints)
    seen = Collector()
    watch = client.watch_prefix(b"/t/s/", client.put(b"/t/x", b"") + 1, seen.on_events, seen.on_error)
    try:
        assert watch.connected.wait(3)
        etcd.members[0].pause()
        deadline = time.monotonic() + watch.silence_s + 2
        while watch.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watch.reconnects >= 1
        etcd.members[0].resume()
        client.put(b"/t/s/after", b"")
        assert seen.wait(lambda c: [e.kv.key for e in c.events] == [b"/t/s/after"], 5)
    finally:
        watch.cancel()
        client.close()


def test_watching_compacted_history_is_an_explicit_error(client, cluster_name):
    p = f"/t/{cluster_name}/".encode()
    old = client.put(p + b"a", b"1")
    client.put(p + b"a", b"2")
    now = client.put(p + b"a", b"3")
    client.compact(now)
    client.compact(now)  # again: a no-op
    seen = Collector()
    watch = client.watch_prefix(p, old, seen.on_events, seen.on_error)
    try:
        assert seen.wait(lambda c: c.errors, 5)
        assert isinstance(seen.errors[0], CompactedError) and seen.errors[0].compact_revision >= now
        assert not seen.events
    finally:
        watch.cancel()


def test_every_call_has_a_deadline(make_etcd):
    etcd = make_etcd()
    client = EtcdClient(etcd.endpoints, deadline_s=0.3)
    try:
        client.put(b"/t/k", b"v")
        etcd.members[0].pause()
        time.sleep(0.1)  # SIGSTOP lands asynchronously
        for call in (lambda: client.get(b"/t/k"), lambda: client.put(b"/t/k", b"w"), lambda: client.lease_grant(5),
                     lambda: client.lease_keepalive(1, deadline_s=0.2)):
            started = time.monotonic()
            with pytest.raises(EtcdUnavailableError):
                call()
            assert time.monotonic() - started < 0.6
        etcd.members[0].resume()
        etcd.members[0].kill()
        started = time.monotonic()
        with pytest.raises(EtcdUnavailableError):
            client.get(b"/t/k")
        assert time.monotonic() - started < 0.6
    finally:
        client.close()


def test_calls_fail_over_to_the_members_that_answer(make_etcd):
    etcd = make_etcd(members=3)
    client = EtcdClient(etcd.endpoints)
    try:
        client.put(b"/t/k", b"1")
        first = client.endpoints[0]
        etcd.members[[m.endpoint for m in etcd.members].index(first)].kill()
        etcd.wait_healthy()
        assert client.get(b"/t/k")[0].value == b"1"  # the same call moved on to a live member
        lease = client.lease_grant(5)
        assert client.lease_keepalive(lease.id) == 5
        assert client.status(client.endpoints[1]).leader != 0
    finally:
        client.close()
