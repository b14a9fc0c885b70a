"""Same-host zero-copy transport: the client maps the server's shared-memory host pool.

write copies the caller's bytes straight into the reserved slots, hashing each block
as it is read (the Commit's checksums); read copies each pinned block straight out of
the pool into the caller's buffer and checks it while it is still in cache. Either is
one call for all blocks (kvwire.blockcopy: native, GIL released, threads for large
calls), and on a host with cores to spare a get of blocks pinned before starts copying while its Pin
is in flight (read_ahead). KVClient
does the Reserve/Commit and Pin around them; the pin of a get is dropped by the next
get's Pin. The server moves no payload bytes on this path; it only hashes slots at
Commit, as on every path.

A writer must finish before its lease expires, or its late copy could land in
the next writer's block. Two guards make that impossible in practice: write refuses
to start copying into a slot whose lease ends within LEASE_MARGIN_S (LeaseError;
the client releases the leases), and the server keeps the slot of a lease that expired
unreleased out of use for stale_write_quarantine_s (30 s by default) before it is
zeroed and reused. A writer stalled longer than that between its check and its
copy could still overwrite a later block; Commit's checksum and the reader's check
then refuse it, so a torn block is never served, only lost.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from concurrent.futures import Future, wait
from typing import Sequence

import numpy as np

from kvclient.errors import LeaseError, UnavailableError
from kvclient.helper_thread import HelperThread
from kvclient.integrity import checksum_error
from kvclient.transports import device
from kvclient.transports.base import SlotRef, TransferStats, Transport
from kvwire.blockcopy import HASH_DEST, HASH_SOURCE, copy_blocks, runs_within
from kvwire.defaults import SHM_DIR

SLOT_CACHE_ENTRIES = 1 << 16
# A put copies in windows of at most this many bytes, each started only while every lease in it has
# LEASE_MARGIN_S left: a window copies in milliseconds, far inside the margin, however large the put.
WRITE_WINDOW_BYTES = 64 << 20
# The early copy (read_ahead) runs beside the Pin only on a host with cores for both. On 2 cores its copy
# threads took the core the server needed to answer the Pin, which then waited for the copy: a get of
# 32 x 1 MiB blocks took 4.7 ms (median) with it, 3.7 ms without, as long as numpy's memcpy of the same blocks.
READ_AHEAD_MIN_CPUS = 8
# A copy starts only while its lease has this long left: one block's copy is milliseconds, and the
# server may hand the slot of an expired lease to another writer once its quarantine ends.
LEASE_MARGIN_S = 0.1


class PagePopulator:
    """Maps the pool's pages into this process in the background, so transfers skip first-touch faults.

    A fresh mapping faults once per 4 KiB page on first use, which halved put
    throughput into pages this client had not touched yet. MAP_POPULATE would fix
    that at connect time but costs about 0.4 s a GiB up front; madvise
    (MADV_POPULATE_WRITE, Linux 5.14+) from a thread, through ctypes so the GIL is
    free, does the same while the client already works. Older kernels refuse it
    and simply fault as before.
    """

    CHUNK_BYTES = 64 << 20
    MADV_POPULATE_WRITE = 23

    def __init__(self, address: int, length: int) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, length), name="kvclient-shm-populate", daemon=True)
        self._thread.start()

    def _run(self, address: int, length: int) -> None:
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            return
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for offset in range(0, length, self.CHUNK_BYTES):
            if self._stop.is_set() or madvise(address + offset, min(self.CHUNK_BYTES, length - offset), self.MADV_POPULATE_WRITE) != 0:
                return

    def stop(self) -> None:
        """Before unmapping: never advise an address range that may be reused."""
        self._stop.set()
        self._thread.join()


class _EarlyCopies:
    """The read-ahead: one copy from remembered slots on a helper thread, each block checked against the checksum remembered with it."""

    def __init__(self, future: Future) -> None:
        self._future = future
        self._taken = False

    def take(self, stats: TransferStats) -> dict[int, SlotRef]:
        """The blocks whose early copy matched, by batch index (once: a read split in windows uses them in the first)."""
        if self._taken:
            return {}
        self._taken = True
        copy_s, verified = self._future.result()
        stats.transfer_s += copy_s
        return verified

    def wait(self) -> None:
        wait([self._future])  # never leave a helper writing into the caller's buffers after the get returns


class ShmTransport(Transport):
    name = "shm"
    hashes_while_writing = True

    def __init__(self, shm_name: str, shm_size: int) -> None:
        path = SHM_DIR / shm_name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as err:
            raise UnavailableError(f"cannot open the host pool {path}: {err.strerror}") from None
        try:
            if os.fstat(fd).st_size < shm_size:
                raise UnavailableError(f"host pool {path} is smaller than the server says ({shm_size} bytes)")
            self._mmap = mmap.mmap(fd, shm_size)
        finally:
            os.close(fd)
        self.pool = np.frombuffer(self._mmap, dtype=np.uint8)
        self._populator = PagePopulator(self.pool.ctypes.data, shm_size)
        self._helper = HelperThread("kvclient-shm")  # runs the read-ahead while the Pin is in flight
        self._slot_cache: dict[bytes, tuple[int, int, int]] = {}  # key -> (offset, size, checksum) when last pinned
        self.early_copies = (os.cpu_count() or 1) >= READ_AHEAD_MIN_CPUS  # read_ahead on; tests switch it on anywhere

    def pool_view(self) -> np.ndarray | None:
        return self.pool

    def write(self, keys, slots: Sequence[SlotRef], payloads, stats: TransferStats) -> list[int]:
        """Copy every payload into its slot in one call, each block hashed as it is read (hashes_while_writing):
        the checksums the Commit carries are of the caller's bytes, so a torn slot still fails the server's check."""
        t0 = time.perf_counter()
        digests: list[int] = []
        for run in runs_within([s.size_bytes for s in slots], WRITE_WINDOW_BYTES):
            window = slots[run.start : run.stop]
            soonest = min(s.expires_unix_ms for s in window)
            if time.time() + LEASE_MARGIN_S >= soonest / 1000:
                late = next(s for s in window if s.expires_unix_ms == soonest)
                raise LeaseError(f"the lease on block {keys[late.index].hex()} ends in under {LEASE_MARGIN_S} s; "
                                 "not copying into a slot the server may hand to another writer")
            digests += copy_blocks([payloads[s.index] for s in window], None, self.pool, [s.offset for s in window],
                                   [s.size_bytes for s in window], HASH_SOURCE)
        stats.transfer_s += time.perf_counter() - t0
        return digests

    def _copy_checked(self, slots: list[SlotRef], dests: list[np.ndarray]) -> tuple[float, list[bool]]:
        """Copy blocks out of the pool in one call, each hashed where it landed right after its copy (one pass over
        memory); returns the seconds and whether each block matched its checksum."""
        t0 = time.perf_counter()
        digests = copy_blocks(self.pool, [s.offset for s in slots], dests, None, [s.size_bytes for s in slots], HASH_DEST)
        return time.perf_counter() - t0, [d == s.checksum for s, d in zip(slots, digests)]

    def _copy_guessed(self, slots: list[SlotRef], dests: list[np.ndarray]) -> tuple[float, dict[int, SlotRef]]:
        """The early copy: blocks whose bytes matched the remembered checksum, by batch index; never raises."""
        copy_s, matched = self._copy_checked(slots, dests)
        return copy_s, {s.index: s for s, ok in zip(slots, matched) if ok}

    def read_ahead(self, keys, outs) -> _EarlyCopies | None:
        """Copy from where the blocks were last pinned while the Pin is in flight.

        The Pin round trip costs about as much as copying 16 MiB here. So when the
        caller gives buffers and every key was pinned before, a helper copies from
        the slots those blocks had then; each copy is checked against the checksum
        remembered with its slot. read() keeps a block's early copy only if the Pin
        then names the same slot and checksum, so the bytes handed over are exactly
        the pinned block's (the checksum self-verifies them, as in Pilaf's RDMA
        reads), and a block that moved, was rewritten or was deleted is copied again
        from its pinned slot or fails as a miss, like any get.
        """
        if outs is None or not self.early_copies:
            return None
        guesses = [self._slot_cache.get(k) for k in keys]
        if any(g is None for g in guesses):
            return None
        slots = [SlotRef(i, off, size, 0, crc) for i, (off, size, crc) in enumerate(guesses)]
        if any(device.is_device(o) or device.nbytes(o) != s.size_bytes for o, s in zip(outs, slots)):
            return None
        dests = [np.frombuffer(o, dtype=np.uint8) for o in outs]
        return _EarlyCopies(self._helper.submit(self._copy_guessed, slots, dests))

    def _remember(self, keys, slots: Sequence[SlotRef]) -> None:
        for s in slots:
            self._slot_cache[keys[s.index]] = (s.offset, s.size_bytes, s.checksum)
        while len(self._slot_cache) > SLOT_CACHE_ENTRIES:
            del self._slot_cache[next(iter(self._slot_cache))]

    def read(self, keys, slots: Sequence[SlotRef], dests, stats: TransferStats, ahead: _EarlyCopies | None = None) -> None:
        verified = ahead.take(stats) if ahead is not None else {}
        if verified:
            todo = [(s, d) for s, d in zip(slots, dests) if verified.get(s.index) is None or (verified[s.index].offset, verified[s.index].checksum) != (s.offset, s.checksum)]
            late_slots, late_dests = [s for s, _ in todo], [d for _, d in todo]
        else:
            late_slots, late_dests = list(slots), list(dests)
        stats.extra["early_blocks"] = stats.extra.get("early_blocks", 0) + len(slots) - len(late_slots)
        if late_slots:
            copy_s, matched = self._copy_checked(late_slots, late_dests)
            stats.transfer_s += copy_s
            stats.extra["checked_in_copy"] = True  # validation is inside transfer_s: one pass copies and hashes
            if not all(matched):
                bad = [s for s, ok in zip(late_slots, matched) if not ok]
                raise checksum_error(keys[bad[0].index], len(bad), len(slots))
        self._remember(keys, slots)

    def close(self) -> None:
        self._populator.stop()
        self._helper.close()
        self.pool = None
        try:
            self._mmap.close()
        except BufferError:  # arrays handed out earlier never alias the pool, but be safe
            pass
