"""SSD tier: committed blocks in one LMDB environment under the data directory.

Each value is a fixed header (fingerprint, tenant, checksum, size) followed by the
payload, so the index can be rebuilt from LMDB alone at start-up. This module owns
the on-disk format, LMDB transactions and the tier's room (a record tier of the Tier
protocol, tiers/base.py); which records go and come is placement.py's and eviction.py's.
used_bytes counts payload bytes, as operators see them; a new record's room counts its
header too. Callers serialise writes and erases (placement.py's writer lock), so records
change on disk in the order they were decided.

A write LMDB refuses (full disk or map, I/O error) is raised as SsdWriteError with
nothing of its transaction stored; after one, writes_paused() tells background work
(demotion) to leave the tier alone for a while instead of failing every tick.
"""
from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lmdb

from kvwire.errors import SsdWriteError
from kvwire.types import Tier
from kvstore.tiers.base import BlockLabel, Buffer, Record
from kvstore.tiers.rwlock import SharedExclusiveLock

log = logging.getLogger(__name__)

MAGIC = b"KVB1"
_HEADER = struct.Struct("<4s16sQQqH")  # magic, fingerprint_id, checksum, size, created_ms, tenant_len
# LMDB needs slack beyond the payload bytes for B-tree pages and copy-on-write.
_MAP_OVERHEAD = 1.5
# After a refused write, background writers wait this long before trying again: a full
# disk stays full for a while, and each try copies a whole batch before LMDB refuses it.
WRITE_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class SsdRecord:
    skey: bytes
    tenant: str
    fingerprint_id: bytes
    checksum: int
    size: int
    created_ms: int


def encode_header(tenant: str, fingerprint_id: bytes, checksum: int, size: int) -> bytes:
    t = tenant.encode()
    return _HEADER.pack(MAGIC, fingerprint_id, checksum, size, int(time.time() * 1000), len(t)) + t


def decode_header(skey: bytes, value: memoryview | bytes) -> tuple[SsdRecord, int]:
    """Record and the payload's offset within value; raises ValueError on a malformed header."""
    if len(value) < _HEADER.size:
        raise ValueError("value shorter than header")
    magic, fp, checksum, size, created, tlen = _HEADER.unpack_from(value, 0)
    if magic != MAGIC:
        raise ValueError("bad magic")
    start = _HEADER.size + tlen
    tenant = bytes(value[_HEADER.size : start]).decode()
    return SsdRecord(skey, tenant, fp, checksum, size, created), start


