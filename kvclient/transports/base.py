"""The seam every data path implements: move payloads for slots the control plane already resolved.

A transport is a data mover. KVClient runs the control half of every call once (Reserve ->
write -> Commit; Pin -> read -> release; client.py) and asks the transport only to move bytes:
`write` fills reserved slots, `read` copies pinned slots out and checks them. What a transport
can do beyond that it declares here, and the client reads the declarations, never a type:
moving GPU memory, a mapped pool for zero-copy reads, hashing a put's blocks in the same pass that copies them, a get by key in one data-plane round trip
(UCX, inline gRPC), blocks small enough to travel inside a control message (inline gRPC), the
server dropping a pin once it has sent the slots (UCX), a copy started before the Pin answers (shm).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np

from kvclient.errors import InvalidRequestError, TransferError
from kvclient.transports import device
from kvwire.native import native
from kvwire.types import PutOutcome


@dataclass
class TransferStats:
    """Per-call attribution of time, so a slow fetch can be explained (KVClient.last_transfer). A transport that
    hashes each block in the pass that copies it counts that pass in transfer_s and says so (extra["checked_in_copy"])."""

    control_s: float = 0.0
    queue_s: float = 0.0
    transfer_s: float = 0.0
    validate_s: float = 0.0
    bytes: int = 0
    blocks: int = 0
    control_rpcs: int = 0
    extra: dict = field(default_factory=dict)


class SlotRef(NamedTuple):
    """One block's place in the server's host pool, and its position in the caller's batch (a tuple: hundreds per call)."""

    index: int
    offset: int
    size_bytes: int
    handle: int = 0  # lease id (put) or pin id (get)
    checksum: int = 0
    expires_unix_ms: int = 0  # when the lease or pin ends (server wall clock)


def slot_refs(first_index: int, offsets: Sequence[int], sizes: Sequence[int], handle: int, checksums: Sequence[int],
              expires_unix_ms: int) -> list[SlotRef]:
    """One SlotRef per block of a Pin's answer (its columns), indexed from first_index. Hundreds per Pin: built in C
    where kvwire._native is (~10 us for 512); SlotRef._make over the zipped columns, the reference, costs ~0.15 ms."""
    if native is not None:  # it reads tuples: a column read as an array (a Pin's over the local socket) becomes one here
        rows = native.slot_rows(SlotRef, first_index, tuple(offsets), tuple(sizes), handle, tuple(checksums), expires_unix_ms)
        if rows is not NotImplemented:
            return rows
    return list(map(SlotRef._make, zip(range(first_index, first_index + len(offsets)), offsets, sizes, repeat(handle), checksums,
                                       repeat(expires_unix_ms))))


def destinations(slots: Sequence[SlotRef], outs: Sequence[Any] | None, keys: Sequence[bytes]) -> list[Any]:
    """What a read writes into: the caller's buffers (uint8 views, or GPU arrays as given), or fresh host arrays."""
    if outs is None:
        return [np.empty(s.size_bytes, dtype=np.uint8) for s in slots]
    dests = []
    for s in slots:
        out = outs[s.index]
        if type(out) is np.ndarray and out.nbytes == s.size_bytes:  # a flat uint8 array (device.writables): as it is
            dests.append(out)
            continue
        if device.nbytes(out) != s.size_bytes:
            raise InvalidRequestError(f"output buffer for block {keys[s.index].hex()} holds {device.nbytes(out)} bytes; "
                                      f"the block has {s.size_bytes}")
        dests.append(out if device.is_device(out) else np.frombuffer(out, dtype=np.uint8))
    return dests


class ReadAhead(Protocol):
    """Copies a transport started before the Pin answered (Transport.read_ahead)."""

    def wait(self) -> None:
        """Return once no copy is still writing into the caller's buffers."""


class Transport(Protocol):
    """A data mover. keys, slots and payloads are the call's, by batch index (SlotRef.index).

    The defaults below describe a transport that only fills and reads pool slots;
    transports subclass this protocol and override what they do differently.
    """

    name: str
    moves_device_memory: bool = False  # GPU buffers travel without host staging
    reads_slots: bool = True  # read() copies pinned slots out
    keyed_get: bool = False  # read_keys() gets blocks by key in one data-plane round trip, no Pin
    releases_pins_on_read: bool = False  # the server drops a pin itself once read() has the slots' bytes
    inline_block_bytes: int = 0  # blocks up to this size travel inside one control message (put_inline)
    hashes_while_writing: bool = False  # write() returns each block's checksum, taken as it copied the caller's bytes
    inline_call_bytes: int = 0  # ... when they total at most this (one message); in a larger put, blocks of at least
    stream_block_bytes: int = 0  # this many bytes are streamed into reserved slots (write), smaller ones still go inline

    def pool_view(self) -> np.ndarray | None:
        """The server's host pool as this process maps it (same host), for zero-copy reads of pinned slots."""
        return None

    def write(self, keys: Sequence[bytes], slots: Sequence[SlotRef], payloads: Sequence[Any], stats: TransferStats) -> list[int] | None:
        """Fill the reserved slots (handle: the lease id) with payloads[slot.index]; with hashes_while_writing, return
        each payload's xxh3-64 in slot order (slot.checksum is then 0: the client has not hashed them)."""
        raise TransferError(f"the {self.name} transport cannot fill reserved slots")

    def read_ahead(self, keys: Sequence[bytes], outs: Sequence[Any] | None) -> ReadAhead | None:
        """Start copying where these blocks were pinned last, while the Pin is in flight; None if nothing started."""
        return None

    def read(self, keys: Sequence[bytes], slots: Sequence[SlotRef], dests: Sequence[Any], stats: TransferStats,
             ahead: ReadAhead | None = None) -> None:
        """Copy each pinned slot into dests (in slot order) and check it; raises rather than leave a block unchecked."""
        raise TransferError(f"the {self.name} transport cannot read pinned slots")

    def read_keys(self, fingerprint_id: bytes, keys: Sequence[bytes], outs: Sequence[Any] | None,
                  stats: TransferStats) -> list[Any]:
        """Checked blocks by key, pinned (if at all) by the server for this request alone; all or nothing."""
        raise TransferError(f"the {self.name} transport cannot get blocks by key")

    def put_inline(self, fingerprint_id: bytes, keys: Sequence[bytes], payloads: Sequence[Any], checksums: Sequence[int],
                   durable: bool, stats: TransferStats) -> list[PutOutcome]:
        """Store blocks of at most inline_block_bytes with their payload inside the control message."""
        raise TransferError(f"the {self.name} transport carries no payload inline")

    def close(self) -> None:
        ...
