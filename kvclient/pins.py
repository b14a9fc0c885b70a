"""Read pins on the client side: dropping them (at once after a failure, else with the next Pin) and
PinnedBlocks, the handle `KVClient.pin` returns.

A pin keeps blocks in their host-pool slots until it is dropped, so whoever holds one can read
the slots straight out of the pool (shm) or have them sent (UCX). A block with a copy in the
server's HBM tier is held there too, and a same-host GPU client that maps the HBM pool
(kvclient/hbm.py) may copy it device to device instead. It refuses to own how the bytes move:
PinnedBlocks says where the blocks are and checks them; the caller copies.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kvclient.hbm import HbmPool
from kvclient.integrity import check_block, checksum_error
from kvclient.control import PinGrant
from kvclient.transports.base import SlotRef, TransferStats, slot_refs
from kvwire.types import Tier

_TIERS = {t.value: t for t in Tier}


class Unpins:
    """Pins whose bytes are checked and in the caller's hands, waiting to be dropped.

    The next Pin carries them (take(): PinRequest.release_pin_ids), which saves the Unpin
    round trip on every get of a stream (a third of a 32 MiB shm get on a 2-core box). A
    background thread sends an Unpin for any left after idle_s, so a client that stops
    reading holds no pin for long; if that is lost too, the pin's TTL ends it.
    send(pin_ids) is the Unpin call; it must not raise (the server reclaims pins at TTL anyway).
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
        self._parked = False  # the thread waits for a first pin id, with no deadline: only then must later() wake it

    def now(self, pin_id: int) -> None:
        """Drop a pin at once: after a failure, its blocks were never handed over."""
        if pin_id:
            self._send([pin_id])

    def later(self, pin_id: int) -> None:
        if not pin_id:
            return
        if self._pid != os.getpid():
            self._start_fresh()
        with self._cv:
            self._ids.append(pin_id)
            self._last_add = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvclient-unpin", daemon=True)
                self._thread.start()
            if self._parked:  # else it wakes at its deadline and waits out the rest of the quiet: no thread switch per pin
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
                quiet_s = time.monotonic() - self._last_add
                if not self._ids and quiet_s >= self._idle_s:
                    # Parked only once pins stopped coming for idle_s: a client pinning steadily (each Pin taking the
                    # last one's id) would otherwise park after every take() and be woken by every later(), a
                    # thread switch per Pin (~30 us of a 512-key prefix Pin on 2 cores).
                    self._parked = True
                    self._cv.wait()
                    self._parked = False
                    continue
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


@dataclass(frozen=True)
class PinColumns:
    """A Pin's answer as uint64 arrays, one value per pinned block in key order: what an engine planning a copy
    of hundreds of blocks reads whole (numpy masks and gathers) instead of one SlotRef per block. Views of the
    decoded answer where it came as one (the local socket, native): nothing is copied."""

    offsets: np.ndarray  # in the host pool
    sizes: np.ndarray
    checksums: np.ndarray  # xxh3-64 of each block as its writer committed it
    tiers: np.ndarray  # each block's fastest tier (Tier values); empty when no block has an HBM copy
    hbm_offsets: np.ndarray  # in the HBM pool, where tiers says HBM; empty with tiers


def _uint64s(column: Sequence[int]) -> np.ndarray:
    return np.asarray(column, dtype=np.uint64) if len(column) else np.empty(0, dtype=np.uint64)


