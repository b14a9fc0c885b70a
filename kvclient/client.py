"""KVClient: the public API. Batches calls, tracks the caller's leases, and runs every put and get once.

Every method takes a batch; a single block is a batch of one. Control calls (lookup, leases,
commits, pins) go through a typed control channel (control.py): over gRPC, or over the server's
local socket when the server is on this host (local_control.py: ~0.09 ms a Lookup instead of
gRPC's ~0.7). Payload moves through the transport chosen at connect time (connect.py), a data
mover that only fills and reads slots. The sequences around it live here, once:

    put: Reserve (one call) -> transport.write into the granted slots -> Commit (one call);
         blocks small enough for one message go inline instead, where the transport carries them.
    get: a keyed read (one data-plane round trip, no Pin) where the transport has one and the
         caller gave buffers; else Pin (one call, carrying the previous get's unpin) ->
         transport.read -> the pin is dropped with the next Pin.
    pin: Pin -> PinnedBlocks, for callers that move the bytes themselves (an engine's DMA).

So a call of any number of blocks costs a constant number of control round trips. On every
error path the leases are released and the pin dropped before raising, and a block reaches
the caller only after its checksum matched where it landed (integrity.py).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable, Sequence

import numpy as np

from kvclient.connect import Connection, TransportChoice, connect
from kvclient.control import ClientIdentity, ControlChannel, PinGrant
from kvclient.errors import CapacityExhaustedError, InvalidRequestError, KVStoreError, PermissionDeniedError, TransferError
from kvclient.hbm import HbmPool, open_hbm_pool
from kvclient.lease_keeper import LeaseKeeper
from kvclient.pins import PinnedBlocks, Unpins
from kvclient.transports import device
from kvclient.transports.base import ReadAhead, SlotRef, TransferStats, Transport, destinations, slot_refs
from kvwire.defaults import DEFAULT_ADDRESS
from kvwire.keys import BlockKey, Fingerprint, block_keys
from kvwire.types import BlockState, KeyStatus, LeaseInfo, LeaseOutcome, PutOutcome

__all__ = ["KVClient", "HbmPool", "PinnedBlocks", "SlotRef", "TransferStats", "DEFAULT_ADDRESS"]

log = logging.getLogger(__name__)

WAIT_POLL_S = (0.02, 0.5)  # first and longest pause between lookups when the server will not block a Wait
CONTAINS_BATCH_KEYS = 16384  # keys per contains call: within the server's default max_keys_per_request (65536)
CLEANUP_TIMEOUT_S = 5.0  # best-effort releases and unpins: the server reclaims them at TTL anyway


def _digests(keys: Iterable[BlockKey | bytes]) -> list[bytes]:
    try:
        return [k.digest for k in keys]  # BlockKeys, the common case: a third of the general loop's cost for hundreds
    except AttributeError:
        return [k if type(k) is bytes else k.digest if isinstance(k, BlockKey) else bytes(k) for k in keys]


class KVClient:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        fingerprint: Fingerprint | None = None,
        tenant: str | None = None,
        token: str | None = None,
        transport: str = "auto",
        timeout_s: float = 30.0,
        tls_ca: str | None = None,
        local_control: bool = True,
        client_id: str | None = None,
    ) -> None:
        """client_id: whom the store counts this client as for leases and pins, within the token's tenant.
        Default: a fresh id. An engine whose decisions and writes run in different processes (vLLM's
        scheduler leases a block, its worker writes it) gives the writer the leaseholder's id; an id is
        not a credential (the tenant comes from the token), so this grants nothing the tenant lacked."""
        if fingerprint is None:
            raise InvalidRequestError("KVClient needs a Fingerprint: blocks are only shared between compatible engines")
        identity = ClientIdentity.new(tenant, token) if client_id is None else ClientIdentity(client_id, tenant, token)
        self._conn: Connection = connect(address, identity, transport, local_control, timeout_s, tls_ca)
        self.address = address
        self.fingerprint = fingerprint
        self.fingerprint_id = fingerprint.id
        self.tenant = tenant
        self.timeout_s = timeout_s
        self.client_id = identity.client_id
        self._unpins = Unpins(self._unpin_quietly)
        self._lock = threading.Lock()
        self._leases: dict[bytes, int] = {}
        self._hbm: HbmPool | None = None
        self._hbm_asked = False
        self.last_transfer = TransferStats()  # of the last put, get or pin

    # ---- what the client was assembled from (read-only) ---------------------------

    @property
    def transport(self) -> Transport:
        """The data mover, by its declared capabilities (transports/base.py): name, moves_device_memory, pool_view(), ..."""
        return self._conn.transport

    @property
    def transport_choice(self) -> TransportChoice:
        return self._conn.choice

    def hbm_pool(self) -> HbmPool | None:
        """The server's HBM pool mapped into this process (CUDA IPC, same host), opened at the first call and
        shared by every client of the process; None where there is none or it cannot be mapped here. Once
        mapped, pin() says where each pinned block sits in it (PinnedBlocks.device_ptr)."""
        if not self._hbm_asked:
            self._hbm = open_hbm_pool(self._conn.data_plane)
            self._hbm_asked = True
        return self._hbm

    @property
    def control(self) -> ControlChannel:
        """The typed control channel, for tools and tests; applications use the batch API below."""
        return self._conn.control

    def close(self) -> None:
        with self._lock:
            lease_ids = list(self._leases.values())
            self._leases.clear()
        if lease_ids:
            try:
                self.control.release(lease_ids, timeout_s=2)
            except Exception:  # the server reclaims them at TTL anyway
                pass
        self._unpins.close()
        self._conn.close()

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- namespace and lookup ------------------------------------------------------

    def block_keys(self, token_ids: Sequence[int] | np.ndarray, extra_keys: Iterable[bytes] | None = None) -> list[BlockKey]:
        return block_keys(self.fingerprint, token_ids, self.tenant, extra_keys)

    def status(self, keys: Sequence[BlockKey]) -> tuple[list[KeyStatus], int]:
        return self.control.lookup(self.fingerprint_id, _digests(keys))

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """How many leading blocks of this chain are present."""
        if not keys:
            return 0
        return self.control.prefix_length(self.fingerprint_id, _digests(keys))

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key is present: one call per CONTAINS_BATCH_KEYS keys, answered with a byte a key."""
        digests = _digests(keys)
        present = b"".join(self.control.contains(self.fingerprint_id, digests[lo : lo + CONTAINS_BATCH_KEYS])
                           for lo in range(0, len(digests), CONTAINS_BATCH_KEYS))
        return list(map(bool, present))

    # ---- leases -------------------------------------------------------------------

    def acquire(self, keys: Sequence[BlockKey], ttl_s: float | None = None) -> list[LeaseInfo]:
        """Ask to be the one writer of each missing key. PENDING means someone else computes it."""
        out = self.control.acquire(self.fingerprint_id, _digests(keys), int((ttl_s or 0) * 1000))
        with self._lock:
            for info in out:
                if info.outcome == LeaseOutcome.GRANTED:
                    self._leases[info.key.digest] = info.lease_id
        return out

    def renew(self, keys: Sequence[BlockKey], ttl_s: float | None = None) -> list[int]:
        with self._lock:
            ids = [self._leases[k] for k in _digests(keys) if k in self._leases]
        return self.control.renew(ids, int((ttl_s or 0) * 1000))

    def keep_leases(self, keys: Sequence[BlockKey], ttl_s: float) -> LeaseKeeper:
        """Renew this client's leases on keys every ttl_s / 3 until the returned keeper is closed
        (use it as a context manager around computing the blocks). Keys it holds no lease on are ignored."""
        return LeaseKeeper(self, keys, ttl_s)

    def release(self, keys: Sequence[BlockKey]) -> int:
        """Give up leases without writing (e.g. the computation failed), so waiters can take over."""
        with self._lock:
            ids = [self._leases.pop(k) for k in _digests(keys) if k in self._leases]
        if not ids:
            return 0
        return self.control.release(ids)

    def wait(self, keys: Sequence[BlockKey], timeout_s: float) -> list[BlockState]:
        """Block until each key is committed or nobody holds its lease any more (or timeout).

        A server already blocking as many Waits as it allows (per tenant and in all) refuses
        more; the answer is then the same, found by polling lookups until the timeout.
        """
        deadline = time.monotonic() + timeout_s
        try:
            return self.control.wait(self.fingerprint_id, _digests(keys), int(timeout_s * 1000), timeout_s=timeout_s + self.timeout_s)
        except CapacityExhaustedError as err:
            log.debug("Wait refused (%s): polling lookups instead", err)
            return self._poll_until_settled(keys, deadline)

    def _poll_until_settled(self, keys: Sequence[BlockKey], deadline: float) -> list[BlockState]:
        pause_s, longest_s = WAIT_POLL_S
        while True:
            states = [s.state for s in self.status(keys)[0]]
            left_s = deadline - time.monotonic()
            if BlockState.PENDING not in states or left_s <= 0:
                return states
            time.sleep(min(pause_s, left_s))
            pause_s = min(2 * pause_s, longest_s)

    # ---- data ---------------------------------------------------------------------

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Any], durable: bool = False) -> list[PutOutcome]:
        """Store blocks (bytes-like, numpy arrays or CPU torch tensors). durable=True waits for the SSD tier."""
        if len(keys) != len(blocks):
            raise InvalidRequestError(f"{len(keys)} keys but {len(blocks)} blocks")
        if not keys:
            return []
        digests = _digests(keys)
        stats = TransferStats()
        t0 = time.perf_counter()
        transport = self.transport
        payloads = device.readables(blocks, transport.moves_device_memory)
        # A transport that hashes as it copies saves a pass over the caller's bytes; inline blocks are hashed here.
        later = transport.hashes_while_writing and not transport.inline_block_bytes
        checksums = None if later else [device.checksum(p) for p in payloads]
        stats.validate_s += time.perf_counter() - t0
        outcomes = self._store(digests, payloads, checksums, durable, stats)
        stats.blocks += len(keys)
        with self._lock:
            for d in digests:
                self._leases.pop(d, None)
        self.last_transfer = stats
        return outcomes

    def _store(self, keys: list[bytes], payloads: list[Any], checksums: list[int] | None, durable: bool,
               stats: TransferStats) -> list[PutOutcome]:
        """Inline what fits one message where the transport carries payload inline; reserve, write and commit the rest."""
        inline_bytes = self.transport.inline_block_bytes
        if not inline_bytes:
            return self._store_reserved(keys, payloads, checksums, durable, stats, range(len(keys)), [None] * len(keys))
        outcomes: list[Any] = [None] * len(keys)
        small = [i for i, p in enumerate(payloads) if len(p) <= inline_bytes]
        if sum(len(payloads[i]) for i in small) > self.transport.inline_call_bytes:  # more than one message
            small = [i for i in small if len(payloads[i]) < self.transport.stream_block_bytes]
        inline = set(small)
        large = [i for i in range(len(keys)) if i not in inline]
        if small:
            stored = self.transport.put_inline(self.fingerprint_id, [keys[i] for i in small], [payloads[i] for i in small],
                                               [checksums[i] for i in small], durable, stats)
            for i, outcome in zip(small, stored):
                outcomes[i] = outcome
        if large:
            self._store_reserved(keys, payloads, checksums, durable, stats, large, outcomes)
        return outcomes

    def _store_reserved(self, keys, payloads, checksums, durable: bool, stats: TransferStats, idx: Sequence[int],
                        outcomes: list[Any]) -> list[PutOutcome]:
        """Reserve slots for keys[idx], have the transport fill the granted ones, commit them; fills outcomes by batch index.
        checksums None: the transport hashes the payloads as it writes them (hashes_while_writing)."""
        every = len(idx) == len(keys)
        grant = self._timed(stats, self.control.reserve, self.fingerprint_id, keys if every else [keys[i] for i in idx],
                            [len(payloads[i]) for i in idx], durable)
        granted: list[SlotRef] = []
        for i, (outcome, lease_id, offset, size, expires) in zip(idx, grant.leases):
            if outcome == LeaseOutcome.GRANTED:
                granted.append(SlotRef(i, offset, size, lease_id, checksums[i] if checksums is not None else 0, expires))
            else:
                outcomes[i] = PutOutcome.ALREADY_PRESENT if outcome == LeaseOutcome.ALREADY_PRESENT else PutOutcome.PENDING_ELSEWHERE
        if granted:
            try:
                hashed = self.transport.write(keys, granted, payloads, stats)
                if checksums is None and (hashed is None or len(hashed) != len(granted)):
                    raise TransferError(f"the {self.transport.name} transport returned no checksums for the blocks it wrote")
                committed = self._timed(stats, self.control.commit, self.fingerprint_id, [s.handle for s in granted],
                                        hashed if checksums is None else [s.checksum for s in granted], durable)
            except BaseException:
                self._quietly(self.control.release, [s.handle for s in granted])
                raise
            for s, outcome in zip(granted, committed):
                outcomes[s.index] = outcome
        stats.bytes += sum(s.size_bytes for s in granted)
        return outcomes

    def get(self, keys: Sequence[BlockKey], out: Sequence[Any] | None = None) -> list[Any]:
        """Fetch blocks byte-exact, as uint8 arrays (views of out's buffers when given).

        Raises BlockNotFoundError naming the missing keys; never returns partial data.
        """
        if out is not None and len(out) != len(keys):
            raise InvalidRequestError(f"{len(keys)} keys but {len(out)} output buffers")
        if not keys:
            return []
        transport = self.transport
        outs = device.writables(out, transport.moves_device_memory) if out is not None else None
        stats = TransferStats()
        result = self._fetch(_digests(keys), outs, stats)
        self.last_transfer = stats
        return result

    def _fetch(self, keys: list[bytes], outs: list[Any] | None, stats: TransferStats) -> list[Any]:
        transport = self.transport
        if transport.keyed_get and (outs is not None or not transport.reads_slots):
            try:
                return transport.read_keys(self.fingerprint_id, keys, outs, stats)
            except CapacityExhaustedError:
                if not transport.reads_slots:
                    raise
                # more than the host pool can stage at once: pinned below, in halves
        ahead = transport.read_ahead(keys, outs)
        try:
            return self._read_window(keys, outs, 0, len(keys), stats, ahead)
        finally:
            if ahead is not None:
                ahead.wait()  # never leave a copy writing into the caller's buffers after we return

    def _read_window(self, keys: list[bytes], outs, lo: int, hi: int, stats: TransferStats, ahead: ReadAhead | None) -> list[Any]:
        """Pin keys[lo:hi], have the transport read and check them; a batch larger than the host pool can stage is halved until it fits."""
        try:
            slots = self._pin_slots(keys[lo:hi], stats, lo)
        except CapacityExhaustedError:
            if hi - lo < 2:
                raise
            mid = (lo + hi) // 2
            return self._read_window(keys, outs, lo, mid, stats, ahead) + self._read_window(keys, outs, mid, hi, stats, ahead)
        try:
            dests = destinations(slots, outs, keys)
            self.transport.read(keys, slots, dests, stats, ahead)
        except BaseException:
            self._unpins.now(slots[0].handle)
            raise
        if not self.transport.releases_pins_on_read:
            self._unpins.later(slots[0].handle)
        return dests

    def _pin_slots(self, keys: list[bytes], stats: TransferStats, lo: int = 0, prefix: bool = False) -> list[SlotRef]:
        """Pin keys (one call, carrying the deferred unpins); their slots, indexed from lo. With prefix, only
        the longest present leading run is pinned, and fewer slots than keys may come back."""
        return self._slots_of(self._timed(stats, self.control.pin, self.fingerprint_id, keys, self._unpins.take(), prefix),
                              keys, stats, lo, prefix)

    def _slots_of(self, grant: PinGrant, keys: list[bytes], stats: TransferStats, lo: int, prefix: bool) -> list[SlotRef]:
        self._check_grant(grant, keys, stats, prefix)
        return slot_refs(lo, grant.offsets, grant.sizes, grant.pin_id, grant.checksums, grant.expires_unix_ms)

    def _check_grant(self, grant: PinGrant, keys: list[bytes], stats: TransferStats, prefix: bool) -> int:
        """How many blocks the Pin pinned, once its columns agree with the request (else it is dropped: TransferError)."""
        n = len(grant.offsets)
        if not n == len(grant.sizes) == len(grant.checksums) or n > len(keys) or (n < len(keys) and not prefix):
            self._unpins.now(grant.pin_id)
            raise TransferError(f"server pinned {n} blocks for {len(keys)} keys")
        stats.bytes += grant.total_bytes()
        stats.blocks += n
        return n

    def pin(self, keys: Sequence[BlockKey], prefix: bool = False) -> PinnedBlocks:
        """Pin blocks where they sit in the server's host pool, in one round trip, for a caller that moves
        the bytes itself (an engine DMA-ing them into its pages over a CUDA-registered pool).

        All or nothing (BlockNotFoundError naming the missing keys), or with prefix=True the longest
        present leading run of keys, possibly none. Use the result as a context manager, or release() it;
        check each block with verify() before trusting what was read. Blocks the server also holds in its
        HBM tier say so (PinnedBlocks.tiers, hbm_offset), and once this process maps that pool
        (hbm_pool()) device_ptr(i) is where to copy them from, device to device.
        """
        digests = _digests(keys)
        stats = TransferStats()
        if not digests:
            return PinnedBlocks([], PinGrant(0, 0, (), (), ()), self.transport.pool_view(), self._unpins, stats)
        grant = self._timed(stats, self.control.pin, self.fingerprint_id, digests, self._unpins.take(), prefix)
        n = self._check_grant(grant, digests, stats, prefix)
        self.last_transfer = stats  # the caller's copies and checks add to it
        hbm = self._hbm if self._hbm is not None and self._hbm.pool_id == grant.hbm_pool_id else None
        return PinnedBlocks(digests[:n], grant, self.transport.pool_view(), self._unpins, stats, hbm)

    def delete(self, keys: Sequence[BlockKey]) -> int:
        return self.control.delete(self.fingerprint_id, _digests(keys))

    def stats(self) -> dict:
        """This client's side ("client": the transport chosen and any fallback, the control path and why it
        is not the local one) and, for an admin token, the server's tiers, blocks, leases, pins and counters.
        A tenant's token gets the client part only: store-wide numbers would tell one tenant about another's activity."""
        out = {"client": self.transport_choice.as_dict()}
        try:
            s = self.control.stats()
        except PermissionDeniedError:
            return out
        return {
            "tiers": {tier.name.lower(): {"capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes, "blocks": t.blocks}
                      for tier, t in s.tiers.items()},
            "blocks": s.blocks,
            "leases_held": s.leases_held,
            "pins_held": s.pins_held,
            "counters": s.counters,
            **out,
        }

    # ---- plumbing -------------------------------------------------------------------

    @staticmethod
    def _timed(stats: TransferStats, call, *args):
        t0 = time.perf_counter()
        try:
            return call(*args)
        finally:
            stats.control_s += time.perf_counter() - t0
            stats.control_rpcs += 1

    def _quietly(self, call, *args) -> None:
        """Best-effort cleanup: the server reclaims leases and pins at TTL if this fails too."""
        try:
            call(*args, timeout_s=CLEANUP_TIMEOUT_S)
        except KVStoreError:
            pass

    def _unpin_quietly(self, pin_ids: list[int]) -> None:
        self._quietly(self.control.unpin, pin_ids)
