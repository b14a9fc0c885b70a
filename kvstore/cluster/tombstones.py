"""Cluster-wide deletes: tombstones in etcd that every node applies, acknowledges, and replays after being away.

Owns the tombstone records (/kvstore/<cluster>/tombstones/<id>, JSON, not leased), this node's applied
revision (persisted atomically in the data dir, and published as /kvstore/<cluster>/acks/<node>, leased
with the node's membership so it vanishes with the node), replay before a (re)join, and trimming. It
refuses what a delete does to the store: `apply` (node.py: the admin delete path) and `wipe_ssd`.

The applied revision R is a watermark: every tombstone with revision <= R has been applied here. It moves
forward only after the apply callback returned, so a crash re-applies (deletes are idempotent) and never skips.

Why a present-state read, not a history replay: replay reads the tombstone keys that exist now, so etcd's
own history compaction never loses a delete. What can lose one is trimming tombstones, which an operator
does through trim(): it first raises the floor (/tombstone_floor), then deletes the keys below it. Replay
reads the keys first and the floor second, so whichever moment a trim interleaves, a node whose watermark
is under the floor sees it and calls wipe_ssd() (it cannot know which blocks were deleted, so it keeps none
of its durable copies). An etcd that was replaced (another cluster id) is treated the same way.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvstore.cluster.etcd import CompactedError, EtcdClient, EtcdError, EtcdUnavailableError, EventKind, KeyValue, Watch, WatchEvent
from kvstore.cluster.layout import Layout
from kvstore.counters import Event

log = logging.getLogger(__name__)

STATE_FILE = "cluster-tombstones.json"
MAX_KEYS_PER_TOMBSTONE = 4096  # 4096 hex keys ~ 270 KB, well under etcd's 1.5 MiB request limit
ACK_POLL_S = 0.02
RECORD_VERSION = 1


@dataclass(frozen=True)
class Tombstone:
    """A delete every node must apply. Empty tenant: every tenant; empty fingerprint_id: every fingerprint
    (of the tenant); empty keys: every key. At least one of the three is set. revision: etcd's, 0 before issue."""

    revision: int = 0
    tenant: str = ""
    fingerprint_id: bytes = b""
    keys: tuple[bytes, ...] = ()
    secure: bool = False
    issued_by: str = ""

    @property
    def empty(self) -> bool:
        return not (self.tenant or self.fingerprint_id or self.keys)

    def encode(self) -> bytes:
        return json.dumps({"tenant": self.tenant, "fingerprint_id": self.fingerprint_id.hex(), "keys": [k.hex() for k in self.keys],
                           "secure": self.secure, "issued_by": self.issued_by, "issued_unix_ms": int(time.time() * 1000),
                           "version": RECORD_VERSION}).encode()

    @classmethod
    def decode(cls, kv: KeyValue) -> "Tombstone":
        r = json.loads(kv.value)
        return cls(kv.mod_revision, r.get("tenant", ""), bytes.fromhex(r.get("fingerprint_id", "")),
                   tuple(bytes.fromhex(k) for k in r.get("keys", ())), bool(r.get("secure", False)), r.get("issued_by", ""))


@dataclass(frozen=True)
class AppliedState:
    """What this node persists: the watermark, and which etcd it belongs to (revisions are per etcd cluster)."""

    revision: int = 0
    etcd_cluster_id: int = 0


def load_state(path: Path) -> AppliedState:
    try:
        raw = json.loads(path.read_text())
        return AppliedState(int(raw["revision"]), int(raw.get("etcd_cluster_id", 0)))
    except FileNotFoundError:
        return AppliedState()
    except (ValueError, KeyError, TypeError) as err:
        # An unreadable watermark proves nothing: start from 0 (replay everything; wipe if anything was trimmed).
        log.warning("unreadable tombstone state %s (%s); replaying from revision 0", path, err)
        return AppliedState()


