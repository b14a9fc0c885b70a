"""The remote tier: blocks held by other nodes, found through the directory and copied in as local blocks.

Owns the read path's cluster half (design/cluster.md §3.5): Locate at each key's homes (one call per
home, all at once, the union of D1's and D2's answers), choosing a holder per run of keys, fetching
under one deadline, checking every block against its checksum before it lands, and the lazy repair of
a directory entry whose holder answered not-found. It is the store's RemoteSource (store.py): the store
asks, this answers, and fetched blocks enter through Store.adopt, so they are ordinary local blocks
from then on (announced as held here, evicted and demoted as any other). It refuses the wire
(peers.py) and directory bookkeeping (directory.py).

Data path: the holder's UCX data plane where it runs one (ucx_fetch.py: a keyed get per chunk of at most
32 MiB, sized to what the link delivers by the deadline; ~3x gRPC's throughput here), else, and after a UCX
refusal or failure, gRPC Fetch (a server stream of ~1 MiB messages, whose `missing` marker names where the
holder's run ends).

Guarantees to a reader: never partial data (a block lands whole and checked, or not at all); a fetch
ends by remote_fetch_deadline_ms with the leading run that landed; a peer's failure is a miss here,
never an error, and its breaker keeps the next reader from waiting on it again.
"""
from __future__ import annotations

import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np

from kvwire.errors import KVStoreError, PeerBusyError
from kvstore.cluster.announcer import active_ring
from kvstore.counters import Event
from kvstore.cluster.directory import DirectoryShard, HolderId, Located, Locations, Rendezvous, live_holders
from kvstore.cluster.holder_choice import ReaderLoad
from kvstore.cluster.hot import HotSpread
from kvstore.cluster.peers import Peers
from kvstore.cluster.ucx_fetch import CHUNK_BYTES as UCX_CHUNK_BYTES, UcxFetcher

# Blocks at least this large are received straight into reserved pool slots, one message each; smaller ones
# land packed in staging buffers (a message per block costs tens of microseconds whatever its size).
UCX_DIRECT_MIN_BYTES = 256 << 10
# UCX request sizing (_ChunkSizer): the first request, the time each next one aims at, the share of the time
# left a request may be expected to use, and when not to ask at all.
UCX_FIRST_CHUNK_BYTES = 1 << 20
UCX_CHUNK_S = 0.05
UCX_CHUNK_FILL = 0.8
UCX_CHUNK_STOP = 1.25  # no request for a block expected to take this many times the time left (it would be cut off)
from kvstore.cluster.view import ClusterView
from kvstore.index import tenant_tag
from kvstore.placement import checksum

if TYPE_CHECKING:
    from kvstore.store import Store

log = logging.getLogger(__name__)

LOCATE_TIMEOUT_S = 0.5  # a Lookup waits at most this long for the directory; a slow home is a miss
# For this long after a membership change a reader asks both homes of every key and takes the union: keys
# whose homes moved are being re-announced to their new homes (usually within milliseconds). Otherwise it asks
# one home per key (itself where it is one), and the other only where the first call failed.
SETTLE_S = 3.0
REPAIR_TIMEOUT_S = 1.0
# Every holder of the next run refused as busy: wait this long (doubling up to the max, jittered), then ask again.
BUSY_BACKOFF_S = 0.002
BUSY_BACKOFF_MAX_S = 0.02


def _wait_busy(backoff_s: float, deadline: float) -> float:
    """Sleep about backoff_s (jittered, never past the deadline) before asking busy holders again; the next backoff."""
    time.sleep(max(0.0, min(backoff_s * random.uniform(0.5, 1.5), deadline - time.monotonic())))
    return min(2 * backoff_s, BUSY_BACKOFF_MAX_S)


class _Found(NamedTuple):
    """A locate's answer, one row per key asked: size, checksum, usable holders (None: nobody reachable has it)."""

    sizes: list[int]
    checksums: list[int]
    holders: list[tuple[HolderId, ...] | None]

    @classmethod
    def empty(cls, n: int) -> "_Found":
        return cls([0] * n, [0] * n, [None] * n)

    def rows(self) -> list[Located | None]:
        return [Located(size, crc, holders) if holders is not None else None for size, crc, holders in zip(*self)]


