"""The cluster directory: which nodes are home for a key, and the shard of entries a home keeps.

Owns rendezvous (HRW) hashing over the live members, and a home's shard: storage key ->
(fingerprint, size, checksum, holders as (node, incarnation)). It refuses the network (peers.py)
and deciding what to announce (announcer.py); it is plain data under one lock, tested in process.

Why entries keep incarnations: a holder that dies or restarts is a new incarnation, so its old
entries stop counting the moment the view changes, with no sweep and no message from anyone
(the failure in SGLang PR #39822: an indexer that kept attributing blocks to a worker that had
come back empty). Filtering happens at read time against the live view; pruning is lazy.
Entries are hints: the holder is the truth, and a reader whose fetch finds nothing sends a repair.

Why sequence numbers: announces are batched per (holder incarnation, home), numbered from 1. A
home that sees a gap, or a holder incarnation it has never heard from past batch 1 (it restarted,
or it missed the first batches), applies nothing and asks for a resync: the holder's full set
for that home replaces whatever the home had (Dynamo's event ids + tree dump, PR #4921).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, NamedTuple, Sequence

import numpy as np
import xxhash

HOMES = 2  # D1 answers Locate, D2 is its hot standby; a reader asks both and takes the union

HolderId = tuple[str, int]  # (node name, incarnation)


@dataclass(frozen=True, slots=True)
class BlockRef:
    """A block as a holder announces it to its homes."""

    skey: bytes
    fingerprint_id: bytes
    size: int
    checksum: int


class Located(NamedTuple):
    """Where a key's block is, as the directory knows it: live holders only. (A tuple: a 512-key Locate makes hundreds.)"""

    size: int
    checksum: int
    holders: tuple[HolderId, ...]


def live_holders(view) -> frozenset[HolderId]:
    """The (name, incarnation) of every member of a ClusterView: what a holder must be to count."""
    return frozenset((name, m.incarnation) for name, m in view.members.items())


# ---- rendezvous hashing ------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise (uint64 arithmetic wraps, as the hash wants)."""
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


SKEY_BYTES = 24  # a storage key: 8-byte tenant tag + 16-byte block key (kvstore/index.py)


def key_words(skeys: Sequence[bytes]) -> np.ndarray:
    """One uint64 per storage key: its tenant tag's first 8 bytes xor its block key's last 8 (both are hashes already).
    Storage keys of the usual length are joined once and read as three words each (a third of the slicing's cost)."""
    joined = b"".join(skeys)
    if len(joined) == SKEY_BYTES * len(skeys) and set(map(len, skeys)) == {SKEY_BYTES}:  # (map: no Python loop a key)
        words = np.frombuffer(joined, dtype="<u8").reshape(-1, 3)
        return words[:, 0] ^ words[:, 2]
    heads = np.frombuffer(b"".join(s[:8] for s in skeys), dtype="<u8")
    tails = np.frombuffer(b"".join(s[-8:] for s in skeys), dtype="<u8")
    return heads ^ tails


