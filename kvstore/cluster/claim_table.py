"""A directory home's write claims: which node is computing a key that no node holds yet (design/cluster.md §3.8).

Owns, for the keys this node is first home (D1) of, `pending: storage key -> Claim(holder node, incarnation,
lease id, expiry)`, and the long-poll of nodes whose clients wait for a claimed key. It is plain data under
one condition, tested in process; it refuses the network (peer_service.py, claims.py) and what a claim means
to a client's lease (store.py, claims.py).

Why a claim ends without a message from its holder:
  - the block is committed and announced: the home's shard tells this table (DirectoryShard.on_stored), so a
    waiter that wakes finds the block where it looks next (the same home answers its Locate);
  - its holder incarnation leaves the view (killed, partitioned, restarted): forget_dead, at the view change,
    with no TTL wait;
  - it expires: the holder's client let its lease lapse (a claim lives as long as the lease it stands for,
    renewed with it).
A holder's client that gives its lease up (Release) ends the claim by lease id, so a late release cannot end
a newer claim of the same node for the same key.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, NamedTuple, Sequence

from kvwire.types import LeaseOutcome

from kvstore.cluster.directory import HolderId


@dataclass(slots=True)
class Claim:
    holder: HolderId
    lease_id: int  # the holder node's own lease: what its release names
    expires_at: float  # this node's monotonic clock


class ClaimAnswer(NamedTuple):
    """One key's answer to a claim: GRANTED, ALREADY_PRESENT (a live holder has the block) or PENDING (holder computes it)."""

    outcome: LeaseOutcome
    holder: str = ""  # the claiming node, when PENDING
    expires_in_s: float = 0.0  # until that claim lapses unless renewed, when PENDING


class ClaimTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._pending: dict[bytes, Claim] = {}
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._pending)

    def _live(self, claim: Claim | None, live: Collection[HolderId], now: float) -> bool:
        return claim is not None and claim.expires_at > now and claim.holder in live

    def claim(self, holder: HolderId, skeys: Sequence[bytes], lease_ids: Sequence[int], ttl_s: float,
              live: Collection[HolderId], present: Callable[[Sequence[bytes]], Sequence[bool]]) -> list[ClaimAnswer]:
        """The first live claimant of a key is granted (again, renewed, for the same holder incarnation); others
        are told who holds it; a key a live holder already has is ALREADY_PRESENT. present(skeys): per key,
        whether the shard names a live holder for it (read before this table's lock: the shard has its own)."""
        held = present(skeys)
        out: list[ClaimAnswer] = []
        with self._changed:
            now = self.clock()
            for skey, lease_id, is_present in zip(skeys, lease_ids, held):
                if is_present:
                    out.append(ClaimAnswer(LeaseOutcome.ALREADY_PRESENT))
                    continue
                claim = self._pending.get(skey)
                if self._live(claim, live, now) and claim.holder != holder:
                    out.append(ClaimAnswer(LeaseOutcome.PENDING, claim.holder[0], claim.expires_at - now))
                    continue
                self._pending[skey] = Claim(holder, lease_id, now + ttl_s)
                out.append(ClaimAnswer(LeaseOutcome.GRANTED))
        return out

    def release(self, holder: HolderId, skeys: Sequence[bytes], lease_ids: Sequence[int]) -> int:
        """The holder gave these leases up: their claims end now (only the claims they stand for)."""
        released = 0
        with self._changed:
            for skey, lease_id in zip(skeys, lease_ids):
                claim = self._pending.get(skey)
                if claim is not None and claim.holder == holder and claim.lease_id == lease_id:
                    del self._pending[skey]
                    released += 1
            if released:
                self._changed.notify_all()
        return released

    def stored(self, skeys: Iterable[bytes]) -> None:
        """Blocks were announced to this home: whoever claimed them is done (DirectoryShard.on_stored)."""
        if not self._pending:
            return
        with self._changed:
            ended = [skey for skey in skeys if self._pending.pop(skey, None) is not None]
            if ended:
                self._changed.notify_all()

    def forget_dead(self, live: Collection[HolderId]) -> int:
        """A view change: claims of holder incarnations no longer live end at once (their waiters wake)."""
        with self._changed:
            dead = [skey for skey, claim in self._pending.items() if claim.holder not in live]
            for skey in dead:
                del self._pending[skey]
            if dead:
                self._changed.notify_all()
        return len(dead)

    def clear(self) -> None:
        """This node was fenced: what it knew may be stale by the time it rejoins."""
        with self._changed:
            self._pending.clear()
            self._changed.notify_all()

    def wait(self, skeys: Sequence[bytes], timeout_s: float, live: Callable[[], Collection[HolderId]],
             is_active: Callable[[], bool] | None = None, poll_s: float = 0.25) -> list[tuple[int, float]]:
        """Block until none of skeys has a live claim, for timeout_s at most; (position, seconds until it lapses) of
        those still claimed. live() is read on each wake (the view may have changed); is_active() (checked every
        poll_s) ends the wait early when the asker has gone."""
        deadline = self.clock() + max(0.0, timeout_s)
        with self._changed:
            while True:
                now, members = self.clock(), live()
                claimed = [(i, claim.expires_at - now) for i, skey in enumerate(skeys)
                           if self._live(claim := self._pending.get(skey), members, now)]
                left = deadline - now
                if not claimed or left <= 0 or (is_active is not None and not is_active()):
                    return claimed
                soonest = min(expires_in for _, expires_in in claimed)
                self._changed.wait(max(0.001, min(left, soonest, poll_s)))