class _ChunkSizer:
    """How much one UCX request of a fetch asks for. A request's blocks land only when the whole request has (and a
    request cut off by the deadline lands nothing and breaks the session), so over a slow link one 32 MiB request
    would miss a 1 s deadline entirely: at 100 Mbit/s it takes ~2.7 s. The first request asks for
    UCX_FIRST_CHUNK_BYTES; each next one for the larger of twice the last and UCX_CHUNK_S of the latest request's
    rate, capped at UCX_CHUNK_BYTES and at what the measured rate delivers in UCX_CHUNK_FILL of the time left.
    On a fast link it reaches the cap within a request or two (the first costs one extra round trip)."""

    def __init__(self) -> None:
        self.last = 0
        self.rate = 0.0  # bytes/s of the latest request (0: none yet); the first one's time includes opening the session

    @property
    def known(self) -> bool:
        return self.rate > 0

    def seconds_for(self, nbytes: int) -> float:
        return nbytes / self.rate

    def next_bytes(self, left_s: float) -> int:
        if not self.known:
            return UCX_FIRST_CHUNK_BYTES
        want = max(2 * self.last, int(self.rate * UCX_CHUNK_S))
        return max(1, min(UCX_CHUNK_BYTES, want, int(self.rate * left_s * UCX_CHUNK_FILL)))

    def landed(self, nbytes: int, seconds: float) -> None:
        self.last = nbytes
        self.rate = nbytes / max(seconds, 1e-6)