class Rendezvous:
    """Highest-random-weight homes over a fixed set of node names, for a whole batch of keys at once.

    A key's score on a node is mix64(key word ^ salt(node)); its homes are the top HOMES scores.
    A member joining or leaving moves only the keys whose top-2 it enters or leaves (about 2/N).
    512 keys x 16 nodes is one numpy call (a few tens of microseconds), not 8k hash calls.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        self._salts = np.array([xxhash.xxh64_intdigest(n.encode()) for n in self.names], dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.names)

    def homes(self, skeys: Sequence[bytes], count: int = HOMES) -> np.ndarray:
        """int array [len(skeys), min(count, nodes)]: indices into names, best first."""
        count = min(count, len(self.names))
        if not skeys or count == 0:
            return np.zeros((len(skeys), count), dtype=np.intp)
        scores = mix64(key_words(skeys)[:, None] ^ self._salts[None, :])
        if count == 1:
            return np.argmax(scores, axis=1)[:, None]
        order = np.argsort(scores, axis=1, kind="stable")
        return order[:, : -count - 1 : -1]

    def homes_by_node(self, skeys: Sequence[bytes], count: int = HOMES) -> dict[str, list[int]]:
        """node name -> positions of the keys it is a home for, in order (each key under each of its homes)."""
        if not skeys or not self.names:
            return {}
        return self.by_node(self.homes(skeys, count))

    def by_node(self, homes: np.ndarray) -> dict[str, list[int]]:
        """homes_by_node from homes() already computed: node name -> positions of the keys it is a home for."""
        out: dict[str, list[int]] = {}
        for node in np.unique(homes).tolist():
            out[self.names[node]] = np.flatnonzero((homes == node).any(axis=1)).tolist()
        return out

    def is_home(self, name: str, skeys: Sequence[bytes], count: int = HOMES) -> np.ndarray:
        """bool per key: name is one of its homes."""
        if name not in self.names:
            return np.zeros(len(skeys), dtype=bool)
        return (self.homes(skeys, count) == self.names.index(name)).any(axis=1)


# ---- a home's shard ----------------------------------------------------------------------

@dataclass(slots=True)
class _Entry:
    fingerprint_id: bytes
    size: int
    checksum: int
    holders: tuple[HolderId, ...]  # interned (DirectoryShard._set), replaced, never changed in place: a Locate hands it out as is


@dataclass(frozen=True)
class AnnounceResult:
    applied: bool
    expected_sequence: int  # what the home wants next from this holder incarnation (after a refusal: resync)


class Locations(NamedTuple):
    """A Locate's answer as columns over the keys found (a 512-key Locate is 512 rows: no object per row).
    holders[i] is the same tuple object for every row with the same holder set."""

    positions: list[int]
    sizes: list[int]
    checksums: list[int]
    holders: list[tuple[HolderId, ...]]

    def rows(self) -> list[tuple[int, Located]]:
        return [(i, Located(size, crc, holders)) for i, size, crc, holders in zip(*self)]


class DirectoryShard:
    """The entries of the keys this node is home for. Thread-safe: gRPC threads announce and locate concurrently.

    Holder tuples are interned: every entry with the same holders shares one tuple, so a Locate checks each
    holder set against the live view once per call, not once per key (it was 1.4 us a key, most of a 512-key
    Locate's time on the home)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._by_holder: dict[HolderId, set[bytes]] = {}
        self._expected: dict[HolderId, int] = {}  # next sequence number wanted from each holder incarnation
        self._sets: dict[tuple[HolderId, ...], tuple[HolderId, ...]] = {}  # interned holder tuples
        # Told the storage keys of every applied announce's new blocks, after the lock: the claim table ends their
        # write claims (claim_table.py), so a waiting node wakes once the block can be located here.
        self.on_stored: Callable[[list[bytes]], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def holders(self) -> int:
        return len(self._by_holder)

    def _set(self, holders: tuple[HolderId, ...]) -> tuple[HolderId, ...]:
        return self._sets.setdefault(holders, holders)

    def _forget_sets(self) -> None:
        """Drop interned holder tuples no entry uses (after dead holders went: their incarnations never come back)."""
        self._sets = {e.holders: e.holders for e in self._entries.values()}

    # ---- changes from holders -----------------------------------------------------------

    def announce(self, holder: HolderId, sequence: int, stored: Sequence[BlockRef], removed: Sequence[bytes]) -> AnnounceResult:
        """Apply one numbered batch, or nothing when it is not the one expected (the holder then resyncs)."""
        with self._lock:
            expected = self._expected.get(holder, 1)
            if sequence != expected:
                return AnnounceResult(False, expected)
            self._expected[holder] = expected + 1
            self._apply(holder, stored, removed)
        self._stored(stored)
        return AnnounceResult(True, expected + 1)

    def resync(self, holder: HolderId, next_sequence: int, blocks: Sequence[BlockRef]) -> int:
        """Replace everything this holder incarnation had here with blocks; its next batch is next_sequence."""
        with self._lock:
            self._drop_holder(holder)
            self._apply(holder, blocks, ())
            self._expected[holder] = next_sequence
            entries = len(self._by_holder.get(holder, ()))
        self._stored(blocks)
        return entries

    def _stored(self, refs: Sequence[BlockRef]) -> None:
        if self.on_stored is not None and refs:
            self.on_stored([ref.skey for ref in refs])

    def repair(self, holder: HolderId, skeys: Sequence[bytes]) -> int:
        """A reader found that holder does not have these blocks (it answered not-found): forget the claim."""
        with self._lock:
            return sum(self._remove(holder, skey) for skey in skeys)

    def _apply(self, holder: HolderId, stored: Iterable[BlockRef], removed: Iterable[bytes]) -> None:
        entries = self._entries
        mine = self._by_holder.setdefault(holder, set())
        alone = self._set((holder,))
        for ref in stored:
            entry = entries.get(ref.skey)
            if entry is None:
                entries[ref.skey] = _Entry(ref.fingerprint_id, ref.size, ref.checksum, alone)
            elif (entry.fingerprint_id, entry.size, entry.checksum) != (ref.fingerprint_id, ref.size, ref.checksum):
                # Another block under the same storage key (stored under another fingerprint): the latest claim wins alone.
                for other in entry.holders:
                    if other != holder and (theirs := self._by_holder.get(other)) is not None:
                        theirs.discard(ref.skey)
                entries[ref.skey] = _Entry(ref.fingerprint_id, ref.size, ref.checksum, alone)
            elif holder not in entry.holders:
                entry.holders = self._set(entry.holders + (holder,))
            mine.add(ref.skey)
        for skey in removed:
            self._remove(holder, skey)  # drops the holder's set once it empties
        if not mine:
            self._by_holder.pop(holder, None)

    def _remove(self, holder: HolderId, skey: bytes) -> bool:
        entry = self._entries.get(skey)
        if entry is None or holder not in entry.holders:
            return False
        entry.holders = self._set(tuple(h for h in entry.holders if h != holder))
        if not entry.holders:
            del self._entries[skey]
        mine = self._by_holder.get(holder)
        if mine is not None:
            mine.discard(skey)
            if not mine:
                del self._by_holder[holder]
        return True

    def _drop_holder(self, holder: HolderId) -> None:
        for skey in self._by_holder.pop(holder, ()):
            entry = self._entries.get(skey)
            if entry is not None and holder in entry.holders:
                entry.holders = self._set(tuple(h for h in entry.holders if h != holder))
                if not entry.holders:
                    del self._entries[skey]

    # ---- reads --------------------------------------------------------------------------

    def locate(self, fingerprint_id: bytes, skeys: Sequence[bytes], live: Collection[HolderId]) -> list[tuple[int, Located]]:
        """(position, where) for each key with a live holder under this fingerprint (locate_columns, as rows)."""
        return self.locate_columns(fingerprint_id, skeys, live).rows()

    def locate_columns(self, fingerprint_id: bytes, skeys: Sequence[bytes], live: Collection[HolderId]) -> Locations:
        """Each key with a live holder under this fingerprint, as columns; dead holders are pruned on the way.
        live: the holder ids that count (live_holders(view))."""
        positions: list[int] = []
        sizes: list[int] = []
        checksums: list[int] = []
        holder_sets: list[tuple[HolderId, ...]] = []
        dead: list[bytes] = []
        # id(interned holder tuple) -> its live part (the same tuple when all live). Ids are safe as keys here:
        # under the lock every tuple seen stays referenced by its entry until the loop ends.
        alive: dict[int, tuple[HolderId, ...]] = {}
        with self._lock:
            for i, entry in enumerate(map(self._entries.get, skeys)):
                if entry is None or entry.fingerprint_id != fingerprint_id:
                    continue
                holders = entry.holders
                kept = alive.get(id(holders))
                if kept is None:
                    kept = alive[id(holders)] = holders if all(h in live for h in holders) else self._set(tuple(h for h in holders if h in live))
                if kept is not holders:
                    dead.append(skeys[i])
                    if not kept:
                        continue
                positions.append(i)
                sizes.append(entry.size)
                checksums.append(entry.checksum)
                holder_sets.append(kept)
            for skey in dead:
                entry = self._entries.get(skey)  # (gone already when a request named the key twice)
                for holder in [h for h in entry.holders if h not in live] if entry is not None else ():
                    self._remove(holder, skey)
        return Locations(positions, sizes, checksums, holder_sets)

    # ---- view changes -----------------------------------------------------------------------

    def losing(self, live: Collection[HolderId]) -> list[tuple[bytes, tuple[HolderId, ...]]]:
        """Keys with a holder no longer live, each with its holders that are: what a repair looks at after a view
        change (call it before forget_dead)."""
        with self._lock:
            keys: set[bytes] = set()
            for holder, skeys in self._by_holder.items():
                if holder not in live:
                    keys |= skeys
            return [(skey, tuple(h for h in entry.holders if h in live)) for skey in keys if (entry := self._entries.get(skey)) is not None]

    def forget_dead(self, live: Collection[HolderId]) -> int:
        """Drop every entry of holder incarnations no longer live (after a view change); how many holders went."""
        with self._lock:
            gone = [h for h in {*self._by_holder, *self._expected} if h not in live]
            for holder in gone:
                self._drop_holder(holder)
                self._expected.pop(holder, None)
            if gone:
                self._forget_sets()
            return len(gone)

    def keep_homed(self, is_home: Callable[[list[bytes]], np.ndarray]) -> int:
        """Drop the entries of keys this node is no longer home for (homes moved with the view); how many went.
        A holder's next batch for such a key goes to its new home, so what stays here would only go stale."""
        with self._lock:
            skeys = list(self._entries)
            if not skeys:
                return 0
            homed = is_home(skeys)
            dropped = 0
            for skey, keep in zip(skeys, homed):
                if keep:
                    continue
                for holder in self._entries.pop(skey).holders:
                    mine = self._by_holder.get(holder)
                    if mine is not None:
                        mine.discard(skey)
                        if not mine:
                            del self._by_holder[holder]
                dropped += 1
            if dropped:
                self._forget_sets()
            return dropped

    def clear(self) -> None:
        """A fenced node answers as no home: what it knew may be stale by the time it rejoins."""
        with self._lock:
            self._entries.clear()
            self._by_holder.clear()
            self._expected.clear()
            self._sets.clear()
