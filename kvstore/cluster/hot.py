"""Hot keys at a directory home: spreading readers over holders by load, and more copies of keys that stay hot.

Owns what a home adds to its shard's Locate answers (design/cluster.md §3.10):
  - **holder order by load.** The home keeps, per holder incarnation, a decayed count of the bytes it has
    pointed readers at (the first holder it names for each key found). Every answer lists holders least
    loaded first, and a reader takes the first unless its own view of that peer (in-flight transfers,
    latency: holder_choice.py) says the other of its two choices is better. Why the home: a reader knows only
    its own traffic, so readers of a hot prefix arriving one after another would each pick the writer (or a
    coin flip), and the writer would serve nearly every copy; the home sees the readers that ask it, and names
    the newest copy first among equally loaded ones, so the second reader is sent to the first reader's copy,
    the third to the second's, and so on.
  - **demand per key.** A decayed count-min sketch (sketch.py) of Locates per key. A key whose count passes
    hot_threshold while fewer than hot_replicas live nodes hold it is pushed: the next nodes of a rendezvous
    ranking (the same for the whole prefix: _plan) take copies of the request's run of such keys from the
    least loaded holder, through `push` (the copy primitive), up to hot_replicas holders. Each key is
    pushed at most once per PUSH_QUIET_S, off the Locate's path (a thread of its own).
It refuses the shard's bookkeeping (directory.py) and the push's transport (the caller's `push`).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import numpy as np
import xxhash

from kvstore.cluster.directory import SKEY_BYTES, DirectoryShard, HolderId, Locations, Rendezvous, key_words
from kvstore.cluster.sketch import DecayedCountMin
from kvstore.counters import Event

log = logging.getLogger(__name__)

LOAD_BUCKET = 1.25  # loads within this factor of each other rank as equal (decay makes exact ties rare)
HALF_LIFE_S = 10.0  # demand and load both fade by half in this long
PUSH_QUIET_S = 10.0  # a key pushed is not pushed again for this long (the copies take a moment to be announced)


@dataclass(frozen=True)
class HotPush:
    """Ask `target` to take copies of `skeys` (a run of one fingerprint's keys, in order) from `source`."""

    target: str
    source: HolderId
    fingerprint_id: bytes
    skeys: tuple[bytes, ...]
    size_bytes: int


class HolderLoad:
    """Decayed bytes a home has pointed readers at, per holder incarnation."""

    def __init__(self, half_life_s: float = HALF_LIFE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.half_life_s = half_life_s
        self.clock = clock
        self._load: dict[HolderId, tuple[float, float]] = {}  # holder -> (bytes, when)
        self._lock = threading.Lock()

    def _now_value(self, holder: HolderId, now: float) -> float:
        value, when = self._load.get(holder, (0.0, now))
        return value * 0.5 ** ((now - when) / self.half_life_s)

    def add(self, holder: HolderId, nbytes: float) -> None:
        now = self.clock()
        with self._lock:
            self._load[holder] = (self._now_value(holder, now) + nbytes, now)

    def of(self, holder: HolderId) -> float:
        with self._lock:
            return self._now_value(holder, self.clock())

    def rank(self, holders: Sequence[HolderId], newest: Callable[[HolderId], int] | None = None) -> list[HolderId]:
        """holders, least loaded first. Loads within LOAD_BUCKET of each other count as equal: then the newest copy
        first (newest(h): higher is newer; by default the position in holders, which a shard keeps in announce order),
        as a new copy has served nobody yet, while the first holder of a key usually served its first readers
        before this home heard of them (a home sees only the Locates it answers)."""
        now = self.clock()
        position = newest or {h: i for i, h in enumerate(holders)}.__getitem__
        with self._lock:
            return sorted(holders, key=lambda h: (_bucket(self._now_value(h, now)), -position(h), h))

    def forget(self, live: Collection[HolderId]) -> None:
        with self._lock:
            self._load = {h: v for h, v in self._load.items() if h in live}


class HotSpread:
    """A home's Locate answers, ordered by holder load, with demand counted and hot keys pushed."""

    def __init__(self, me: str, shard: DirectoryShard, ring: Callable[[], Rendezvous], counters: Counter, threshold: float,
                 replicas: int, push: Callable[[HotPush], None], settling: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """ring(): the rendezvous over the active members (the order of a run's next copies). push: have a node take
        copies (ClusterNode.request_copies; blocking, run on a thread of its own). threshold <= 0 or replicas <= 1:
        no pushes (holders are still ordered by load). settling(): readers still ask both homes of every key (just
        after a membership change: RemoteTier.settling); no pushes then, or both homes would push the same keys."""
        self.me = me
        self.shard = shard
        self.ring = ring
        self.counters = counters
        self.threshold = threshold
        self.replicas = replicas
        self.push = push
        self.settling = settling
        self.clock = clock
        self.load = HolderLoad(clock=clock)
        self.demand = DecayedCountMin(HALF_LIFE_S, clock=clock)
        self._pushed: dict[bytes, float] = {}  # skey -> when it was last pushed
        self._lock = threading.Lock()
        self._pushes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-hot-push")

    def close(self) -> None:
        self._pushes.shutdown(wait=False, cancel_futures=True)

    def answer(self, fingerprint_id: bytes, skeys: Sequence[bytes], live: Collection[HolderId]) -> tuple[Locations, list[HolderId]]:
        """The shard's answer with each holder set least loaded first, and every holder named, in that order (the
        wire lists holders once: locate_response keeps this order). Counts demand, may start pushes."""
        found = self.shard.locate_columns(fingerprint_id, skeys, live)
        if not found.positions:
            return found, []
        runs = _set_runs(found)
        by_set: dict[int, tuple[tuple[HolderId, ...], int]] = {}  # id(set) -> (set, bytes of its rows)
        for holders, _, _, nbytes in runs:
            known = by_set.get(id(holders))
            by_set[id(holders)] = (holders, nbytes + (known[1] if known else 0))
        newest: dict[HolderId, int] = {}  # the latest position each holder has in a set (sets keep announce order)
        for holders, _ in by_set.values():
            for i, h in enumerate(holders):
                newest[h] = max(i, newest.get(h, -1))
        order = self.load.rank(list(newest), newest.__getitem__)
        rank = {h: i for i, h in enumerate(order)}
        ordered: dict[int, tuple[HolderId, ...]] = {}
        for key, (holders, nbytes) in by_set.items():
            ordered[key] = tuple(sorted(holders, key=rank.__getitem__))
            self.load.add(ordered[key][0], nbytes)  # the reader takes the first, unless it knows better
        answer = found
        if any(ordered[key] != holders for key, (holders, _) in by_set.items()):
            column: list[tuple[HolderId, ...]] = []
            for holders, start, stop, _ in runs:
                column += [ordered[id(holders)]] * (stop - start)
            answer = found._replace(holders=column)
        if self.threshold > 0 and self.replicas > 1:
            self._count(fingerprint_id, skeys, answer)
        return answer, order

    def _count(self, fingerprint_id: bytes, skeys: Sequence[bytes], found: Locations) -> None:
        asked = [skeys[i] for i in found.positions] if len(found.positions) < len(skeys) else list(skeys)
        counts = self.demand.add(key_words(asked))
        hot = [j for j in np.flatnonzero(counts >= self.threshold).tolist() if len(found.holders[j]) < self.replicas]
        if not hot or self.settling():
            return
        ring = self.ring()
        if self.me not in ring.names:
            return
        first = ring.homes([asked[j] for j in hot], count=1)[:, 0] == ring.names.index(self.me)
        hot = [j for j, mine in zip(hot, first.tolist()) if mine]  # a key's first home alone pushes it (see _plan)
        now = self.clock()
        with self._lock:
            hot = [j for j in hot if now - self._pushed.get(asked[j], -PUSH_QUIET_S) >= PUSH_QUIET_S]
            for j in hot:
                self._pushed[asked[j]] = now
            if len(self._pushed) > 65536:
                self._pushed = {k: t for k, t in self._pushed.items() if now - t < PUSH_QUIET_S}
        for run in _runs(hot, found.holders):
            self._plan(fingerprint_id, [asked[j] for j in run], found.holders[run[0]], sum(found.sizes[j] for j in run))

    def _plan(self, fingerprint_id: bytes, skeys: list[bytes], holders: tuple[HolderId, ...], nbytes: int) -> None:
        """Pushes for one run of hot keys that share their holders: the next nodes of the run's rendezvous ranking that
        hold none of it, up to `replicas` holders in all, each copying from the least loaded holder.

        The ranking is keyed by the fingerprint and the holders' names, not by the run's first key: a reader asks
        each home about its own keys only, so one hot prefix reaches every home of its keys as separate runs, and a
        per-key ranking would scatter the prefix over the cluster (a later reader would find short runs everywhere).
        Keyed alike at every home, the whole prefix goes to the same nodes. The cost: hot prefixes of one model
        held by the same nodes go to the same next nodes (readers still spread over all the copies).
        Only a key's first home pushes it: a reader that is a key's second home asks itself, so both homes can
        count a key past the threshold, and both pushing would copy it twice."""
        ring = self.ring()
        if len(ring) == 0:
            return
        holding = {name for name, _ in holders}
        anchor = xxhash.xxh3_128_digest(fingerprint_id + "\0".join(sorted(holding)).encode()).ljust(SKEY_BYTES, b"\0")
        nodes = [ring.names[i] for i in ring.homes([anchor], count=len(ring))[0].tolist()]
        targets = [n for n in nodes if n not in holding][: max(0, self.replicas - len(holders))]
        for target in targets:
            source = self.load.rank(holders)[0]
            self.load.add(source, nbytes)
            push = HotPush(target, source, fingerprint_id, tuple(skeys), nbytes)
            self.counters[Event.DIRECTORY_HOT_PUSHES] += 1
            try:
                self._pushes.submit(self._send, push)
            except RuntimeError:  # closed
                return

    def _send(self, push: HotPush) -> None:
        try:
            self.push(push)
        except Exception as err:  # a push is an optimisation: readers still fetch from the holders there are
            self.counters[Event.DIRECTORY_HOT_PUSH_FAILURES] += 1
            log.debug("hot push of %d blocks to %s failed: %s", len(push.skeys), push.target, err)

    def forget(self, live: Collection[HolderId]) -> None:
        self.load.forget(live)


def _set_runs(found: Locations) -> list[tuple[tuple[HolderId, ...], int, int, int]]:
    """(holder set, first row, end row, bytes) of each run of rows sharing one holder set (the shard interns them, so
    a set is one object): the rows are walked in numpy, so a 512-key answer costs microseconds, not a loop a row."""
    n = len(found.holders)
    ids = np.fromiter(map(id, found.holders), dtype=np.int64, count=n)
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    nbytes = np.add.reduceat(np.asarray(found.sizes, dtype=np.int64), starts).tolist()
    ends = [*starts[1:].tolist(), n]
    return [(found.holders[a], a, b, size) for a, b, size in zip(starts.tolist(), ends, nbytes)]


def _bucket(load: float) -> int:
    return int(math.log1p(load) / math.log(LOAD_BUCKET))


def _runs(positions: list[int], holders: list[tuple[HolderId, ...]]) -> list[list[int]]:
    """positions split into runs of consecutive positions with the same holder set."""
    runs: list[list[int]] = []
    for j in positions:
        if runs and runs[-1][-1] == j - 1 and holders[runs[-1][-1]] == holders[j]:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs
