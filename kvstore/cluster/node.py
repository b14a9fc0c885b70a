"""One server's cluster parts, wired together: what `kvstore serve --cluster-etcd ...` adds to a node.

Owns construction and lifecycle: the etcd client, Membership, Tombstones, this node's directory
shard, the Announcer, the peer channels, the remote tier (installed as the store's RemoteSource),
the peer service (on the server's gRPC port), and what membership events mean for serving:

- fence: the peer service refuses every call (its admission reads `fenced`), the directory shard is
  dropped (what it knew may be stale by the time this node rejoins), nothing is announced, the remote
  tier finds nothing; local clients are still served unless cluster_strict_fence, which refuses reads;
- (re)join: tombstones are replayed first (Membership's before_join), then every home gets a full resync;
- view change: channels of departed members close, the shard forgets dead holders and keys homed elsewhere,
  the claim table ends the write claims of dead holders (claims.py: cluster-wide single writer);
- drain or SIGTERM: leave at once (the lease is revoked), so peers drop this node within a watch event.

Admin deletes by tenant, fingerprint or chain become tombstones that every node applies (delete());
selectors by tier or age stay local, since they mean this node's copies.
It refuses request logic (store.py, api.py) and wire encoding (peer_service.py, peers.py).
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager, Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from kvwire.errors import FencedError, InvalidRequestError, UnavailableError
from kvwire.hostid import host_id
from kvstore.cluster.announcer import Announcer
from kvstore.cluster.claims import ClusterClaims
from kvstore.cluster.directory import BlockRef, DirectoryShard, live_holders
from kvstore.cluster.etcd import EtcdClient, EtcdError
from kvstore.cluster.handoff import hand_off
from kvstore.cluster.hot import HotPush, HotSpread
from kvstore.cluster.membership import Membership, MemberSpec
from kvstore.cluster.peer_service import PEER_CLIENT_PREFIX, PeerServicer, cluster_status
from kvstore.cluster.peers import Peers
from kvstore.cluster.remote_tier import RemoteTier
from kvstore.cluster.replicas import LAG_BUCKETS_S, Replicas
from kvstore.cluster.replicator import Replicator
from kvstore.cluster.spill import Spiller, node_room
from kvstore.cluster.tombstones import Tombstone, Tombstones
from kvstore.cluster.transfer_cap import PeerTransfers, Served
from kvstore.cluster.ucx_fetch import UcxFetcher
from kvstore.cluster.view import ClusterView
from kvstore.config import ServerConfig
from kvstore.counters import Event
from kvstore.index import Origin
from kvstore.operations import DeleteReport, Operations, Selector

if TYPE_CHECKING:
    import grpc

    from kvstore.api import StoreAPI, UcxSessions
    from kvstore.auth import Authenticator
    from kvstore.store import Caller, Store

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
# A fault for tests only, read only when set: this node never announces removals, so the directory keeps
# stale entries for blocks it dropped (tests/kvstore/cluster/test_node_failures.py).
DROP_REMOVED_ENV = "KVSTORE_TEST_DROP_REMOVED_ANNOUNCES"
STATUS_TIMEOUT_S = 1.0
DELETE_ANNOUNCE_WAIT_S = 1.0  # a tombstone's apply waits this long at most for its removals to reach their homes


def advertise_address(cfg: ServerConfig, bound_address: str) -> str:
    """What peers dial: cfg.advertise, else the address the server bound (which must then name one host)."""
    address = cfg.advertise or bound_address
    if address.rsplit(":", 1)[0] in WILDCARD_HOSTS:
        raise ValueError(f"cluster mode needs --advertise HOST:PORT that peers can dial (listen {cfg.listen} names no one host)")
    return address


class ClusterNode:
    def __init__(self, cfg: ServerConfig, store: "Store", api: "StoreAPI", ops: Operations, auth: "Authenticator",
                 grpc_server: "grpc.Server", bound_address: str) -> None:
        self.cfg = cfg
        self.store = store
        self.api = api
        self.ops = ops
        self.name = cfg.node_name or socket.gethostname()
        self.address = advertise_address(cfg, bound_address)
        self.counters = store.counters
        self.etcd = EtcdClient(cfg.cluster_etcd)
        self.shard = DirectoryShard()
        self.peers = Peers(self.name, self.identity, auth.peer_token, self.counters)
        self.membership: Membership | None = None
        self.tombstones = Tombstones(self.etcd, cfg.cluster_name, self.name, cfg.data_path, self._apply_tombstone, self._wipe,
                                     lease_id=lambda: self.membership.lease_id if self.membership else 0, counters=self.counters)
        drop_removed = os.environ.get(DROP_REMOVED_ENV) == "1"
        if drop_removed:
            log.warning("%s=1: this node announces no removals (a test fault; never set it in production)", DROP_REMOVED_ENV)
        self.announcer = Announcer(self.name, self.shard, self.peers, self.identity, self._catalog, self.counters,
                                   timeout_s=max(0.2, cfg.cluster_announce_wait_ms / 1000), drop_removed=drop_removed)
        ucx = UcxFetcher(self.peers) if cfg.ucx and UcxFetcher.available() else None
        self.hot = HotSpread(self.name, self.shard, lambda: self.remote.ring(self.view()), self.counters, cfg.hot_threshold, cfg.hot_replicas,
                             self._push_hot, settling=lambda: self.remote.settling())
        self.remote = RemoteTier(self.name, store, self.identity, self.peers, self.shard, self.counters,
                                 cfg.remote_fetch_deadline_ms / 1000, ucx, hot=self.hot, adopted=self.announcer.wake)
        self.transfers = PeerTransfers(self.name, cfg.peer_max_inflight, self.counters, self.peers.count_served)
        self.replicator = Replicator(self.name, store, self.peers, self.remote, self.identity, self.announcer.flush, self.counters,
                                     cfg.cluster_copy_rate_mb_s * 1e6)
        self._deleting = threading.Lock()
        self.servicer = PeerServicer(self.name, self, auth, self.shard, self.hot, store, self.peers, self.transfers,
                                     self.counters, self.status)
        self.servicer.replicator = self.replicator
        self.replicas = Replicas(self.name, cfg.cluster_replicas, self.replicator, self.identity, self.counters,
                                 lambda: store.changes)
        self.spiller = Spiller(self.name, store, self.replicator, self.peers.status, self.identity, self.counters,
                               cfg.high_watermark, cfg.low_watermark)
        self.servicer.add_to(grpc_server)
        self.shard.on_stored = self.servicer.claims.stored
        self.claims = ClusterClaims(self.name, self.identity, self.peers, self.shard, self.servicer.claims, self.counters)

    # ---- the copy primitive ------------------------------------------------------------------------

    def request_copies(self, target_node: str, storage_keys: list[bytes], source_node: str | None = None,
                       origin: Origin = Origin.REPLICA, capped: bool = True) -> int:
        """Have target_node take copies of these blocks from source_node (default: this node), over its remote-tier
        read path (checked before visible, then announced as held); how many of them it holds afterwards. Blocking;
        paced by this node's copy rate cap (or the source's) when capped; never raises for a peer's failure.
        origin tells the target's eviction what they are (replicator.py)."""
        return self.replicator.request_copies(target_node, storage_keys, source_node, origin, capped)

    def _push_hot(self, push: HotPush) -> None:
        """A directory home's push of a hot run (hot.py): the target copies it from the least loaded holder, as a
        read-through copy (evicted first), paced by the source's copy rate cap."""
        held = self.request_copies(push.target, list(push.skeys), push.source[0], Origin.COPY)
        log.debug("hot keys: node %s took %d of %d blocks from %s", push.target, held, len(push.skeys), push.source[0])

    # ---- what the other parts read (the servicer's MembershipView too) ---------------------------

    def identity(self) -> tuple[int, ClusterView]:
        membership = self.membership
        if membership is None:
            return 0, ClusterView()
        return membership.incarnation, membership.view()

    @property
    def incarnation(self) -> int:
        return self.membership.incarnation if self.membership is not None else 0

    @property
    def fenced(self) -> bool:
        return self.membership is None or self.membership.fenced

    def view(self) -> ClusterView:
        return self.membership.view() if self.membership is not None else ClusterView()

    def wait_view(self, predicate, timeout_s: float) -> bool:
        return self.membership is not None and self.membership.wait_view(predicate, timeout_s)

    def _catalog(self) -> list[BlockRef]:
        return [BlockRef(*row) for row in self.store.catalog()]

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self, ucx: "UcxSessions | None" = None) -> "ClusterNode":
        """Join the cluster (replaying tombstones first) and start announcing; the gRPC server (and the UCX data
        plane, if any, which peers then read from) is already serving."""
        host = self.address.rsplit(":", 1)[0]
        ucx_port = ucx.port if ucx is not None else 0
        if ucx is not None:
            self.servicer.ucx, self.servicer.ucx_listener = ucx, f"{host}:{ucx_port}"
        spec = MemberSpec(self.name, self.address, self.cfg.host_id or host_id(), f"{host}:{ucx_port}" if ucx_port else "",
                          {"host": self.store.host.capacity_bytes, "ssd": self.cfg.ssd_capacity})
        membership = Membership(self.etcd, self.cfg.cluster_name, spec, self.cfg.cluster_lease_ttl_s,
                                before_join=self.tombstones.replay, counters=self.counters)
        membership.subscribe(self._on_view)
        membership.on_fence(self._on_fence)
        membership.on_join(self._on_join)
        self.membership = membership
        self.store.index.listener = self._on_index
        self.store.policy.by_rank = True  # read-through copies and replicated blocks are evicted before sole copies
        self.announcer.start()
        self.replicas.start()
        self.spiller.start()
        self.store.remote = self.remote
        self.store.claims = self.claims
        self.api.cluster = self
        membership.start()
        self.tombstones.start()
        log.info("cluster %s: node %s joined as incarnation %d, advertising %s", self.cfg.cluster_name, self.name,
                 membership.incarnation, self.address)
        return self

    def handoff(self) -> tuple[int, int]:
        """drain --handoff: mark this node draining and move the blocks no other node holds to peers (handoff.py);
        (blocks peers took, sole copies none took). The caller leaves afterwards."""
        if self.membership is None or self.fenced:
            return 0, 0
        return hand_off(self.name, self.store, self.membership, self.remote, self.replicator, self.counters, self.identity)

    def leave(self) -> None:
        """Leave the cluster at once (drain, shutdown): the lease is revoked, peers drop this node within a watch event."""
        self.store.remote = None
        self.store.claims = None
        if self.membership is not None:
            self.membership.leave()

    def close(self) -> None:
        self.store.remote = None
        self.store.claims = None
        self.store.index.listener = None
        self.spiller.close()
        self.replicas.close()
        self.announcer.close()
        self.tombstones.close()
        if self.membership is not None:
            self.membership.close()
        self.remote.close()
        self.hot.close()
        self.claims.close()
        self.peers.close()
        self.etcd.close()

    # ---- membership events -----------------------------------------------------------------------

    def _on_index(self, skey: bytes, meta) -> None:
        """The store index's listener (store lock held: each only takes note): announces, and replica pushes."""
        self.announcer.record(skey, meta)
        if meta is not None:
            self.replicas.note(meta)

    def _on_view(self, view: ClusterView) -> None:
        self.peers.on_view(view)
        live = live_holders(view)
        lost = self.shard.losing(live)
        self.shard.forget_dead(live)
        self.servicer.claims.forget_dead(live)  # a dead holder's write claims end now: its waiters take over
        self.hot.forget(live)
        ring = self.remote.ring(view)
        self.shard.keep_homed(lambda skeys: ring.is_home(self.name, skeys))
        self.announcer.wake()
        self.replicas.repair(view, lost)

    def _on_fence(self) -> None:
        log.warning("cluster: node %s fenced; serving no peer%s until it rejoins", self.name,
                    " and no reader" if self.cfg.cluster_strict_fence else "")
        self.shard.clear()
        self.servicer.claims.clear()
        self.announcer.wake()

    def _on_join(self, incarnation: int) -> None:
        self.tombstones.ack()
        self.announcer.wake()

    # ---- the request layer's ClusterGate ---------------------------------------------------------

    def before_read(self, caller: Caller) -> None:
        if not self.fenced:
            return
        if caller.client_id.startswith(PEER_CLIENT_PREFIX):  # a peer's UCX session: a fenced node serves no peer
            raise FencedError(f"node {self.name} is fenced from the cluster and serves no peer until it rejoins")
        if self.cfg.cluster_strict_fence:
            raise FencedError(f"node {self.name} is fenced from the cluster and, in strict mode, serves no reads until it rejoins")

    def peer_send(self, caller: Caller) -> ContextManager[Served]:
        """A peer's UCX get holds one of this node's peer transfer slots (peer_max_inflight), like a gRPC Fetch."""
        if not caller.client_id.startswith(PEER_CLIENT_PREFIX):
            return nullcontext(lambda blocks, nbytes: None)  # a client's send: no peer traffic
        peer = caller.client_id.removeprefix(PEER_CLIENT_PREFIX).rsplit(":", 1)[0]  # peer:<node>:<incarnation>
        return self.transfers.slot(peer)

    def after_commit(self) -> None:
        if not self.announcer.flush(self.cfg.cluster_announce_wait_ms / 1000):
            self.counters[Event.DIRECTORY_COMMIT_WAITS_EXPIRED] += 1
            log.debug("commit answered before its directory homes acknowledged it (cluster_announce_wait_ms)")

    # ---- cluster-wide deletes -----------------------------------------------------------------------

    def delete(self, sel: Selector, secure: bool, reader_wait_s: float | None = None) -> tuple[DeleteReport, bool, list[str]]:
        """An operator's delete: (this node's report, whether it went cluster-wide, live nodes that had not applied it).

        reader_wait_s bounds this node's wait for readers of securely deleted blocks (Operations.delete)."""
        if sel.tier or sel.min_age_s:  # this node's copies by tier or age: nothing a tombstone can name
            return self.ops.delete(sel, secure, reader_wait_s), False, []
        if sel.empty:
            raise InvalidRequestError("delete needs a selector (fingerprint, tenant, keys, tier, age)")
        with self._deleting:  # the watch's apply of this tombstone waits, so the counts below are this node's
            try:
                revision = self.tombstones.issue(Tombstone(tenant=sel.tenant, fingerprint_id=sel.fingerprint_id,
                                                           keys=tuple(sorted(sel.keys)), secure=secure, issued_by=self.name))
            except EtcdError as err:
                raise UnavailableError(f"the cluster-wide delete could not be recorded in etcd: {err}") from None
            report = self.ops.delete(sel, secure, reader_wait_s)  # here at once; the watch applies it again (a no-op)
        self.announcer.flush(DELETE_ANNOUNCE_WAIT_S)
        try:
            late = self.tombstones.wait_acks(revision, self.cfg.cluster_lease_ttl_s + 1)
        except EtcdError as err:
            raise UnavailableError(f"the delete is recorded, but its confirmations could not be read from etcd: {err}") from None
        return report, True, late

    def _apply_tombstone(self, t: Tombstone) -> None:
        """Delete here, and have the removals announced before the apply counts as done (the ack follows it), so
        when an operator's delete returns, no directory still names this node for what it deleted (bounded)."""
        with self._deleting:
            self.ops.delete(Selector(tenant=t.tenant, fingerprint_id=t.fingerprint_id, keys=frozenset(t.keys)), t.secure)
        self.announcer.flush(DELETE_ANNOUNCE_WAIT_S)

    def _wipe(self) -> None:
        """Tombstones this node never applied were trimmed: keep none of its blocks (it cannot know which went)."""
        deletion = self.store.delete_blocks(lambda view: True, lambda lease: True)
        log.warning("cluster: node %s missed trimmed tombstones; dropped all %d of its blocks", self.name, deletion.deleted)

    # ---- operators ---------------------------------------------------------------------------------

    def status(self):
        """This node's ClusterStatus message (peer_service.cluster_status)."""
        membership = self.membership.status(lease_ttls=False) if self.membership is not None else None
        status = cluster_status(self.name, membership, self.shard, self.peers, self.counters, self.tombstones.applied_revision)
        status.capacity_bytes, status.free_bytes = self.capacity()
        lags = self.replicas.lags
        status.replication_lag_p50_ms, status.replication_lag_p99_ms = lags.quantile(0.5) * 1000, lags.quantile(0.99) * 1000
        status.replication_pending = self.replicas.pending
        return status

    def capacity(self) -> tuple[int, int]:
        """(capacity, free bytes) as spill sees them (spill.py node_room)."""
        return node_room(self.store)

    def statuses(self) -> tuple[list, list[str]]:
        """This node's status and every live peer's; the names of peers that did not answer."""
        out, unreachable = [self.status()], []
        for member in self.view().peers_of(self.name):
            try:
                out.append(self.peers.status(member.name, STATUS_TIMEOUT_S))
            except Exception as err:
                log.debug("status of %s: %s", member.name, err)
                unreachable.append(member.name)
        return out, unreachable

    def collector(self) -> "ClusterCollector":
        return ClusterCollector(self)


class ClusterCollector:
    """Cluster gauges for /metrics (the counters are store events, exported with the rest)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        incarnation, view = node.identity()
        yield GaugeMetricFamily("kvstore_cluster_members", "Members in this node's view", value=len(view.members))
        yield GaugeMetricFamily("kvstore_cluster_view_revision", "etcd revision of the last membership change seen", value=view.revision)
        yield GaugeMetricFamily("kvstore_cluster_incarnation", "This node's incarnation (0 while fenced)", value=incarnation)
        yield GaugeMetricFamily("kvstore_cluster_fenced", "1 while this node is fenced (not a live member)", value=1 if node.fenced else 0)
        yield GaugeMetricFamily("kvstore_directory_entries", "Keys this node is directory home for", value=len(node.shard))
        yield GaugeMetricFamily("kvstore_directory_announce_queue", "Block changes not yet acknowledged by their homes",
                                value=node.announcer.queued)
        lags = node.replicas.lags
        buckets = [(str(le), float(n)) for le, n in zip(LAG_BUCKETS_S, itertools.accumulate(lags.buckets))]
        yield HistogramMetricFamily("kvstore_replication_lag_seconds", "Commit here to its replica announced by the replica node",
                                    buckets=[*buckets, ("+Inf", float(lags.count))], sum_value=lags.sum)
        yield GaugeMetricFamily("kvstore_replication_pending", "Blocks committed here not yet pushed to their replica nodes",
                                value=node.replicas.pending)
        breakers = GaugeMetricFamily("kvstore_peer_breaker_open", "1 while a peer's circuit breaker is open", labels=["peer"])
        for info in node.peers.breakers():
            breakers.add_metric([info.peer], 0 if info.state == "closed" else 1)
        yield breakers
