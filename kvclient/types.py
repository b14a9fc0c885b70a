"""Plain result types returned by KVClient; they mirror the proto enums without exposing protobuf."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from kvclient.keys import BlockKey


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


@dataclass(frozen=True)
class LeaseInfo:
    key: BlockKey
    outcome: LeaseOutcome
    lease_id: int = 0
    owner: str = ""
    expires_unix_ms: int = 0


@dataclass(frozen=True)
class KeyStatus:
    key: BlockKey
    state: BlockState
    tier: Tier
    size_bytes: int
    lease_owner: str = ""