class SsdTier:
    tier = Tier.SSD

    def __init__(self, path: Path, capacity_bytes: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0  # payload bytes of the records allocated or adopted
        self.path = path
        self.map_size = int(capacity_bytes * _MAP_OVERHEAD) + (64 << 20)
        self.env = self._open(path)
        # Shared by every LMDB access, exclusive while rewrite_live swaps the environment.
        self._swap = SharedExclusiveLock()
        self._failed_at: float | None = None  # monotonic time of the last refused write; None once a put succeeds

    def _open(self, path: Path) -> lmdb.Environment:
        # sync=True: a committed transaction is on disk when put_many returns.
        return lmdb.open(str(path), map_size=self.map_size, max_dbs=1, sync=True, metasync=True, lock=True, readahead=False, max_readers=256)

    @staticmethod
    def record_bytes(tenant: str, size: int) -> int:
        return _HEADER.size + len(tenant.encode()) + size

    # ---- the Tier protocol: bookkeeping (under the store lock) --------------------------

    def room_for(self, tenant: str, size_bytes: int) -> int:
        return self.record_bytes(tenant, size_bytes)

    def footprint(self, record: Record) -> int:
        return record.size_bytes

    def alloc(self, skey: bytes, tenant: str, size_bytes: int) -> Record | None:
        if self.used_bytes + self.record_bytes(tenant, size_bytes) > self.capacity_bytes:
            return None
        self.used_bytes += size_bytes
        return Record(skey, size_bytes)

    def adopt(self, skey: bytes, size_bytes: int) -> Record:
        """A record found on disk at start-up: held, whatever the room."""
        self.used_bytes += size_bytes
        return Record(skey, size_bytes)

    def release(self, record: Record) -> None:
        self.used_bytes -= record.size_bytes

    # ---- the Tier protocol: I/O (outside the store lock) --------------------------------

    def write(self, items: Sequence[tuple[BlockLabel, Record, Buffer]]) -> None:
        self.put_many([(r.skey, encode_header(b.tenant, b.fingerprint_id, b.checksum, b.size), data) for b, r, data in items])

    def read(self, block: BlockLabel, record: Record) -> bytes | None:
        try:
            found = self.get(record.skey)
        except ValueError:  # a damaged header: the caller drops the block as it would a bad checksum
            return None
        if found is None or found[0].size != block.size:
            return None
        return found[1]

    def erase(self, records: Sequence[Record]) -> None:
        self.delete_many([r.skey for r in records])

    def put_many(self, items: Sequence[tuple[bytes, bytes, Buffer]]) -> None:
        """items: (skey, header, payload); one transaction, durable on return, or SsdWriteError and none stored."""
        with self._writing(f"writing {len(items)} blocks"), self._swap.shared(), self.env.begin(write=True) as txn:
            for skey, header, payload in items:
                buf = bytearray(len(header) + len(payload))
                buf[: len(header)] = header
                buf[len(header) :] = payload
                txn.put(skey, buf)
        if self._failed_at is not None:  # only a stored put shows there is room again
            log.info("ssd tier accepts writes again")
            self._failed_at = None

    def writes_paused(self) -> bool:
        """True for WRITE_RETRY_AFTER_S after a refused write: background writers should not try yet."""
        return self._failed_at is not None and time.monotonic() - self._failed_at < WRITE_RETRY_AFTER_S

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn LMDB's refusal into SsdWriteError (LMDB aborted the transaction: nothing of it is stored)."""
        try:
            yield
        except lmdb.Error as err:
            why = self._explain(err)
            if self._failed_at is None:
                log.warning("ssd tier refused a write (%s): %s; background demotion pauses between retries", what, why)
            self._failed_at = time.monotonic()
            raise SsdWriteError(f"ssd tier write failed: {why}") from err

    def _explain(self, err: lmdb.Error) -> str:
        if isinstance(err, lmdb.MapFullError):
            return f"{err} (the LMDB map of {self.map_size} bytes is full)"
        try:
            st = os.statvfs(self.path)
        except OSError:
            return str(err)
        return f"{err} (the data disk has {st.f_bavail * st.f_frsize} bytes free)"

    def get(self, skey: bytes) -> tuple[SsdRecord, bytes] | None:
        with self._swap.shared(), self.env.begin(buffers=True) as txn:
            value = txn.get(skey)
            if value is None:
                return None
            record, start = decode_header(skey, value)
            return record, bytes(value[start : start + record.size])

    def delete_many(self, skeys: Sequence[bytes]) -> None:
        if not skeys:
            return
        with self._writing(f"deleting {len(skeys)} blocks"), self._swap.shared(), self.env.begin(write=True) as txn:
            for skey in skeys:
                txn.delete(skey)

    def scan(self) -> Iterator[tuple[SsdRecord | None, bytes]]:
        """Every stored record's header; (None, skey) for a value too damaged to parse."""
        with self.env.begin(buffers=True) as txn:
            for skey, value in txn.cursor():
                key = bytes(skey)
                try:
                    record, start = decode_header(key, value)
                    if len(value) - start != record.size:
                        raise ValueError("payload length differs from header")
                    yield record, key
                except ValueError:
                    yield None, key

    def sync(self) -> None:
        with self._writing("syncing"):
            self.env.sync(True)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self.env.close()

    def rewrite_live(self, batch_bytes: int = 64 << 20) -> int:
        """Copy every live record into a fresh environment, zero the old file, swap; returns bytes copied.

        LMDB is copy-on-write: a deleted value's pages go to a free list with their
        bytes intact, and even a compacting copy carries stale bytes left inside live
        pages. Re-putting live records into a new environment writes only live data;
        the old file is then overwritten with zeros and fsynced before it is replaced.
        The caller must keep other writers out (placement.py's writer lock).
        """
        fresh = self.path.with_name(self.path.name + ".rewrite")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir()
        copied = 0
        with self._swap.exclusive():
            new_env = self._open(fresh)
            try:
                with self.env.begin(buffers=True) as src:
                    cursor = src.cursor()
                    more = cursor.first()
                    while more:
                        with new_env.begin(write=True) as dst:
                            done = 0
                            while more and done < batch_bytes:
                                dst.put(bytes(cursor.key()), cursor.value(), append=True)
                                done += len(cursor.value())
                                more = cursor.next()
                        copied += done
                new_env.sync(True)
            finally:
                new_env.close()
            self.env.close()
            old = self.path / "data.mdb"
            _overwrite_with_zeros(old)
            os.replace(fresh / "data.mdb", old)
            shutil.rmtree(fresh, ignore_errors=True)
            _fsync_dir(self.path)
            self.env = self._open(self.path)
        return copied


def _overwrite_with_zeros(path: Path, chunk_bytes: int = 4 << 20) -> None:
    """Overwrite a file in place with zeros and fsync it (ext4/xfs rewrite the same blocks)."""
    remaining = path.stat().st_size
    zeros = bytes(chunk_bytes)
    with open(path, "r+b", buffering=0) as f:
        while remaining > 0:
            n = f.write(zeros[: min(chunk_bytes, remaining)])
            remaining -= n
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