def save_state(path: Path, state: AppliedState) -> None:
    """Atomic and durable: a crash leaves the old watermark or the new one, never a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"revision": state.revision, "etcd_cluster_id": state.etcd_cluster_id}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Tombstones:
    """Issue, apply, acknowledge and replay cluster-wide deletes for one node; thread-safe.

    Wiring (node.py): Membership(before_join=tombstones.replay), membership.on_join(lambda inc: tombstones.ack()),
    Tombstones(..., lease_id=lambda: membership.lease_id). `apply` and `wipe_ssd` run on the watch thread
    or on the thread that called replay(); they may block (a secure delete waits for readers).
    """

    def __init__(self, etcd: EtcdClient, cluster: str, node_name: str, state_dir: Path, apply: Callable[[Tombstone], None],
                 wipe_ssd: Callable[[], None], lease_id: Callable[[], int] = lambda: 0, counters: Counter | None = None) -> None:
        self.etcd = etcd
        self.layout = Layout(cluster)
        self.node_name = node_name
        self.ack_key = self.layout.ack(node_name)
        self.state_path = Path(state_dir) / STATE_FILE
        self.apply = apply
        self.wipe_ssd = wipe_ssd
        self.lease_id = lease_id
        self.counters: Counter = Counter() if counters is None else counters
        self._lock = threading.RLock()  # one applier at a time: the watch thread or a replay
        self._state = load_state(self.state_path)
        self._watch: Watch | None = None
        self._watch_from = 0  # revision the watch starts at, set by replay
        self._stopped = threading.Event()

    @property
    def applied_revision(self) -> int:
        with self._lock:
            return self._state.revision

    # ---- issuing -----------------------------------------------------------------------------

    def issue(self, t: Tombstone) -> int:
        """Record a delete for the whole cluster; returns its revision (wait_acks takes it). `t.revision` is ignored.
        A key list longer than one record holds is split over several records; the last one's revision is returned."""
        if t.empty:
            raise ValueError("a tombstone needs a tenant, a fingerprint or keys")
        chunks = [t.keys[i:i + MAX_KEYS_PER_TOMBSTONE] for i in range(0, len(t.keys), MAX_KEYS_PER_TOMBSTONE)] or [()]
        revision = 0
        for keys in chunks:
            record = Tombstone(0, t.tenant, t.fingerprint_id, keys, t.secure, t.issued_by or self.node_name)
            tombstone_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:16]}"
            revision = self.etcd.put(self.layout.tombstone(tombstone_id), record.encode())
            self.counters[Event.TOMBSTONES_ISSUED] += 1
        return revision

    def wait_acks(self, revision: int, timeout_s: float) -> list[str]:
        """Wait until every live member has applied tombstones up to `revision`; returns the members that have
        not: those still live at the timeout, and those that left the cluster during the wait without applying
        it (a partitioned member is expelled when its lease expires, so with a timeout past the lease TTL the
        call returns once that happens, naming it; it replays the delete before it rejoins).
        Raises EtcdUnavailableError only if etcd never answered."""
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()  # every member live at some point of the wait
        late: list[str] | None = None
        while True:
            try:
                members, _ = self.etcd.get_prefix(self.layout.members)
                acks, _ = self.etcd.get_prefix(self.layout.acks)
                acked = {Layout.name_of(kv.key, self.layout.acks): _int(kv.value) for kv in acks}
                live = {Layout.name_of(kv.key, self.layout.members) for kv in members}
                seen |= live
                late = sorted(name for name in seen if acked.get(name, 0) < revision)
                if not any(name in live for name in late):
                    return late  # nobody who could still apply it is left to wait for
            except EtcdUnavailableError:
                if time.monotonic() >= deadline and late is None:
                    raise
            if time.monotonic() >= deadline:
                return late or []
            time.sleep(ACK_POLL_S)

    def trim(self, below_revision: int) -> int:
        """Delete the tombstones older than `below_revision`, raising the floor first, and compact etcd's
        history to match; returns how many were deleted. A node whose watermark is under the floor will
        wipe its SSD tier on its next replay. Run it only for tombstones every node has long applied."""
        floor = below_revision - 1
        current, _ = self.etcd.get(self.layout.tombstone_floor)
        if current is not None and _int(current.value) >= floor:
            floor = _int(current.value)
        else:
            self.etcd.put(self.layout.tombstone_floor, str(floor).encode())
        kvs, revision = self.etcd.get_prefix(self.layout.tombstones)
        deleted = sum(self.etcd.delete_if(kv.key, kv.mod_revision) for kv in kvs if kv.mod_revision <= floor)
        self.etcd.compact(revision)
        return deleted

    # ---- applying ----------------------------------------------------------------------------

    def replay(self) -> None:
        """Apply every tombstone past the watermark, reading the present state of etcd. If tombstones this node
        never applied were trimmed (or etcd was replaced), call wipe_ssd() first. Runs before every (re)join."""
        with self._lock:
            kvs, revision = self.etcd.get_prefix(self.layout.tombstones)
            floor_kv, _ = self.etcd.get(self.layout.tombstone_floor)  # after the keys: see the module docstring
            floor = _int(floor_kv.value) if floor_kv is not None else 0
            cluster_id = self.etcd.cluster_id
            state = self._state
            if state.etcd_cluster_id and cluster_id and state.etcd_cluster_id != cluster_id:
                log.warning("etcd cluster id changed (%x -> %x): deletes recorded in the old one are unknown; wiping the ssd tier",
                            state.etcd_cluster_id, cluster_id)
                self._wipe()
                state = AppliedState(0, cluster_id)
            if floor > state.revision:
                log.warning("tombstones up to revision %d were trimmed but this node applied only up to %d; wiping the ssd tier",
                            floor, state.revision)
                self._wipe()
                state = AppliedState(floor, state.etcd_cluster_id)
            self._state = AppliedState(state.revision, cluster_id or state.etcd_cluster_id)
            self._apply_all(Tombstone.decode(kv) for kv in sorted(kvs, key=lambda kv: kv.mod_revision))
            # Nothing at or below `revision` is missing now: the read showed every tombstone that existed then.
            self._advance(revision)
            self._watch_from = max(self._watch_from, revision + 1)
        self.ack()

    def _apply_all(self, tombstones) -> None:
        for t in tombstones:
            if t.revision <= self._state.revision:
                continue
            self.apply(t)
            self.counters[Event.TOMBSTONES_APPLIED] += 1
            log.info("applied tombstone %d (tenant %r, fingerprint %s, %d keys, secure=%s)", t.revision, t.tenant,
                     t.fingerprint_id.hex() or "*", len(t.keys), t.secure)
            self._advance(t.revision)

    def _advance(self, revision: int) -> None:
        if revision > self._state.revision:
            self._state = AppliedState(revision, self._state.etcd_cluster_id)
            save_state(self.state_path, self._state)

    def _wipe(self) -> None:
        self.counters[Event.CLUSTER_SSD_WIPES] += 1
        self.wipe_ssd()

    def ack(self) -> None:
        """Publish the watermark under the membership lease (skipped while there is none: fenced or not joined)."""
        lease = self.lease_id()
        if not lease:
            return
        try:
            self.etcd.put(self.ack_key, str(self.applied_revision).encode(), lease=lease)
        except EtcdError as err:  # the next apply or join writes it again
            log.info("tombstone ack of %s not written: %s", self.node_name, err)

    # ---- the watch ---------------------------------------------------------------------------

    def start(self) -> None:
        """Watch for new tombstones (replaying first if nobody has yet)."""
        if self._watch_from == 0:
            self.replay()
        self._watch = self.etcd.watch_prefix(self.layout.tombstones, self._watch_from, self._on_events, self._on_watch_error,
                                             name=f"kvstore-tombstones-{self.node_name}")

    def _on_events(self, events: list[WatchEvent]) -> None:
        puts = [Tombstone.decode(e.kv) for e in events if e.kind is EventKind.PUT]
        if not puts:
            return  # a trim's deletes
        try:
            with self._lock:
                self._apply_all(puts)
        except Exception:
            log.exception("applying a tombstone failed; replaying in the background")
            self._replay_in_background()
            return
        self.ack()

    def _on_watch_error(self, err: EtcdError) -> None:
        if isinstance(err, CompactedError):
            log.info("tombstone watch: %s; re-reading the present tombstones", err)
        self._replay_in_background(restart_watch=True)

    def _replay_in_background(self, restart_watch: bool = False) -> None:
        def run() -> None:
            delay = 0.2
            while not self._stopped.is_set():
                try:
                    self.replay()
                    if restart_watch and not self._stopped.is_set():
                        self._watch = self.etcd.watch_prefix(self.layout.tombstones, self._watch_from, self._on_events,
                                                             self._on_watch_error, name=f"kvstore-tombstones-{self.node_name}")
                    return
                except Exception as err:
                    log.info("tombstone replay failed (%s); retrying", err)
                    self._stopped.wait(delay)
                    delay = min(delay * 2, 2.0)

        threading.Thread(target=run, name=f"kvstore-tombstones-replay-{self.node_name}", daemon=True).start()

    def close(self) -> None:
        self._stopped.set()
        if self._watch is not None:
            self._watch.cancel()


def _int(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0
