"""SSD tier: committed blocks in one LMDB environment under the data directory.

Each value is a fixed header (fingerprint, tenant, checksum, size) followed by the
payload, so the index can be rebuilt from LMDB alone at start-up. This module owns
the on-disk format and LMDB transactions; eviction policy lives in the store.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lmdb

MAGIC = b"KVB1"
_HEADER = struct.Struct("<4s16sQQqH")  # magic, fingerprint_id, checksum, size, created_ms, tenant_len
# LMDB needs slack beyond the payload bytes for B-tree pages and copy-on-write.
_MAP_OVERHEAD = 1.5


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
    def __init__(self, path: Path, capacity_bytes: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.path = path
        map_size = int(capacity_bytes * _MAP_OVERHEAD) + (64 << 20)
        # sync=True: a committed transaction is on disk when put_many returns.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=1, sync=True, metasync=True, lock=True, readahead=False, max_readers=256)

    @staticmethod
    def record_bytes(tenant: str, size: int) -> int:
        return _HEADER.size + len(tenant.encode()) + size

    def put_many(self, items: list[tuple[bytes, bytes, memoryview | bytes]]) -> None:
        """items: (skey, header, payload); one transaction, durable on return."""
        with self.env.begin(write=True) as txn:
            for skey, header, payload in items:
                buf = bytearray(len(header) + len(payload))
                buf[: len(header)] = header
                buf[len(header) :] = payload
                txn.put(skey, buf)

    def get(self, skey: bytes) -> tuple[SsdRecord, bytes] | None:
        with self.env.begin(buffers=True) as txn:
            value = txn.get(skey)
            if value is None:
                return None
            record, start = decode_header(skey, value)
            return record, bytes(value[start : start + record.size])

    def delete_many(self, skeys: list[bytes]) -> None:
        if not skeys:
            return
        with self.env.begin(write=True) as txn:
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
        self.env.sync(True)

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()
