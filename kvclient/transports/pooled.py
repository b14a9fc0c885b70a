"""The control half of every data path that moves bytes into or out of the server's host pool.

put: Reserve (one RPC) -> the transport fills the reserved slots -> Commit (one RPC).
get: Pin (one RPC) -> the transport copies the pinned slots out; the pin is dropped by the
next get's Pin (release_pin_ids) or, if the client goes quiet, by a background Unpin.
So a call of any number of blocks costs a constant number of control round trips: one per get.
On every error path the leases are released and the pin dropped before raising,
and a block reaches the caller only after its checksum matched (check_block).
The transports (shm.py, ucx.py) supply only the byte movement.
"""
from __future__ import annotations

import os
import threading
import time
from itertools import repeat
from typing import Callable, NamedTuple, Sequence

import numpy as np
import xxhash

from kvclient.errors import CapacityExhaustedError, ChecksumMismatchError, InvalidRequestError, KVStoreError, TransferError
from kvclient.transports import device
from kvclient.transports.base import TransferStats
from kvwire.v1 import kvstore_pb2 as pb


class SlotRef(NamedTuple):
    """One block's place in the pool, and its position in the caller's batch (a tuple: hundreds per call)."""

    index: int
    offset: int
    length: int
    handle: int = 0  # lease id (put) or pin id (get)
    checksum: int = 0
    expires_unix_ms: int = 0  # when the lease or pin ends (server wall clock)


def check_block(key: bytes, data: np.ndarray, expected: int) -> None:
    """The integrity gate: raises unless the bytes as they landed match the block's checksum."""
    if xxhash.xxh3_64_intdigest(data) != expected:
        raise checksum_error(key)


def checksum_error(key: bytes, failed: int = 1, of: int = 1) -> ChecksumMismatchError:
    """The error every path raises for a block whose bytes did not match its checksum where they landed."""
    count = f" ({failed} of {of} blocks)" if of > 1 else ""
    return ChecksumMismatchError(f"block {key.hex()} failed its checksum after transfer{count}; no data was returned")


def destinations(slots: Sequence[SlotRef], outs: Sequence[memoryview] | None, keys: Sequence[bytes]) -> list[np.ndarray]:
    """uint8 arrays the transport writes into: the caller's buffers, or fresh ones."""
    if outs is None:
        return [np.empty(s.length, dtype=np.uint8) for s in slots]
    dests = []
    for s in slots:
        out = outs[s.index]
        if device.nbytes(out) != s.length:
            raise InvalidRequestError(f"output buffer for block {keys[s.index].hex()} holds {device.nbytes(out)} bytes; the block has {s.length}")
        dests.append(out if device.is_device(out) else np.frombuffer(out, dtype=np.uint8))
    return dests


class DeferredUnpins:
    """Pins whose bytes are already checked and in the caller's hands, waiting to be dropped.

    The next Pin carries them (release_pin_ids), which saves the Unpin round trip
    on every get of a stream (a third of a 32 MiB shm get on a 2-core box). A
    background thread sends an Unpin for any left after idle_s, so a client that
    stops reading holds no pin for long; if that is lost too, the pin's TTL ends it.
    """

    def __init__(self, send: Callable[[list[int]], None], idle_s: float = 0.05) -> None:
        self._send = send
        self._idle_s = idle_s
        self._closed = False
        self._last_add = 0.0
        self._start_fresh()

    def _start_fresh(self) -> None:
        """Also in a child forked from the owner: its pins and its thread are the parent's, and a
        parent thread may have held the lock at the fork."""
        self._pid = os.getpid()
        self._ids: list[int] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, pin_id: int) -> None:
        if self._pid != os.getpid():
            self._start_fresh()
        with self._cv:
            self._ids.append(pin_id)
            self._last_add = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvclient-unpin", daemon=True)
                self._thread.start()
            if len(self._ids) == 1:
                self._cv.notify()

    def take(self) -> list[int]:
        if self._pid != os.getpid():
            self._start_fresh()
        with self._cv:
            ids, self._ids = self._ids, []
            return ids

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                if not self._ids:
                    self._cv.wait()
                    continue
                quiet_s = time.monotonic() - self._last_add
                if quiet_s < self._idle_s:
                    self._cv.wait(self._idle_s - quiet_s)
                    continue
                ids, self._ids = self._ids, []
                self._cv.release()
                try:
                    self._send(ids)
                finally:
                    self._cv.acquire()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
        ids = self.take()
        if ids:
            self._send(ids)


