"""drain --handoff: before a node leaves, the blocks no other node holds move to peers, so leaving loses none.

Order (design/cluster.md §3.10): writes already refused (the server stops admitting first), the member record
set draining (peers stop homing keys here and stop choosing this node as a target), then every block here is
looked up in the directory; those no live peer holds are copied (the copy primitive, origin handoff, not
rate capped: the operator is waiting) to the first node of their rendezvous ranking among the active
members, keyed by the run's first key so chains stay together, the next node taking what the first did
not. Only then does the node leave. Blocks that no peer took stay on this node's ssd tier (counted).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

from kvstore.cluster.replicas import replica_targets
from kvstore.cluster.replicator import Replicator, group_blocks
from kvstore.cluster.view import ClusterView, MemberState
from kvstore.counters import Event
from kvstore.index import Origin

if TYPE_CHECKING:
    from kvstore.cluster.membership import Membership
    from kvstore.cluster.remote_tier import RemoteTier
    from kvstore.store import Store

log = logging.getLogger(__name__)

LOCATE_CHUNK = 4096
DRAINING_SEEN_S = 1.0  # how long to wait for this node's own watch to show it draining
TARGETS_TRIED = 2  # nodes of a run's ranking asked in turn


def hand_off(me: str, store: "Store", membership: "Membership", remote: "RemoteTier", replicator: Replicator,
             counters: Counter, identity: Callable[[], tuple[int, ClusterView]]) -> tuple[int, int]:
    """Mark this node draining and move its sole copies to peers; (blocks peers took, sole copies none took)."""
    membership.drain()
    membership.wait_view(lambda v: (m := v.members.get(me)) is None or m.state == MemberState.DRAINING, DRAINING_SEEN_S)
    started = time.monotonic()
    by_fp: dict[bytes, list[bytes]] = {}
    for skey, fingerprint_id, _, _ in store.catalog():
        by_fp.setdefault(fingerprint_id, []).append(skey)
    sole: list[bytes] = []
    for fingerprint_id, skeys in by_fp.items():
        for start in range(0, len(skeys), LOCATE_CHUNK):
            chunk = skeys[start : start + LOCATE_CHUNK]
            sole += [skey for skey, held in zip(chunk, remote.held_elsewhere(fingerprint_id, chunk)) if not held]
    described = store.describe(sole)
    groups = group_blocks([(skey, *d) for skey, d in zip(sole, described) if d is not None])
    moved = 0
    _, view = identity()
    for group in groups:
        left = group
        for target in replica_targets(view, me, group.skeys[0], TARGETS_TRIED):
            held = replicator.send(target, [left], Origin.HANDOFF, capped=False)[0]
            moved += held
            if held == len(left.skeys):
                break
            left = type(group)(left.tenant, left.fingerprint_id, left.skeys[held:], left.sizes[held:], left.checksums[held:])
    counters[Event.CLUSTER_HANDED_OFF] += moved
    total = sum(len(g.skeys) for g in groups)
    log.info("handoff: %d of %d sole copies moved to peers in %.2f s", moved, total, time.monotonic() - started)
    return moved, total - moved
