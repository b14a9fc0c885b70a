"""Cluster membership on etcd: join under a lease, keep it alive, fence before it can expire, watch the view.

Owns this node's member record (/kvstore/<cluster>/members/<name>, leased JSON), its incarnation, the
self-fence, background rejoin, and the ClusterView every other cluster part reads. It refuses what a
fence *means* for serving (node.py stops the peer service and drops the directory shard through
on_fence) and deletes (tombstones.py; it runs as `before_join`).

- Incarnation = the member key's create_revision: unique and increasing across the cluster, so a node
  that rejoins is a new incarnation and everything recorded under the old one can be refused by comparison.
- Fast restart: a name still held (lease not yet expired) by the same host_id is taken over (compare the
  key's mod_revision, delete, create anew); a different host_id is NodeNameInUseError. A rejoin after a fence
  takes over only its own previous incarnation, so two processes configured with one name cannot flap.
- Self-fence at t_send(last acknowledged keepalive) + TTL - 0.5 s on the monotonic clock. etcd resets the
  lease's expiry when it *handles* a keepalive, which is after we sent it, so this always fires before
  etcd could expire the lease (the leader-lease rule: measure from the send time). `fenced` and
  `incarnation` read the clock themselves, so a process resumed from SIGSTOP is fenced before any of its
  threads has run a line.
- Keepalive every min(1 s, TTL/5), each one request with a 1 s deadline (never beyond the fence time);
  a failed one is retried at once on the next endpoint: a 3-member etcd that lost its leader answers again
  in ~2.6 s (measured), inside the 4.5 s a TTL of 5 s leaves, so leader loss fences nobody.
- Leave revokes the lease: peers drop the node within one watch event, not after a TTL (Mooncake#1249).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from kvstore.cluster.etcd import (
    EtcdClient,
    EtcdError,
    EtcdUnavailableError,
    EventKind,
    KeyValue,
    LeaseNotFoundError,
    Watch,
    WatchEvent,
)
from kvstore.cluster.layout import Layout
from kvstore.cluster.view import ClusterView, Member, MemberState
from kvstore.counters import Event

log = logging.getLogger(__name__)

FENCE_MARGIN_S = 0.5  # fence this long before etcd could expire the lease
KEEPALIVE_MAX_INTERVAL_S = 1.0
KEEPALIVE_RETRY_S = 0.05  # after a failed keepalive: the next endpoint, at once
REJOIN_BACKOFF_S = (0.2, 0.5)  # first and longest wait between rejoin attempts
# Before each rejoin attempt. A same-host restart takes our name over as delete-then-create (etcd allows
# no put and delete of one key in a txn); a fenced member rejoining inside that gap took the name back,
# and the two then replaced each other once more (seen in CI as two fences for one takeover).
REJOIN_SETTLE_S = 0.3
RECORD_VERSION = 1


class MembershipError(Exception):
    """Membership could not be established."""


class NodeNameInUseError(MembershipError):
    """Another node (another host_id, or another process of this host) holds this node name."""

    def __init__(self, name: str, holder_host_id: str) -> None:
        super().__init__(f"node name {name!r} is in use by host {holder_host_id!r}; pick another --node-name")
        self.name = name
        self.holder_host_id = holder_host_id


@dataclass(frozen=True)
class MemberSpec:
    """What this node registers: a Member without an incarnation (etcd assigns it)."""

    name: str
    grpc_address: str
    host_id: str
    ucx_address: str = ""
    capacity: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MemberStatus:
    """One member as `kvstore-admin cluster` shows it."""

    name: str
    incarnation: int
    state: str
    grpc_address: str
    ucx_address: str
    host_id: str
    capacity: dict[str, int]
    lease_ttl_left_s: float  # -1 when etcd was not asked or did not answer


@dataclass(frozen=True)
class MembershipStatus:
    """This node's membership as an operator needs it (see Membership.status)."""

    cluster: str
    name: str
    incarnation: int
    state: str  # joining | active | draining | fenced | left
    fenced: bool
    lease_ttl_s: float
    last_keepalive_age_s: float  # since the send time of the last acknowledged keepalive; -1 before any
    fence_in_s: float  # until the self-fence fires unless a keepalive is acknowledged; 0 when fenced
    view_revision: int
    members: list[MemberStatus]
    counters: dict[str, int]


