"""The block index: storage key -> BlockMeta, with LRU order per tier.

Owns which blocks exist, where their bytes are and how recently they were used.
It holds no bytes and takes no locks: the store serialises access.
A storage key ("skey") is tenant tag (8 bytes) + block key (16 bytes), so two
tenants can never address each other's blocks, whatever keys they send.
"""
from __future__ import annotations

import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import xxhash

from kvwire.v1 import kvstore_pb2 as pb


@functools.lru_cache(maxsize=4096)
def tenant_tag(tenant: str) -> bytes:
    """Cached: every key of every request is scoped by it."""
    return xxhash.xxh3_64_digest(b"kvstore-tenant-tag\x00" + tenant.encode())


def storage_key(tenant: str, key: bytes) -> bytes:
    return tenant_tag(tenant) + key


@dataclass
class BlockMeta:
    skey: bytes
    tenant: str
    fingerprint_id: bytes
    size: int
    checksum: int
    host_offset: int | None = None
    on_ssd: bool = False
    pins: int = 0
    deleted: bool = False
    last_access: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.time)

    @property
    def key(self) -> bytes:
        return self.skey[8:]

    @property
    def tier(self) -> int:
        return pb.TIER_HOST if self.host_offset is not None else pb.TIER_SSD


class BlockIndex:
    def __init__(self) -> None:
        self._blocks: dict[bytes, BlockMeta] = {}
        self.host_lru: OrderedDict[bytes, None] = OrderedDict()
        self.ssd_lru: OrderedDict[bytes, None] = OrderedDict()
        self.ssd_used_bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[BlockMeta]:
        return iter(list(self._blocks.values()))

    def get(self, skey: bytes) -> BlockMeta | None:
        return self._blocks.get(skey)

    def add(self, meta: BlockMeta) -> None:
        self._blocks[meta.skey] = meta
        self._place(meta)

    def remove(self, skey: bytes) -> BlockMeta | None:
        meta = self._blocks.pop(skey, None)
        if meta is not None:
            self.host_lru.pop(skey, None)
            if self.ssd_lru.pop(skey, "absent") != "absent":
                self.ssd_used_bytes -= meta.size
        return meta

    def touch(self, *metas: BlockMeta) -> None:
        now = time.monotonic()
        for meta in metas:
            meta.last_access = now
            if meta.host_offset is not None:
                self.host_lru.move_to_end(meta.skey)
            if meta.on_ssd:
                self.ssd_lru.move_to_end(meta.skey)

    def set_host(self, meta: BlockMeta, offset: int | None) -> None:
        meta.host_offset = offset
        if offset is None:
            self.host_lru.pop(meta.skey, None)
        else:
            self.host_lru[meta.skey] = None

    def set_ssd(self, meta: BlockMeta, on_ssd: bool) -> None:
        if on_ssd and not meta.on_ssd:
            self.ssd_lru[meta.skey] = None
            self.ssd_used_bytes += meta.size
        elif not on_ssd and meta.on_ssd:
            self.ssd_lru.pop(meta.skey, None)
            self.ssd_used_bytes -= meta.size
        meta.on_ssd = on_ssd

    def _place(self, meta: BlockMeta) -> None:
        if meta.host_offset is not None:
            self.host_lru[meta.skey] = None
        if meta.on_ssd:
            self.ssd_lru[meta.skey] = None
            self.ssd_used_bytes += meta.size