class PoolControl:
    """Reserve/Commit and Pin/Unpin over gRPC, with time and round trips charged to TransferStats."""

    def __init__(self, stub, fingerprint_id: bytes, call: Callable, metadata: tuple = ()) -> None:
        self.stub = stub
        self.fingerprint_id = fingerprint_id
        self.call = call
        self.metadata = metadata
        self.deferred_unpins = DeferredUnpins(lambda ids: self._quietly(self.stub.Unpin, pb.UnpinRequest(pin_ids=ids)))

    def close(self) -> None:
        self.deferred_unpins.close()

    def _timed(self, stats: TransferStats, method, request):
        t0 = time.perf_counter()
        try:
            return self.call(method, request)
        finally:
            stats.control_s += time.perf_counter() - t0
            stats.control_rpcs += 1

    def _quietly(self, method, request) -> None:
        """Best-effort cleanup: the server reclaims leases and pins at TTL if this fails too."""
        try:
            self.call(method, request, timeout_s=5)
        except KVStoreError:
            pass

    def put(self, keys, payloads, checksums, durable: bool, stats: TransferStats, fill: Callable[[list[SlotRef]], None]) -> list[int]:
        """Reserve slots, let fill() write the granted ones, commit them; returns PutOutcome values."""
        specs = [pb.BlockSpec(key=k, size_bytes=len(p)) for k, p in zip(keys, payloads)]
        resp = self._timed(stats, self.stub.Reserve, pb.ReserveRequest(fingerprint_id=self.fingerprint_id, blocks=specs, durable=durable))
        outcomes = [0] * len(keys)
        granted: list[SlotRef] = []
        for i, lease in enumerate(resp.leases):
            if lease.outcome == pb.LEASE_GRANTED:
                granted.append(SlotRef(i, lease.slot.offset, lease.slot.length, lease.lease_id, checksums[i], lease.expires_unix_ms))
            else:
                outcomes[i] = pb.PUT_ALREADY_PRESENT if lease.outcome == pb.LEASE_ALREADY_PRESENT else pb.PUT_PENDING_ELSEWHERE
        if granted:
            try:
                fill(granted)
                items = [pb.CommitItem(lease_id=s.handle, checksum=s.checksum) for s in granted]
                commit = self._timed(stats, self.stub.Commit, pb.CommitRequest(fingerprint_id=self.fingerprint_id, durable=durable, items=items))
            except BaseException:
                self._quietly(self.stub.ReleaseLeases, pb.ReleaseLeasesRequest(lease_ids=[s.handle for s in granted]))
                raise
            for s, o in zip(granted, commit.outcomes):
                outcomes[s.index] = o
        stats.bytes += sum(s.length for s in granted)
        stats.blocks += len(keys)
        return outcomes

    def get(self, keys, outs, stats: TransferStats, drain: Callable[[list[SlotRef], list[np.ndarray]], None], unpin: bool = True) -> list[np.ndarray]:
        """Pin the blocks, let drain() copy and check them into destinations, unpin; all or nothing.

        unpin=False is for data planes whose server side drops the pin itself once
        it has sent the bytes; the pin is still dropped here if anything fails.
        """
        return self._get_window(keys, outs, 0, len(keys), stats, drain, unpin)

    def pin(self, keys, stats: TransferStats, lo: int = 0, prefix: bool = False) -> list[SlotRef]:
        """Pin keys (one RPC, carrying the deferred releases); their slots, indexed from lo.

        For callers that move the bytes later themselves (the engine adapter's
        layer-by-layer DMA); they must end with release(). With prefix, only the
        longest present leading run is pinned, and fewer slots than keys come back.
        """
        release = self.deferred_unpins.take()
        resp = self._timed(stats, self.stub.Pin, pb.PinRequest(fingerprint_id=self.fingerprint_id, keys=list(keys),
                                                               release_pin_ids=release, prefix_only=prefix))
        n = len(resp.offsets)
        if not n == len(resp.lengths) == len(resp.checksums) or n > len(keys) or (n < len(keys) and not prefix):
            if resp.pin_id:
                self._quietly(self.stub.Unpin, pb.UnpinRequest(pin_ids=[resp.pin_id]))
            raise TransferError(f"server pinned {n} blocks for {len(keys)} keys")
        pin_id = resp.pin_id
        # SlotRef._make over zipped columns: a third of a per-field constructor's cost for hundreds of blocks
        return list(map(SlotRef._make, zip(range(lo, lo + n), resp.offsets, resp.lengths, repeat(pin_id), resp.checksums, repeat(resp.expires_unix_ms))))

    def release(self, slots: Sequence[SlotRef], failed: bool = False) -> None:
        """Drop a pin: at once after a failure, else with the next Pin (DeferredUnpins)."""
        if not slots:
            return
        if failed:
            self._quietly(self.stub.Unpin, pb.UnpinRequest(pin_ids=[slots[0].handle]))
        else:
            self.deferred_unpins.add(slots[0].handle)

    def _get_window(self, keys, outs, lo: int, hi: int, stats: TransferStats, drain, unpin: bool) -> list[np.ndarray]:
        """Pin keys[lo:hi]; a batch larger than the host pool can stage is halved until it fits."""
        try:
            slots = self.pin(keys[lo:hi], stats, lo)
        except CapacityExhaustedError:
            if hi - lo < 2:
                raise
            mid = (lo + hi) // 2
            return self._get_window(keys, outs, lo, mid, stats, drain, unpin) + self._get_window(keys, outs, mid, hi, stats, drain, unpin)
        try:
            dests = destinations(slots, outs, keys)
            drain(slots, dests)
        except BaseException:
            self.release(slots, failed=True)
            raise
        if unpin:
            self.release(slots)
        stats.bytes += sum(s.length for s in slots)
        stats.blocks += len(slots)
        return dests
