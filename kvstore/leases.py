"""Write leases and read pins, with expiry.

A write lease makes one client the only writer of a missing key (groupcache's
singleflight, across processes); a read pin keeps a block in place while a client
copies it. Both expire, so a dead client cannot hold either forever. This module is
bookkeeping only: freeing slots and waking waiters is the store's job.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field


@dataclass
class WriteLease:
    lease_id: int
    skey: bytes
    tenant: str
    fingerprint_id: bytes
    owner: str
    expires_at: float
    size: int = 0
    host_offset: int | None = None

    def expires_unix_ms(self) -> int:
        return int((time.time() + (self.expires_at - time.monotonic())) * 1000)


@dataclass
class ReadPin:
    pin_id: int
    owner: str
    blocks: list  # BlockMeta objects, held so a pin outlives a concurrent delete
    expires_at: float


@dataclass
class LeaseTable:
    by_id: dict[int, WriteLease] = field(default_factory=dict)
    by_skey: dict[bytes, WriteLease] = field(default_factory=dict)
    pins: dict[int, ReadPin] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def grant(self, skey: bytes, tenant: str, fingerprint_id: bytes, owner: str, ttl_s: float) -> WriteLease:
        lease = WriteLease(next(self._ids), skey, tenant, fingerprint_id, owner, time.monotonic() + ttl_s)
        self.by_id[lease.lease_id] = lease
        self.by_skey[skey] = lease
        return lease

    def active(self, skey: bytes) -> WriteLease | None:
        lease = self.by_skey.get(skey)
        if lease is not None and lease.expires_at <= time.monotonic():
            return None
        return lease

    def drop(self, lease: WriteLease) -> None:
        self.by_id.pop(lease.lease_id, None)
        if self.by_skey.get(lease.skey) is lease:
            del self.by_skey[lease.skey]

    def expired_leases(self, now: float) -> list[WriteLease]:
        return [lease for lease in self.by_id.values() if lease.expires_at <= now]

    def add_pin(self, owner: str, blocks: list, ttl_s: float) -> ReadPin:
        pin = ReadPin(next(self._ids), owner, blocks, time.monotonic() + ttl_s)
        self.pins[pin.pin_id] = pin
        return pin

    def expired_pins(self, now: float) -> list[ReadPin]:
        return [pin for pin in self.pins.values() if pin.expires_at <= now]
