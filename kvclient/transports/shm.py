"""Same-host zero-copy transport: the client maps the server's shared-memory host pool.

put copies the caller's bytes straight into the reserved slots and commits; get
pins, copies each block straight out of the pool into the caller's buffer and
checks it while it is still in cache, then unpins. The server moves no payload
bytes on this path; it only hashes slots at Commit, as on every path.

A writer must finish before its lease expires: after expiry the slot can be
handed to someone else. Commit's checksum and the reader's check catch any
block that was overwritten that way, so it can never be served.
"""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np

from kvclient.errors import UnavailableError
from kvclient.transports.base import TransferStats
from kvclient.transports.pooled import PoolControl, SlotRef, check_block

SHM_DIR = Path("/dev/shm")


class ShmTransport:
    name = "shm"

    def __init__(self, control: PoolControl, shm_name: str, shm_size: int) -> None:
        self.control = control
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

    def put(self, keys, payloads, checksums, durable: bool, stats: TransferStats) -> list[int]:
        def fill(slots: list[SlotRef]) -> None:
            t0 = time.perf_counter()
            for s in slots:
                np.copyto(self.pool[s.offset : s.offset + s.length], np.frombuffer(payloads[s.index], dtype=np.uint8))
            stats.transfer_s += time.perf_counter() - t0

        return self.control.put(keys, payloads, checksums, durable, stats, fill)

    def get(self, keys, outs, stats: TransferStats) -> list[np.ndarray]:
        def drain(slots: list[SlotRef], dests: list[np.ndarray]) -> None:
            # Check each block right after its copy, while it is still in cache: one pass over memory, not two.
            for s, dest in zip(slots, dests):
                t0 = time.perf_counter()
                np.copyto(dest, self.pool[s.offset : s.offset + s.length])
                t1 = time.perf_counter()
                check_block(keys[s.index], dest, s.checksum)
                stats.transfer_s += t1 - t0
                stats.validate_s += time.perf_counter() - t1

        return self.control.get(keys, outs, stats, drain)

    def close(self) -> None:
        self.control.close()
        self.pool = None
        try:
            self._mmap.close()
        except BufferError:  # arrays handed out earlier never alias the pool, but be safe
            pass