class PinnedBlocks:
    """Blocks pinned in the server's host pool by one Pin, in key order: where each sits and its checksum.

    Use it as a context manager: leaving the block releases the pin (with the next Pin, as a
    get's pin is released), at once if the block raised. Or call release() yourself, when the
    reads outlive one block of code (an engine's layer-by-layer load). Nothing read from the
    pool may be trusted before verify() (or verify_hashes(), for bytes hashed where they
    landed, e.g. on a GPU) passed for it: a block's slot can be rewritten only once its pin is gone,
    so a block that verified while pinned is the block that was committed.
    """

    def __init__(self, keys: list[bytes], grant: PinGrant, pool_view: np.ndarray | None, unpins: Unpins,
                 stats: TransferStats, hbm: HbmPool | None = None) -> None:
        """keys: the pinned blocks' digests; grant: the Pin's answer, whose first len(keys) blocks these are."""
        n = len(keys)
        self.keys = keys  # the pinned blocks' digests (a prefix pin: the leading run only)
        # The Pin's columns as they came: a prefix of hundreds of blocks makes no object per block until asked for
        # (slots). Building 512 SlotRefs cost ~25 us, a tenth of the Pin; block(), verify() and verify_hashes() read these.
        self._offsets, self._sizes, self._checksums = grant.offsets[:n], grant.sizes[:n], grant.checksums[:n]
        self._expires_unix_ms = grant.expires_unix_ms
        self._slots: list[SlotRef] | None = None
        self._columns: PinColumns | None = None
        self.pool_view = pool_view  # the client's mapping of the server's pool (shm), or None
        self.stats = stats  # the Pin's time; what the caller's copies add is theirs to record
        self.pin_id = grant.pin_id if n else 0
        self._tier_values = grant.tiers[:n]
        self.hbm_offsets = grant.hbm_offsets[:n] if grant.tiers else ()  # each block's offset in the HBM pool (0: none there)
        self.hbm = hbm  # this process's mapping of that HBM pool (same host, CUDA), or None
        self._tiers: list[Tier] | None = None
        self._unpins = unpins
        self._released = False

    @property
    def slots(self) -> list[SlotRef]:
        """One SlotRef per pinned block, in key order."""
        if self._slots is None:
            self._slots = slot_refs(0, self._offsets, self._sizes, self.pin_id, self._checksums, self._expires_unix_ms)
        return self._slots

    @property
    def columns(self) -> PinColumns:
        """The pinned blocks' offsets, sizes, checksums and tiers as arrays (PinColumns)."""
        if self._columns is None:
            tiers = _uint64s(self._tier_values)
            self._columns = PinColumns(_uint64s(self._offsets), _uint64s(self._sizes), _uint64s(self._checksums), tiers,
                                       _uint64s(self.hbm_offsets) if len(tiers) else tiers)
        return self._columns

    def __len__(self) -> int:
        return len(self._offsets)

    @property
    def tiers(self) -> list[Tier]:
        """Each block's fastest tier: HBM where the server also holds it in its HBM tier, else HOST."""
        if self._tiers is None:
            self._tiers = [_TIERS[t] for t in self._tier_values] if self._tier_values else [Tier.HOST] * len(self)
        return self._tiers

    def in_hbm(self) -> list[int]:
        """The indices of the blocks with a copy in the server's HBM tier."""
        return np.flatnonzero(self.columns.tiers == Tier.HBM.value).tolist()

    def hbm_offset(self, i: int) -> int | None:
        """Block i's offset in the server's HBM pool, or None where it has no copy there."""
        return self.hbm_offsets[i] if self._tier_values and self._tier_values[i] == Tier.HBM.value else None

    def device_ptr(self, i: int) -> int | None:
        """Block i's address in this process where it sits in the mapped HBM pool (on device self.hbm.device),
        or None: no copy there, or no mapping here. Copy out of it device to device, then check what landed
        (verify_hashes), as with any pinned block: the pin keeps the copy in place until it is released."""
        offset = self.hbm_offset(i)
        if offset is None or self.hbm is None:
            return None
        return self.hbm.base_ptr + offset

    def block(self, i: int) -> np.ndarray:
        """Block i's bytes where they sit in the pool (a view: no copy); needs a mapped pool."""
        if self.pool_view is None:
            raise ValueError("this client maps no pool (transport is not shm): read the blocks with get()")
        offset = self._offsets[i]
        return self.pool_view[offset : offset + self._sizes[i]]

    def verify(self, i: int) -> None:
        """Hash block i in the pool; raises ChecksumMismatchError unless it matches. Thread-safe (xxh3 drops the GIL)."""
        check_block(self.keys[i], self.block(i), self._checksums[i])

    def verify_hashes(self, hashes: Sequence[int] | np.ndarray) -> None:
        """Check xxh3-64 digests computed where the blocks landed (e.g. by a GPU kernel), one per pinned block
        in order (the first len(hashes) of them); raises ChecksumMismatchError naming the first that differs
        and how many did."""
        got = np.asarray(hashes, dtype=np.uint64)
        expected = self.columns.checksums[: len(got)]
        bad = np.flatnonzero(got != expected)
        if len(bad):
            raise checksum_error(self.keys[bad[0]], len(bad), len(got))

    def release(self, failed: bool = False) -> None:
        """Drop the pin: with the next Pin (or after a short quiet), or at once when failed. Idempotent."""
        if self._released:
            return
        self._released = True
        if failed:
            self._unpins.now(self.pin_id)
        else:
            self._unpins.later(self.pin_id)

    def __enter__(self) -> "PinnedBlocks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)
