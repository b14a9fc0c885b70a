"""Where cluster state lives in etcd: one prefix per cluster, one place that spells the keys.

    /kvstore/<cluster>/members/<node>      member record, JSON (leased: gone with the node)
    /kvstore/<cluster>/tombstones/<id>     a cluster-wide delete, JSON (not leased)
    /kvstore/<cluster>/tombstone_floor     revision below which tombstones were trimmed (JSON)
    /kvstore/<cluster>/acks/<node>         the revision up to which a node applied tombstones (leased)
    /kvstore/<cluster>/config              cluster settings (reserved)

Nothing per block is ever written here (docs/cluster.md: a put costs ~1 ms, a 512-block publish would cost 0.5 s).
"""
from __future__ import annotations

from dataclasses import dataclass

ROOT = "/kvstore"


@dataclass(frozen=True)
class Layout:
    cluster: str

    def __post_init__(self) -> None:
        if not self.cluster or "/" in self.cluster:
            raise ValueError(f"cluster name must be non-empty and contain no '/': {self.cluster!r}")

    @property
    def base(self) -> bytes:
        return f"{ROOT}/{self.cluster}/".encode()

    @property
    def members(self) -> bytes:
        return self.base + b"members/"

    def member(self, name: str) -> bytes:
        return self.members + _name(name)

    @property
    def tombstones(self) -> bytes:
        return self.base + b"tombstones/"

    def tombstone(self, tombstone_id: str) -> bytes:
        return self.tombstones + _name(tombstone_id)

    @property
    def tombstone_floor(self) -> bytes:
        return self.base + b"tombstone_floor"

    @property
    def acks(self) -> bytes:
        return self.base + b"acks/"

    def ack(self, name: str) -> bytes:
        return self.acks + _name(name)

    @property
    def config(self) -> bytes:
        return self.base + b"config"

    @staticmethod
    def name_of(key: bytes, prefix: bytes) -> str:
        return key[len(prefix):].decode()


def _name(name: str) -> bytes:
    if not name or "/" in name:
        raise ValueError(f"a node or record name must be non-empty and contain no '/': {name!r}")
    return name.encode()