class RemoteTier:
    def __init__(self, me: str, store: "Store", identity: Callable[[], tuple[int, ClusterView]], peers: Peers,
                 shard: DirectoryShard, counters: Counter, fetch_deadline_s: float, ucx: UcxFetcher | None = None,
                 hot: HotSpread | None = None, adopted: Callable[[], None] = lambda: None) -> None:
        """ucx: the fast data path to holders that run a UCX data plane (None: gRPC Fetch only). hot: this node's
        shard as a home answers it (holders ordered by load, demand counted); None: the bare shard. adopted(): called
        once a fetch stored blocks here (the announcer's wake: a read-through copy is named to the next reader sooner)."""
        self.me = me
        self.store = store
        self.identity = identity
        self.peers = peers
        self.shard = shard
        self.hot = hot
        self.adopted = adopted
        self.load = ReaderLoad()
        self.counters = counters
        self.fetch_deadline_s = fetch_deadline_s
        self.ucx = ucx
        self._ring: tuple[int, Rendezvous] = (-1, Rendezvous(()))
        self._ring_changed = 0.0  # monotonic time of the last membership change seen
        self._repairs = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvstore-repair")

    def close(self) -> None:
        self._repairs.shutdown(wait=False, cancel_futures=True)
        if self.ucx is not None:
            self.ucx.close()

    def ring(self, view: ClusterView) -> Rendezvous:
        """Rendezvous over the view's active members (homes, and the order of a hot key's next copies)."""
        revision, ring = self._ring
        if revision != view.revision:
            ring = active_ring(view)
            self._ring = (view.revision, ring)
            self._ring_changed = time.monotonic()
            self.load.forget(live_holders(view))
        return ring

    def settling(self) -> bool:
        """Whether readers still ask both homes of every key (SETTLE_S after the last membership change)."""
        self.ring(self.identity()[1])
        return time.monotonic() - self._ring_changed < SETTLE_S

    def _asks(self, view: ClusterView, skeys: list[bytes]) -> tuple[dict[str, list[int]], Callable[[int], str | None]]:
        """Which home to ask about which keys (name -> positions), and for a position the other home to ask if the
        first fails (None: none). One home per key: this node where it is one, else the key's first home; both (no
        fallback needed) while the view settles. The homes are computed once, for both."""
        ring = self.ring(view)
        homes = ring.homes(skeys)
        names = ring.names
        if homes.shape[1] < 2 or time.monotonic() - self._ring_changed < SETTLE_S:
            return (ring.by_node(homes) if len(skeys) else {}), lambda i: None
        me = names.index(self.me) if self.me in names else -1
        mine = (homes == me).any(axis=1)
        first = np.where(mine, me, homes[:, 0])
        if not mine.any() and (first == first[0]).all():  # one home answers all (a 2-node cluster's remote keys)
            asks = {names[int(first[0])]: list(range(len(skeys)))}
        else:
            asks = {names[k]: np.flatnonzero(first == k).tolist() for k in np.unique(first).tolist()}
        other = np.where(homes[:, 0] == first, homes[:, 1], homes[:, 0])
        return asks, lambda i: None if mine[i] else names[other[i]]

    # ---- locate ---------------------------------------------------------------------------

    def _locate(self, skeys: list[bytes], fingerprint_id: bytes, timeout_s: float) -> _Found:
        """Where each key's block is: the union of its homes' answers, live holders other than this node
        whose breakers are closed; columns, holders None where nobody (reachable) has it."""
        found = _Found.empty(len(skeys))
        incarnation, view = self.identity()
        if incarnation == 0 or not skeys:
            return found
        asks, fallback = self._asks(view, skeys)
        live = live_holders(view)
        usable: dict[int, tuple[tuple, tuple]] = {}  # id(a holder set as answered) -> (it, the holders in it worth calling)
        sizes, checksums, held = found

        def merge(positions: list[int], answer: Locations) -> None:
            for j, size, crc, answered in zip(answer.positions, answer.sizes, answer.checksums, answer.holders):
                known = usable.get(id(answered))
                if known is None or known[0] is not answered:
                    known = usable[id(answered)] = (answered, tuple(h for h in answered if h[0] != self.me and h in live
                                                                     and self.peers.usable(h[0])))
                holders = known[1]
                if not holders:
                    continue
                i = positions[j]
                was = held[i]
                if was is None:
                    sizes[i], checksums[i], held[i] = size, crc, holders
                elif (sizes[i], checksums[i]) == (size, crc) and was != holders:
                    held[i] = was + tuple(h for h in holders if h not in was)

        local = asks.pop(self.me, None)
        if local is not None:
            mine = [skeys[i] for i in local] if len(local) < len(skeys) else skeys
            merge(local, self.hot.answer(fingerprint_id, mine, live)[0] if self.hot is not None else self.shard.locate_columns(fingerprint_id, mine, live))
        deadline = time.monotonic() + timeout_s
        while asks:
            answers = self.peers.locate_many(fingerprint_id, {name: [skeys[i] for i in pos] if len(pos) < len(skeys) else skeys
                                                              for name, pos in asks.items()},
                                             max(0.001, deadline - time.monotonic()))
            retry: dict[str, list[int]] = {}
            for name, answer in answers.items():
                if isinstance(answer, KVStoreError):
                    self.counters[Event.REMOTE_LOCATE_ERRORS] += 1
                    log.debug("locate at %s failed: %s", name, answer)
                    for i in asks[name]:
                        if (home := fallback(i)) is not None and home != name:
                            retry.setdefault(home, []).append(i)
                else:
                    merge(asks[name], answer)
            fallback = lambda i: None  # noqa: E731  (each key's other home is asked once)
            asks = retry if time.monotonic() < deadline else {}
        return found

    def locate(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes]) -> list[int]:
        """RemoteSource.locate: each key's size where a live peer holds it (under this tenant's storage key), else 0."""
        tag = tenant_tag(tenant)
        sizes, _, held = self._locate([tag + k for k in keys], fingerprint_id, LOCATE_TIMEOUT_S)
        hits = len(held) - held.count(None)
        self.counters[Event.REMOTE_LOCATE_FOUND] += hits
        self.counters[Event.REMOTE_LOCATE_ABSENT] += len(keys) - hits
        return sizes

    # ---- fetch ------------------------------------------------------------------------------

    def fetch(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool) -> None:
        """RemoteSource.fetch: copy the keys' blocks in from their holders, by the fetch deadline.

        With prefix, the leading run the peers hold; else all of them or (leaving what landed, which is
        harmless: whole, checked blocks) the caller's read reports the miss. A run of keys goes to one
        holder, among those holding the longest run from where the fetch stands (so a chain stays one stream)
        the one holder_choice.py picks. A holder that answers busy (past its peer_max_inflight) is left for
        the others; when only busy ones remain, the fetch waits a few milliseconds and asks them again.
        """
        started = time.monotonic()
        deadline = started + self.fetch_deadline_s
        since = self.store.deletions
        tag = tenant_tag(tenant)
        skeys = [tag + k for k in keys]
        found = self._locate(skeys, fingerprint_id, min(LOCATE_TIMEOUT_S, self.fetch_deadline_s)).rows()
        wanted = next((i for i, f in enumerate(found) if f is None), len(found))
        if wanted < len(found) and not prefix:
            self.counters[Event.REMOTE_FETCHES_SHORT] += 1
            return
        excluded: dict[int, set[HolderId]] = {}
        busy: set[HolderId] = set()  # holders that refused as busy since the last wait
        backoff_s = BUSY_BACKOFF_S
        pos = 0
        while pos < wanted and time.monotonic() < deadline:
            holders = [h for h in found[pos].holders if h not in excluded.get(pos, ()) and self.peers.usable(h[0])]
            ready = [h for h in holders if h not in busy]
            if not ready:
                if not holders:
                    break
                backoff_s = _wait_busy(backoff_s, deadline)
                busy.clear()
                continue
            runs = {h: self._run(found, pos, wanted, h) for h in ready}
            longest = max(runs.values())
            holder = self.load.choose([h for h in ready if runs[h] == longest])  # the directory's order kept
            end = pos + longest
            with self.load.transfer(holder) as moved:
                got, why = self._fetch_run(holder, tenant, fingerprint_id, keys[pos:end], skeys[pos:end], found[pos:end], deadline, since)
                moved.append(sum(f.size for f in found[pos : pos + got]))
            pos += got
            if pos == end:
                continue
            if why == "busy":
                self.counters[Event.REMOTE_FETCH_BUSY] += 1
                busy.add(holder)
                continue
            if why == "no_room":
                break
            if why == "missing":
                self._repair(holder, skeys[pos])
                excluded.setdefault(pos, set()).add(holder)
            else:  # an error or a corrupt block: nothing more from that holder in this fetch
                for i in range(pos, end):
                    excluded.setdefault(i, set()).add(holder)
        if pos:
            self.adopted()
        self.counters[Event.REMOTE_FETCHES_SHORT if pos < len(keys) else Event.REMOTE_FETCHES_COMPLETE] += 1
        log.debug("remote fetch: %d of %d blocks in %.1f ms", pos, len(keys), (time.monotonic() - started) * 1000)

    @staticmethod
    def _run(found: list[Located | None], pos: int, end: int, holder: HolderId) -> int:
        n = pos
        while n < end and holder in found[n].holders:
            n += 1
        return n - pos

    def _fetch_run(self, holder: HolderId, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], skeys: list[bytes],
                   found: Sequence[Located], deadline: float, since: int) -> tuple[int, str]:
        """Fetch one run from one holder: over its UCX data plane where it has one, the rest (after a refusal or
        a UCX failure) over gRPC Fetch. (blocks stored here, why the run stopped early: "missing" | "corrupt" |
        "error" | "no_room" | "busy" (the holder is past its peer_max_inflight) | "")."""
        adopted = 0
        if self.ucx is not None and self.ucx.usable(holder) and self._runs_ucx(holder):
            adopted, why = self._run_ucx(holder, tenant, fingerprint_id, keys, skeys, found, deadline, since)
            if adopted == len(keys) or why not in ("refused", "error") or time.monotonic() >= deadline:
                return adopted, why
        got, why = self._run_grpc(holder, tenant, fingerprint_id, keys[adopted:], skeys[adopted:], found[adopted:], deadline, since)
        return adopted + got, why

    def _runs_ucx(self, holder: HolderId) -> bool:
        member = self.identity()[1].members.get(holder[0])
        return member is not None and bool(member.ucx_address)

    def _land(self, holder: HolderId, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], skeys: list[bytes],
              found: Sequence[Located], first: int, blocks: list[tuple[bytes, bytes | memoryview, int]], since: int) -> tuple[int, str]:
        """Check blocks (skey, payload, the holder's checksum) that landed for keys[first:], in order, and store the
        good leading ones; (stored, "corrupt" | "no_room" | ""). A block is used only if its bytes hash to the
        checksum its holder sent and the directory named, with the size it named."""
        good, why = [], ""
        for i, (skey, data, crc) in enumerate(blocks, first):
            where = found[i] if i < len(found) else None
            if where is None or skey != skeys[i] or len(data) != where.size or crc != where.checksum or checksum(data) != crc:
                self.counters[Event.REMOTE_CHECKSUM_FAILURES] += 1
                log.warning("block %s from node %s failed its checksum; not used", skeys[min(i, len(skeys) - 1)][8:].hex(), holder[0])
                why = "corrupt"
                break
            good.append((keys[i], data, crc))
        landed = self.store.adopt(tenant, fingerprint_id, good, since) if good else 0
        self.counters[Event.REMOTE_FETCH_BLOCKS] += landed
        self.counters[Event.REMOTE_FETCH_BYTES] += sum(len(data) for _, data, _ in good[:landed])
        return landed, (why or ("no_room" if landed < len(good) else ""))

    def _run_ucx(self, holder: HolderId, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], skeys: list[bytes],
                 found: Sequence[Located], deadline: float, since: int) -> tuple[int, str]:
        """Keyed gets, every chunk stored before the next is asked for; a refusal (the holder has not got one of
        the chunk's blocks: nothing moved) is "refused". Chunks are sized to the link (_ChunkSizer), so a slow
        one lands its leading blocks by the deadline instead of one large request that misses it whole."""
        adopted = 0
        sizer = _ChunkSizer()
        while adopted < len(keys) and time.monotonic() < deadline:
            limit = sizer.next_bytes(deadline - time.monotonic())
            if sizer.known and sizer.seconds_for(found[adopted].size) > UCX_CHUNK_STOP * (deadline - time.monotonic()):
                return adopted, "deadline"  # not even one more block would land in time: a request cut off breaks the session
            end, total = adopted, 0
            while end < len(keys) and (end == adopted or total + found[end].size <= limit):
                total += found[end].size
                end += 1
            chunk = (adopted, end)
            asked_at = time.monotonic()
            try:
                direct = None
                if min(f.size for f in found[adopted:end]) >= UCX_DIRECT_MIN_BYTES:
                    direct = self._ucx_into_pool(holder, tenant, fingerprint_id, keys, skeys, found, chunk, deadline, since)
                if direct is not None:
                    landed, why = direct
                else:
                    views, crcs = self.ucx.get(holder, tenant, fingerprint_id, list(keys[adopted:end]), [f.size for f in found[adopted:end]], deadline)
                    landed, why = self._land(holder, tenant, fingerprint_id, keys, skeys, found, adopted,
                                             list(zip(skeys[adopted:end], views, crcs)), since)
            except PeerBusyError:
                return adopted, "busy"
            except KVStoreError as err:
                refused = getattr(err, "refused_by_holder", False)
                if not refused:
                    self.counters[Event.REMOTE_FETCH_FAILURES] += 1
                log.debug("UCX fetch from %s stopped after %d blocks: %s", holder[0], adopted, err)
                return adopted, "refused" if refused else "error"
            self.counters[Event.REMOTE_FETCH_UCX_BLOCKS] += landed
            self.peers.note_fetched(holder[0], sum(f.size for f in found[adopted : adopted + landed]))
            sizer.landed(total, time.monotonic() - asked_at)
            adopted += landed
            if why:
                return adopted, why
        return adopted, "" if adopted == len(keys) else "error"

    def _ucx_into_pool(self, holder: HolderId, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], skeys: list[bytes],
                       found: Sequence[Located], chunk: tuple[int, int], deadline: float, since: int) -> tuple[int, str] | None:
        """One chunk of large blocks received straight into reserved slots of the host pool (no staging buffer, no
        copy), checked there, then indexed; slots of blocks that did not land whole and checked are released.
        None (nothing asked) when not every block got a slot: one is here already, or there is no room."""
        lo, hi = chunk
        reserved = self.store.reserve_copies(tenant, fingerprint_id, [(keys[i], found[i].size, found[i].checksum) for i in range(lo, hi)])
        slots, landed, why = reserved[1], 0, ""
        if any(slot is None for slot in slots):
            self.store.settle_copies(reserved, 0, since)  # releases what was reserved
            return None
        try:
            pool = self.store.host.view
            into = [pool[s.offset : s.offset + s.size_bytes] for s in slots]
            _, crcs = self.ucx.get(holder, tenant, fingerprint_id, list(keys[lo:hi]), [f.size for f in found[lo:hi]], deadline, into)
            for i, (view, crc) in enumerate(zip(into, crcs), lo):
                if crc != found[i].checksum or checksum(view) != crc:
                    self.counters[Event.REMOTE_CHECKSUM_FAILURES] += 1
                    log.warning("block %s from node %s failed its checksum; not used", skeys[i][8:].hex(), holder[0])
                    why = "corrupt"
                    break
                landed += 1
        finally:
            present = self.store.settle_copies(reserved, landed, since)
        self.counters[Event.REMOTE_FETCH_BLOCKS] += present
        self.counters[Event.REMOTE_FETCH_BYTES] += sum(f.size for f in found[lo : lo + present])
        return present, why or ("no_room" if present < hi - lo else "")

    def _run_grpc(self, holder: HolderId, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], skeys: list[bytes],
                  found: Sequence[Located], deadline: float, since: int) -> tuple[int, str]:
        """Fetch (a stream), storing each message's blocks as it lands; the holder marks where its run ends."""
        adopted, why = 0, ""
        stream = None
        try:
            stream = self.peers.fetch(holder[0], fingerprint_id, skeys, max(0.001, deadline - time.monotonic()))
            for message in stream:
                blocks = [(b.skey, b.data, b.checksum) for b in message if not b.missing]
                missing = len(blocks) < len(message)
                landed, why = self._land(holder, tenant, fingerprint_id, keys, skeys, found, adopted, blocks, since)
                adopted += landed
                if why or missing:
                    why = why or "missing"
                    break
        except PeerBusyError:
            why = "busy"
        except KVStoreError as err:
            why = "error"
            self.counters[Event.REMOTE_FETCH_FAILURES] += 1
            log.debug("fetch from %s stopped after %d blocks: %s", holder[0], adopted, err)
        finally:
            if stream is not None:
                stream.close()
        if why == "missing":
            self.counters[Event.REMOTE_FETCH_NOT_FOUND] += 1
        return adopted, why

    def held_elsewhere(self, fingerprint_id: bytes, skeys: list[bytes]) -> list[bool]:
        """Whether a live, reachable peer holds each key, as the directory answers (drain --handoff's question)."""
        return [h is not None for h in self._locate(skeys, fingerprint_id, LOCATE_TIMEOUT_S).holders]

    # ---- the copy primitive's receiving half ----------------------------------------------------

    def copy_from(self, holder: HolderId, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], sizes: Sequence[int],
                  checksums: Sequence[int], deadline: float) -> int:
        """Copy one run of a holder's blocks in, as a read fetches them (UCX into reserved slots, else gRPC Fetch;
        each block checked against the size and checksum given, which the holder's must match), for a peer that
        asked this node to take them (replicator.py). How many leading blocks landed. The holder is the only one
        named, so while it answers busy (past its peer_max_inflight) it is asked again after a short wait."""
        tag = tenant_tag(tenant)
        skeys = [tag + k for k in keys]
        found = [Located(size, crc, (holder,)) for size, crc in zip(sizes, checksums)]
        since, got, why, backoff_s = self.store.deletions, 0, "", BUSY_BACKOFF_S
        while True:
            landed, why = self._fetch_run(holder, tenant, fingerprint_id, keys[got:], skeys[got:], found[got:], deadline, since)
            got += landed
            if why != "busy" or got == len(keys) or time.monotonic() >= deadline:
                break
            self.counters[Event.REMOTE_FETCH_BUSY] += 1  # the only holder named is past its peer_max_inflight: wait
            backoff_s = _wait_busy(backoff_s, deadline)
        if got < len(keys):
            log.debug("copy from %s: %d of %d blocks (%s)", holder[0], got, len(keys), why or "deadline")
        return got

    # ---- lazy repair ------------------------------------------------------------------------

    def _repair(self, holder: HolderId, skey: bytes) -> None:
        """The holder answered not-found: tell the key's homes, off the reader's path."""
        _, view = self.identity()
        homes = self.ring(view).homes_by_node([skey])
        for home in homes:
            self._repairs.submit(self._repair_at, home, holder, skey)

    def _repair_at(self, home: str, holder: HolderId, skey: bytes) -> None:
        try:
            if home == self.me:
                self.counters[Event.DIRECTORY_REPAIRS] += self.shard.repair(holder, [skey])
            else:
                self.peers.repair(home, holder, [skey], REPAIR_TIMEOUT_S)
            self.counters[Event.DIRECTORY_REPAIRS_SENT] += 1
        except KVStoreError as err:
            log.debug("repair at %s failed: %s", home, err)
