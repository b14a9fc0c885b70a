"""The integrity gate: a block reaches a caller only after its bytes, where they landed, matched its checksum.

One check and one error message for every path (shm, UCX, inline gRPC, a pinned block read in the
pool by an engine). It refuses to own where bytes land or how they get there.
"""
from __future__ import annotations

from typing import Any

import xxhash

from kvclient.errors import ChecksumMismatchError


def check_block(key: bytes, data: Any, expected: int) -> None:
    """Raises unless data (a buffer of the block's bytes) hashes to the block's checksum (xxh3-64)."""
    if xxhash.xxh3_64_intdigest(data) != expected:
        raise checksum_error(key)


def checksum_error(key: bytes, failed: int = 1, of: int = 1) -> ChecksumMismatchError:
    """The error every path raises for a block whose bytes did not match its checksum where they landed."""
    count = f" ({failed} of {of} blocks)" if of > 1 else ""
    return ChecksumMismatchError(f"block {key.hex()} failed its checksum after transfer{count}; no data was returned")
