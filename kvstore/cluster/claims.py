"""Cluster-wide single writer, the asking node's half: claim a key at its first home before a client computes it.

Owns the store's ClaimSource (store.py): for keys a client was just granted here and that no node holds,
claim them at each key's D1 (HRW top-1 over the active members, the home that answers its Locate); keys
another node claimed first are answered PENDING, and a Wait here long-polls that home until the claim ends
(the block announced, the lease released or lapsed, its holder gone from the view). Releases and renewals
of leases follow their claims off the caller's path. It refuses the claim bookkeeping (claim_table.py) and
the local lease rules (block_table.py: a key pending here never reaches a home).

Availability before dedup: a home that cannot answer within CLAIM_TIMEOUT_S (down, stopped, partitioned,
breaker open) grants here, so a key is computed at most twice in a partition and no client waits on a home
longer than the Wait it asked for.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from kvwire.errors import KVStoreError
from kvwire.types import LeaseOutcome
from kvstore.cluster.announcer import active_ring
from kvstore.cluster.claim_table import ClaimAnswer, ClaimTable
from kvstore.cluster.directory import DirectoryShard, HolderId, Rendezvous, live_holders
from kvstore.cluster.peers import Peers
from kvstore.cluster.view import ClusterView
from kvstore.counters import Event

log = logging.getLogger(__name__)

CLAIM_TIMEOUT_S = 0.5  # a claim waits this long for its home (the Locate's bound), then grants here
RELEASE_TIMEOUT_S = 1.0
WAIT_SLICE_S = 2.0  # a long-poll is sent in slices this long, so a Wait whose caller went away ends soon
WAIT_POLL_S = 0.05  # between the answers of a home too busy to hold a long-poll
WAIT_MARGIN_S = 0.15  # a home answers this much before the call's deadline, so a long-poll never times out
PENDING_PRUNE_AT = 4096  # remembered pending claims: lapsed ones are dropped once there are this many


def presence(shard: DirectoryShard, fingerprint_id: bytes, live: frozenset[HolderId]) -> Callable[[Sequence[bytes]], list[bool]]:
    """For a home's claim table: which keys its shard names a live holder for (they need no computing)."""
    def present(skeys: Sequence[bytes]) -> list[bool]:
        out = [False] * len(skeys)
        for position in shard.locate_columns(fingerprint_id, skeys, live).positions:
            out[position] = True
        return out

    return present


