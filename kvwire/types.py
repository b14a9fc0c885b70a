"""The domain's enums and result records, shared by the server and the client.

The enums carry the proto enums' numbers, so a front door converts by value and no core
module needs protobuf. The records are what the store returns and what KVClient returns:
`key` is the raw 16-byte digest on the server and a BlockKey at the client.""" 
from __future__ import annotations

import enum
from dataclasses import dataclass

from kvwire.keys import BlockKey


class PutOutcome(enum.IntEnum):
    STORED = 1
    ALREADY_PRESENT = 2
    PENDING_ELSEWHERE = 3


class LeaseOutcome(enum.IntEnum):
    GRANTED = 1
    ALREADY_PRESENT = 2
    PENDING = 3


class BlockState(enum.IntEnum):
    MISSING = 1
    PRESENT = 2
    PENDING = 3


class Tier(enum.IntEnum):
    UNSPECIFIED = 0
    HBM = 1
    HOST = 2
    SSD = 3
    REMOTE = 4


@dataclass(frozen=True, slots=True)  # slots: the server's compiled Pin walk reads both fields of hundreds per call
class Slot:
    """Where a block's bytes sit in a tier's memory."""

    offset: int
    size_bytes: int


@dataclass(frozen=True)
class LeaseInfo:
    """The answer for one key of an Acquire or Reserve: the outcome, and for a grant the lease and its slot."""

    key: BlockKey | bytes
    outcome: LeaseOutcome
    lease_id: int = 0
    owner: str = ""  # the holder's client id (within the caller's tenant)
    expires_unix_ms: int = 0
    slot: Slot | None = None  # Reserve only: the slot reserved for the block


@dataclass(frozen=True)
class KeyStatus:
    key: BlockKey | bytes
    state: BlockState
    tier: Tier = Tier.UNSPECIFIED
    size_bytes: int = 0
    lease_owner: str = ""
    lease_expires_unix_ms: int = 0
