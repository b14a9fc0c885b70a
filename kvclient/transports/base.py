"""The seam every data path implements: move payloads for keys the control plane already resolved."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass
class TransferStats:
    """Per-call attribution of time, so a slow fetch can be explained."""

    control_s: float = 0.0
    queue_s: float = 0.0
    transfer_s: float = 0.0
    validate_s: float = 0.0
    bytes: int = 0
    blocks: int = 0
    control_rpcs: int = 0
    extra: dict = field(default_factory=dict)


class Transport(Protocol):
    name: str

    def put(self, keys: Sequence[bytes], payloads: Sequence[memoryview], checksums: Sequence[int], durable: bool, stats: TransferStats) -> list[int]:
        """Store payloads; returns proto PutOutcome values per key."""

    def get(self, keys: Sequence[bytes], outs: Sequence[memoryview] | None, stats: TransferStats) -> list[np.ndarray]:
        """Validated payloads as uint8 arrays (views of outs when given). Raises rather than return partial data."""

    def close(self) -> None:
        ...
