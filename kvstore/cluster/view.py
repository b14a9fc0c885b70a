"""The shapes every cluster module shares: who is in the cluster now, and under which incarnation.

An incarnation is the etcd create_revision of a member's key: unique and increasing across the whole
cluster, so a node that restarts or rejoins after a fence is a different incarnation, and anything
recorded under its old one (directory entries, queued peer calls) can be refused by comparison alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class MemberState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"


@dataclass(frozen=True)
class Member:
    name: str
    incarnation: int
    grpc_address: str  # HOST:PORT peers dial (the node's advertise address)
    host_id: str
    ucx_address: str = ""  # HOST:PORT of its UCX listener, "" when it has none
    state: MemberState = MemberState.ACTIVE
    capacity: dict[str, int] = field(default_factory=dict)  # tier name -> bytes


@dataclass(frozen=True)
class ClusterView:
    """A consistent snapshot: members as of etcd revision `revision` (the last membership change seen)."""

    revision: int = 0
    members: dict[str, Member] = field(default_factory=dict)

    def incarnation_of(self, name: str) -> int:
        """0 when the node is not a member now."""
        member = self.members.get(name)
        return member.incarnation if member is not None else 0

    def is_live(self, name: str, incarnation: int) -> bool:
        return incarnation != 0 and self.incarnation_of(name) == incarnation

    def peers_of(self, self_name: str) -> list[Member]:
        return [m for n, m in sorted(self.members.items()) if n != self_name]