def encode_member(spec: MemberSpec, state: MemberState) -> bytes:
    record = {"grpc": spec.grpc_address, "ucx": spec.ucx_address, "host_id": spec.host_id,
              "capacity": spec.capacity, "state": str(state), "version": RECORD_VERSION}
    return json.dumps(record, sort_keys=True).encode()


def decode_member(name: str, kv: KeyValue) -> Member:
    record = json.loads(kv.value)
    return Member(name=name, incarnation=kv.create_revision, grpc_address=record["grpc"], host_id=record["host_id"],
                  ucx_address=record.get("ucx", ""), state=MemberState(record.get("state", MemberState.ACTIVE)),
                  capacity={k: int(v) for k, v in record.get("capacity", {}).items()})


class Membership:
    """This node's membership and its view of the others; thread-safe.

    Callbacks: subscribe() ones run on the watch thread after each change; on_fence() and on_join()
    ones on the thread that saw it happen (the keepalive thread, or the watch thread when our own
    key was taken). A callback must not block for long: the keepalive thread runs them.
    """

    def __init__(self, etcd: EtcdClient, cluster: str, me: MemberSpec, ttl_s: float,
                 before_join: Callable[[], None] | None = None, counters: Counter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 1:
            raise ValueError(f"cluster lease TTL must be at least 1 s, got {ttl_s}")
        self.etcd = etcd
        self.layout = Layout(cluster)
        self.me = me
        self.key = self.layout.member(me.name)
        self.ttl_s = ttl_s
        self.before_join = before_join
        self.counters: Counter = Counter() if counters is None else counters
        self.clock = clock
        self._lock = threading.RLock()  # reentrant: a wait_view predicate may read .incarnation or .view()
        self._changed = threading.Condition(self._lock)
        self._view = ClusterView()
        self._leases: dict[str, int] = {}  # member name -> its lease id, for status
        self._subscribers: list[Callable[[ClusterView], None]] = []
        self._fence_cbs: list[Callable[[], None]] = []
        self._join_cbs: list[Callable[[int], None]] = []
        self._state = MemberState.ACTIVE
        self._incarnation = 0
        self._last_incarnation = 0  # the one a rejoin may take over
        self._unsettled_leases: set[int] = set()  # granted by us, revoke failed: a record under one is ours
        self._lease_id = 0
        self._lease_ttl_s = 0.0
        self._fence_at = 0.0
        self._last_ack_sent = -1.0
        self._started = False
        self._left = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watch: Watch | None = None
        self._keeper: threading.Thread | None = None

    # ---- reading -----------------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        """0 while fenced, not yet joined, or left."""
        with self._lock:
            return self._incarnation if self._live_locked() else 0

    @property
    def fenced(self) -> bool:
        """True whenever this node must not act as a member: not joined, fenced, or left."""
        with self._lock:
            return not self._live_locked()

    def _live_locked(self) -> bool:
        return self._incarnation != 0 and self.clock() < self._fence_at

    @property
    def lease_id(self) -> int:
        """The current lease (0 when none): other records that must vanish with this node use it."""
        with self._lock:
            return self._lease_id if self._live_locked() else 0

    def view(self) -> ClusterView:
        with self._lock:
            return self._view

    def wait_view(self, predicate: Callable[[ClusterView], bool], timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._view), timeout_s)

    def subscribe(self, on_change: Callable[[ClusterView], None]) -> None:
        with self._lock:
            self._subscribers.append(on_change)

    def on_fence(self, cb: Callable[[], None]) -> None:
        with self._lock:
            self._fence_cbs.append(cb)

    def on_join(self, cb: Callable[[int], None]) -> None:
        with self._lock:
            self._join_cbs.append(cb)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        """Read the view, start watching it, run before_join, then register; retried on EtcdUnavailableError
        until timeout_s. Raises NodeNameInUseError at once, EtcdUnavailableError when etcd never answered."""
        if self._started:
            raise MembershipError("membership already started")
        self._started = True
        deadline = self.clock() + timeout_s
        try:
            while True:
                try:
                    if self._watch is None:
                        self._resync_view()
                    if self.before_join is not None:
                        self.before_join()
                    incarnation = self._join(takeover_any_of_this_host=True)
                    break
                except EtcdUnavailableError:
                    if self.clock() >= deadline:
                        raise
                    time.sleep(REJOIN_BACKOFF_S[0])
        except BaseException:
            self.close()
            raise
        self._keeper = threading.Thread(target=self._keep, name=f"kvstore-membership-{self.me.name}", daemon=True)
        self._keeper.start()
        self._joined(incarnation)

    def drain(self) -> None:
        """Mark this node draining in etcd (peers stop sending it new work); it stays a member until leave()."""
        with self._lock:
            self._state = MemberState.DRAINING
            incarnation, lease = self._incarnation, self._lease_id
        if incarnation and not self.etcd.update(self.key, encode_member(self.me, MemberState.DRAINING), incarnation, lease):
            log.warning("drain: member key of %s is no longer incarnation %d", self.me.name, incarnation)

    def leave(self) -> None:
        """Leave now: revoke the lease (its keys go with it) and stop keeping alive and rejoining."""
        with self._lock:
            self._left = True
            lease, self._lease_id = self._lease_id, 0
            self._incarnation = 0
            self._changed.notify_all()
        self._stop.set()
        self._wake.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(5)
        if lease:
            try:
                self.etcd.lease_revoke(lease)
            except EtcdError as err:  # its TTL will remove us instead
                log.warning("leave: could not revoke lease of %s: %s", self.me.name, err)

    def close(self) -> None:
        """Stop every thread. Without leave() first the lease runs out on its own (a crash looks the same)."""
        with self._lock:
            self._left = True
            self._changed.notify_all()
        self._stop.set()
        self._wake.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(5)
        if self._watch is not None:
            self._watch.cancel()

    # ---- joining -----------------------------------------------------------------------------

    def _join(self, takeover_any_of_this_host: bool) -> int:
        """Register under a new lease; returns the new incarnation. A fresh process may take over any
        record of its host (a fast restart); a fenced one only its own previous incarnation."""
        with self._lock:
            state = self._state
        value = encode_member(self.me, state)
        sent = self.clock()
        lease = self.etcd.lease_grant(self.ttl_s)
        try:
            for _ in range(3):
                result = self.etcd.create(self.key, value, lease.id)
                if result.created:
                    break
                existing = result.existing
                if existing is None:
                    continue  # it expired between the compare and the read
                holder = decode_member(self.me.name, existing)
                ours = holder.host_id == self.me.host_id and (
                    takeover_any_of_this_host or existing.create_revision == self._last_incarnation
                    or existing.lease in self._unsettled_leases)
                if not ours:
                    raise NodeNameInUseError(self.me.name, holder.host_id)
                log.info("member %s: taking over its previous record (incarnation %d)", self.me.name, existing.create_revision)
                if self.etcd.delete_if(self.key, existing.mod_revision) and existing.lease:
                    self.etcd.lease_revoke(existing.lease)
            else:
                raise EtcdUnavailableError(f"member key {self.key!r} kept changing under the join")
        except BaseException:
            self._revoke_granted(lease.id)
            raise
        with self._lock:
            left = self._left  # leave() or close() ran while we were registering
            if not left:
                self._incarnation = self._last_incarnation = result.revision
                self._lease_id = lease.id
                self._lease_ttl_s = float(lease.ttl_s)
                self._fence_at = sent + lease.ttl_s - FENCE_MARGIN_S
                self._last_ack_sent = sent
                self.counters[Event.CLUSTER_JOINS] += 1
                self._changed.notify_all()
        if left:
            self._revoke_granted(lease.id)
            raise MembershipError(f"member {self.me.name} left while joining")
        log.info("member %s joined cluster %s as incarnation %d (lease ttl %ds)", self.me.name, self.layout.cluster, result.revision, lease.ttl_s)
        return result.revision

    def _revoke_granted(self, lease_id: int) -> None:
        """Revoke a lease this join granted but will not use; if etcd does not answer, remember it, so a
        record found under it later (a create whose answer was lost) is known to be ours."""
        try:
            self.etcd.lease_revoke(lease_id)
            self._unsettled_leases.discard(lease_id)
        except EtcdError:
            self._unsettled_leases.add(lease_id)

    def _joined(self, incarnation: int) -> None:
        with self._lock:
            callbacks = list(self._join_cbs)
        for cb in callbacks:
            _safely(cb, incarnation)

    def _fence(self, reason: str, incarnation: int | None = None) -> None:
        """Stop being a member now. `incarnation`: fence only if it is still the current one."""
        with self._lock:
            if self._incarnation == 0 or (incarnation is not None and incarnation != self._incarnation):
                return
            old, self._incarnation = self._incarnation, 0
            self._fence_at = 0.0
            self.counters[Event.CLUSTER_FENCES] += 1
            callbacks = list(self._fence_cbs)
            self._changed.notify_all()
        log.warning("member %s fenced itself (incarnation %d): %s", self.me.name, old, reason)
        for cb in callbacks:
            _safely(cb)
        self._wake.set()

    # ---- the keepalive thread ----------------------------------------------------------------

    def _keep(self) -> None:
        interval = min(KEEPALIVE_MAX_INTERVAL_S, self.ttl_s / 5)
        next_send = self.clock() + interval
        backoff = REJOIN_BACKOFF_S[0]
        while not self._stop.is_set():
            with self._lock:
                incarnation, lease, fence_at = self._incarnation, self._lease_id, self._fence_at
            if incarnation == 0:
                if self._stop.wait(REJOIN_SETTLE_S):
                    break
                if self._rejoin():
                    next_send, backoff = self.clock() + interval, REJOIN_BACKOFF_S[0]
                else:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, REJOIN_BACKOFF_S[1])
                continue
            now = self.clock()
            if now >= fence_at:
                self._fence(f"no keepalive acknowledged for {now - self._last_ack_sent:.1f}s", incarnation)
                continue
            if now < next_send:
                self._wake.wait(min(next_send, fence_at) - now)
                self._wake.clear()
                continue
            sent = self.clock()
            try:
                ttl = self.etcd.lease_keepalive(lease, deadline_s=min(self.etcd.deadline_s, fence_at - sent))
            except LeaseNotFoundError:
                self._fence("lease expired in etcd", incarnation)
                continue
            except EtcdError as err:
                self.counters[Event.CLUSTER_KEEPALIVE_FAILURES] += 1
                log.info("member %s: keepalive failed (%s); fence in %.1fs", self.me.name, err, fence_at - self.clock())
                next_send = self.clock() + KEEPALIVE_RETRY_S
                continue
            with self._lock:
                if self._incarnation == incarnation and self._lease_id == lease:
                    self._fence_at = max(self._fence_at, sent + ttl - FENCE_MARGIN_S)
                    self._last_ack_sent = max(self._last_ack_sent, sent)
            next_send = sent + interval

    def _rejoin(self) -> bool:
        """One attempt: tombstone replay first (a node that was away must not serve what was deleted
        meanwhile), then a new incarnation. Returns True when joined."""
        with self._lock:
            if self._left:
                return False
            old_lease, self._lease_id = self._lease_id, 0
        try:
            if old_lease:
                self.etcd.lease_revoke(old_lease)  # if it still lives, peers drop the old incarnation now
            if self._watch is None:
                self._resync_view()
            if self.before_join is not None:
                self.before_join()
            incarnation = self._join(takeover_any_of_this_host=False)
        except NodeNameInUseError as err:
            log.error("member %s cannot rejoin: %s", self.me.name, err)
            return False
        except MembershipError:  # left meanwhile
            return False
        except EtcdError as err:
            log.info("member %s: rejoin failed: %s", self.me.name, err)
            return False
        except Exception:
            log.exception("member %s: before_join failed; not rejoining yet", self.me.name)
            return False
        self._joined(incarnation)
        return True

    # ---- the view ----------------------------------------------------------------------------

    def _resync_view(self) -> None:
        """Read every member record, then watch from the revision after that snapshot."""
        kvs, revision = self.etcd.get_prefix(self.layout.members)
        members, leases = {}, {}
        for kv in kvs:
            name = Layout.name_of(kv.key, self.layout.members)
            member = _decoded(name, kv)
            if member is not None:
                members[name], leases[name] = member, kv.lease
        self._publish(ClusterView(revision, members), leases)
        self._watch = self.etcd.watch_prefix(self.layout.members, revision + 1, self._on_events, self._on_watch_error,
                                             name=f"kvstore-members-{self.me.name}")

    def _on_events(self, events: list[WatchEvent]) -> None:
        with self._lock:
            members, leases = dict(self._view.members), dict(self._leases)
            mine = self._incarnation
        taken = ""
        for event in events:
            name = Layout.name_of(event.kv.key, self.layout.members)
            if event.kind is EventKind.PUT:
                member = _decoded(name, event.kv)
                if member is None:
                    continue
                members[name], leases[name] = member, event.kv.lease
                if name == self.me.name and mine and member.incarnation > mine:
                    taken = f"our member record was taken over by incarnation {member.incarnation}"
            else:
                members.pop(name, None)
                leases.pop(name, None)
                # Events older than our incarnation are about records we replaced ourselves.
                if name == self.me.name and mine and event.kv.mod_revision > mine:
                    taken = "our member record was deleted"
        self._publish(ClusterView(events[-1].kv.mod_revision, members), leases)
        if taken:
            self._fence(taken, mine)

    def _publish(self, view: ClusterView, leases: dict[str, int]) -> None:
        with self._lock:
            changed = view.members != self._view.members
            self._view, self._leases = view, leases
            if changed:
                self.counters[Event.CLUSTER_VIEW_CHANGES] += 1
            subscribers = list(self._subscribers)
            self._changed.notify_all()
        for cb in subscribers:
            _safely(cb, view)

    def _on_watch_error(self, err: EtcdError) -> None:
        """History we had not seen was compacted: re-read the present and watch again (in the background)."""
        log.warning("member watch of %s: %s; re-reading the member list", self.me.name, err)
        threading.Thread(target=self._rewatch, name=f"kvstore-members-resync-{self.me.name}", daemon=True).start()

    def _rewatch(self) -> None:
        delay = REJOIN_BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                self._resync_view()
                return
            except EtcdError as err:
                log.info("member list re-read failed: %s", err)
                self._stop.wait(delay)
                delay = min(delay * 2, REJOIN_BACKOFF_S[1])

    # ---- operators ---------------------------------------------------------------------------

    def status(self, lease_ttls: bool = True) -> MembershipStatus:
        """For `kvstore-admin cluster`: members, incarnations, states, and this node's fence clock.
        lease_ttls asks etcd how long each member's lease has left (one call per member, 0.2 s deadline each)."""
        with self._lock:
            now = self.clock()
            live = self._live_locked()
            view, leases = self._view, dict(self._leases)
            state = "left" if self._left else ("joining" if not self._started or not self._last_incarnation else
                                               ("fenced" if not live else str(self._state)))
            last_age = now - self._last_ack_sent if self._last_ack_sent >= 0 else -1.0
            fence_in = max(0.0, self._fence_at - now) if live else 0.0
            incarnation = self._incarnation if live else 0
        members = []
        for name, m in sorted(view.members.items()):
            ttl_left = -1.0
            if lease_ttls and leases.get(name):
                try:
                    ttl_left = float(self.etcd.lease_time_to_live(leases[name], deadline_s=0.2))
                except EtcdError:
                    pass
            members.append(MemberStatus(name, m.incarnation, str(m.state), m.grpc_address, m.ucx_address, m.host_id, dict(m.capacity), ttl_left))
        counters = {str(e): int(self.counters.get(e, 0)) for e in (Event.CLUSTER_JOINS, Event.CLUSTER_FENCES,
                                                                  Event.CLUSTER_VIEW_CHANGES, Event.CLUSTER_KEEPALIVE_FAILURES)}
        return MembershipStatus(self.layout.cluster, self.me.name, incarnation, state, not live, self._lease_ttl_s,
                                last_age, fence_in, view.revision, members, counters)


def _decoded(name: str, kv: KeyValue) -> Member | None:
    try:
        return decode_member(name, kv)
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable member record %r: %s", kv.key, err)
        return None


def _safely(cb: Callable, *args) -> None:
    try:
        cb(*args)
    except Exception:
        log.exception("membership callback %r failed", cb)