class ClusterClaims:
    def __init__(self, me: str, identity: Callable[[], tuple[int, ClusterView]], peers: Peers, shard: DirectoryShard,
                 table: ClaimTable, counters: Counter) -> None:
        self.me = me
        self.identity = identity
        self.peers = peers
        self.shard = shard
        self.table = table  # this node's own claims as a home
        self.counters = counters
        self._ring: tuple[int, Rendezvous] = (-1, Rendezvous(()))
        # skey -> (home holding another node's claim, when it lapses, the key claimed: itself, or its chain's head)
        self._pending: dict[bytes, tuple[str, float, bytes]] = {}
        self._lock = threading.Lock()
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvstore-claims")

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)

    def _wait_on_own_claims(self, skeys: Sequence[bytes], positions: list[int], behind: dict[bytes, list[int]],
                            home: dict[bytes, str], lapses_at: dict[bytes, float]) -> None:
        """Once a chain's head is no longer claimed, each key that waited behind it waits on its own claim, at its
        own home: the winner claimed those too, and each claim ends when that block's home has it (stored, so a
        lookup there finds it). The head's home may learn of its block first; a waiter that stopped there could
        find the rest not yet announced, MISSING, and compute them again."""
        for name, at in self._first_homes(self.identity()[1], [skeys[i] for i in positions]).items():
            for k in at:
                i = positions[k]
                behind[skeys[i]], home[skeys[i]] = [i], name
                lapses_at[skeys[i]] = time.monotonic() + WAIT_SLICE_S  # until its home answers with the claim's own

    def _first_homes(self, view: ClusterView, skeys: Sequence[bytes]) -> dict[str, list[int]]:
        revision, ring = self._ring
        if revision != view.revision:
            ring = active_ring(view)
            self._ring = (view.revision, ring)
        if not len(ring) or not skeys:
            return {}
        first = ring.homes(skeys, count=1)[:, 0]
        return {ring.names[k]: np.flatnonzero(first == k).tolist() for k in np.unique(first).tolist()}

    # ---- the store's ClaimSource ------------------------------------------------------------

    def claim(self, fingerprint_id: bytes, skeys: Sequence[bytes], lease_ids: Sequence[int], ttl_s: float,
              count: bool = True) -> list[ClaimAnswer]:
        """Each key's cluster-wide answer for leases granted here: GRANTED (this node computes it), PENDING (another
        node does: its name, until its claim lapses) or ALREADY_PRESENT. GRANTED where the home cannot answer.

        Head first: skeys are a chain's keys in order, and a chain is computed from its first missing block on,
        so the first key is claimed alone and decides for the rest. Its winner then claims the others at their
        homes; a loser answers them all PENDING behind it (its Wait waits on the head's claim), without asking.
        Claimed all at once, two nodes racing for one prompt would each win some keys at their homes and both
        compute the whole chain (each from its first grant on). It costs the winner one more round trip."""
        out = [ClaimAnswer(LeaseOutcome.GRANTED)] * len(skeys)
        incarnation, view = self.identity()
        if incarnation == 0 or not skeys:
            return out
        homes = self._first_homes(view, skeys)
        if not homes:  # no active member to be home (this node alone, draining): nobody to share the work with
            return out
        home_of = {i: name for name, pos in homes.items() for i in pos}
        head = self._ask(fingerprint_id, {home_of[0]: [0]}, skeys, lease_ids, ttl_s, incarnation, view)[0]
        out[0] = head
        now = time.monotonic()
        if head.outcome == LeaseOutcome.PENDING:
            out = [head] * len(skeys)
            with self._lock:
                self._prune(now)
                for skey in skeys:
                    self._pending[skey] = (home_of[0], now + head.expires_in_s, skeys[0])
        else:
            rest = {name: [i for i in pos if i] for name, pos in homes.items()}
            for i, answer in self._ask(fingerprint_id, {n: p for n, p in rest.items() if p}, skeys, lease_ids, ttl_s, incarnation, view).items():
                out[i] = answer
            with self._lock:
                self._prune(now)
                for i, answer in enumerate(out):
                    if answer.outcome == LeaseOutcome.PENDING:
                        self._pending[skeys[i]] = (home_of[i], now + answer.expires_in_s, skeys[i])
                    else:
                        self._pending.pop(skeys[i], None)
        if count:
            self.counters[Event.CLUSTER_CLAIMS_GRANTED] += sum(a.outcome == LeaseOutcome.GRANTED for a in out)
            self.counters[Event.CLUSTER_CLAIMS_PENDING] += sum(a.outcome == LeaseOutcome.PENDING for a in out)
        return out

    def _prune(self, now: float) -> None:
        if len(self._pending) >= PENDING_PRUNE_AT:
            self._pending = {k: v for k, v in self._pending.items() if v[1] > now}

    def _ask(self, fingerprint_id: bytes, asks: dict[str, list[int]], skeys: Sequence[bytes], lease_ids: Sequence[int],
             ttl_s: float, incarnation: int, view: ClusterView) -> dict[int, ClaimAnswer]:
        """Claim the keys at these positions at their homes (asks: home -> positions), this node's own table for
        its own; GRANTED where a home cannot answer (availability before dedup)."""
        out = {i: ClaimAnswer(LeaseOutcome.GRANTED) for pos in asks.values() for i in pos}
        asks = dict(asks)
        mine = asks.pop(self.me, None)
        if mine:
            live = live_holders(view)
            answers = self.table.claim((self.me, incarnation), [skeys[i] for i in mine], [lease_ids[i] for i in mine], ttl_s,
                                       live, presence(self.shard, fingerprint_id, live))
            out.update(zip(mine, answers))
        if asks:
            answered = self.peers.claim_many(fingerprint_id, {name: ([skeys[i] for i in pos], [lease_ids[i] for i in pos])
                                                              for name, pos in asks.items()}, ttl_s, CLAIM_TIMEOUT_S)
            for name, answers in answered.items():
                if isinstance(answers, KVStoreError):  # availability before dedup: the key is computed here
                    self.counters[Event.CLUSTER_CLAIMS_LOCAL] += len(asks[name])
                    log.debug("claim at %s failed, granted here: %s", name, answers)
                    continue
                out.update(zip(asks[name], answers))
        return out

    def renew(self, fingerprint_id: bytes, skeys: Sequence[bytes], lease_ids: Sequence[int], ttl_s: float) -> None:
        """A lease renewed here renews its claim (off the caller's path; a lapsed claim may then go to another node)."""
        if skeys:
            self._submit(self.claim, fingerprint_id, list(skeys), list(lease_ids), ttl_s, False)

    def release(self, skeys: Sequence[bytes], lease_ids: Sequence[int]) -> None:
        """Leases given up here end their claims at the homes, so a waiting node takes over now (off the caller's path)."""
        if skeys:
            self._submit(self._release, list(skeys), list(lease_ids))

    def _submit(self, fn: Callable, *args) -> None:
        try:
            self._background.submit(fn, *args)
        except RuntimeError:  # closed
            pass

    def _release(self, skeys: list[bytes], lease_ids: list[int]) -> None:
        incarnation, view = self.identity()
        if incarnation == 0:
            return
        for name, pos in self._first_homes(view, skeys).items():
            keys, ids = [skeys[i] for i in pos], [lease_ids[i] for i in pos]
            try:
                if name == self.me:
                    self.table.release((self.me, incarnation), keys, ids)
                else:
                    self.peers.release_claims(name, keys, ids, RELEASE_TIMEOUT_S)
            except KVStoreError as err:
                log.debug("release of claims at %s failed (they lapse): %s", name, err)

    def wait(self, skeys: Sequence[bytes], timeout_s: float, is_active: Callable[[], bool] | None = None) -> dict[int, float]:
        """Wait until none of skeys is claimed by another node, timeout_s at most: (position -> seconds until its
        claim lapses) of those still claimed. Only keys answered PENDING here are asked about (a key pending behind
        its chain's head waits on the head's claim); a home that cannot answer counts its keys as no longer claimed
        (the client acquires again, and the claim is then granted here)."""
        now = time.monotonic()
        behind: dict[bytes, list[int]] = {}  # claimed key asked about -> positions waiting on it
        home: dict[bytes, str] = {}
        lapses_at: dict[bytes, float] = {}
        with self._lock:
            for i, skey in enumerate(skeys):
                if (known := self._pending.get(skey)) is not None and known[1] > now:
                    behind.setdefault(known[2], []).append(i)
                    home[known[2]], lapses_at[known[2]] = known[0], known[1]
        deadline = now + timeout_s
        while behind:
            left = deadline - time.monotonic()
            if left <= WAIT_MARGIN_S or (is_active is not None and not is_active()):
                now = time.monotonic()
                return {i: max(0.0, lapses_at[claimed] - now) for claimed, pos in behind.items() for i in pos}
            slice_s = min(left - WAIT_MARGIN_S, WAIT_SLICE_S)
            sliced_at = time.monotonic()
            asks: dict[str, list[bytes]] = {}
            for claimed in behind:
                asks.setdefault(home[claimed], []).append(claimed)
            mine = asks.pop(self.me, None)
            answers: dict[str, list[tuple[int, float]] | KVStoreError] = {}
            if asks:
                answers.update(self.peers.wait_claims_many(asks, slice_s, slice_s + WAIT_MARGIN_S))
            if mine is not None:  # after the homes' answers: within what is left of this slice
                local_s = max(0.0, min(slice_s, deadline - time.monotonic() - WAIT_MARGIN_S))
                answers[self.me] = self.table.wait(mine, local_s, lambda: live_holders(self.identity()[1]), is_active)
                asks[self.me] = mine
            still: dict[bytes, list[int]] = {}
            followers: list[int] = []  # keys that waited behind a head whose claim just ended
            with self._lock:
                for name, answer in answers.items():
                    answered = not isinstance(answer, KVStoreError)
                    if not answered:
                        log.debug("waiting on claims at %s failed (counted as ended): %s", name, answer)
                        answer = []
                    claimed_now = dict(answer)
                    for j, claimed in enumerate(asks[name]):
                        waiting = behind[claimed]
                        if j in claimed_now:
                            lapses_at[claimed] = time.monotonic() + claimed_now[j]
                            still[claimed] = waiting
                            for i in waiting:
                                self._pending[skeys[i]] = (name, lapses_at[claimed], claimed)
                        else:
                            for i in waiting:
                                self._pending.pop(skeys[i], None)
                            if answered:  # an unreachable home's keys count as unclaimed, its chains' too
                                followers += [i for i in waiting if skeys[i] != claimed]
            if followers:
                self._wait_on_own_claims(skeys, followers, still, home, lapses_at)
            behind = still
            if behind and not followers and time.monotonic() - sliced_at < slice_s / 2:  # a busy home answered at once: poll, do not spin
                time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic() - WAIT_MARGIN_S)))
        return {}
