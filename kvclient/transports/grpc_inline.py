"""Inline gRPC transport: payload bytes inside protobuf messages.

The universal fallback: works across hosts with nothing but the gRPC channel. Small
blocks travel in one Put (put_inline: reserve, write and commit inside the one call);
large ones take KVClient's Reserve -> write (a Write stream of chunks here) -> Commit,
so no single message has to hold many large blocks. A get is one streaming Get by key
(read_keys): no pin, and no slot is ever read directly. These calls carry payload, so
they stay on gRPC even when the control calls go over the local socket.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from kvclient.control import GrpcControl
from kvclient.errors import InvalidRequestError
from kvclient.integrity import check_block
from kvclient.transports.base import SlotRef, TransferStats, Transport
from kvwire.types import PutOutcome
from kvwire.v1 import kvstore_pb2 as pb

INLINE_MAX_BLOCK_BYTES = 1 << 20
MESSAGE_BUDGET_BYTES = 32 << 20
WRITE_CHUNK_BYTES = 4 << 20


def _batches(sizes: Sequence[int], budget: int) -> Iterator[range]:
    start, acc = 0, 0
    for i, size in enumerate(sizes):
        if acc and acc + size > budget:
            yield range(start, i)
            start, acc = i, 0
        acc += size
    if start < len(sizes):
        yield range(start, len(sizes))


def _landed(data: bytes, expected: int, key: bytes, out: memoryview | None) -> np.ndarray:
    """A received block, checked, in the caller's buffer or a fresh one."""
    check_block(key, data, expected)
    if out is None:
        return np.frombuffer(bytearray(data), dtype=np.uint8)
    if len(out) != len(data):
        raise InvalidRequestError(f"output buffer for block {key.hex()} holds {len(out)} bytes; the block has {len(data)}")
    out[:] = data
    return np.frombuffer(out, dtype=np.uint8)


class GrpcInlineTransport(Transport):
    name = "grpc"
    reads_slots = False
    keyed_get = True
    inline_block_bytes = INLINE_MAX_BLOCK_BYTES

    def __init__(self, grpc_control: GrpcControl) -> None:
        self.grpc = grpc_control

    def put_inline(self, fingerprint_id, keys, payloads, checksums, durable: bool, stats: TransferStats) -> list[PutOutcome]:
        outcomes: list[PutOutcome] = []
        for batch in _batches([len(p) for p in payloads], MESSAGE_BUDGET_BYTES):
            blocks = [pb.InlineBlock(key=keys[i], data=bytes(payloads[i]), checksum=checksums[i]) for i in batch]
            t0 = time.perf_counter()
            resp = self.grpc.call("Put", pb.PutRequest(fingerprint_id=fingerprint_id, durable=durable, blocks=blocks))
            stats.transfer_s += time.perf_counter() - t0
            stats.control_rpcs += 1
            stats.bytes += sum(len(payloads[i]) for i in batch)
            outcomes += [PutOutcome(o) for o in resp.outcomes]
        return outcomes

    def write(self, keys, slots: Sequence[SlotRef], payloads, stats: TransferStats) -> None:
        def chunks() -> Iterator[pb.WriteChunk]:
            for s in slots:
                view = payloads[s.index]
                for off in range(0, len(view), WRITE_CHUNK_BYTES):
                    yield pb.WriteChunk(lease_id=s.handle, offset=off, data=bytes(view[off : off + WRITE_CHUNK_BYTES]))

        t0 = time.perf_counter()
        self.grpc.stream_in("Write", chunks())
        stats.transfer_s += time.perf_counter() - t0
        stats.control_rpcs += 1

    def read_keys(self, fingerprint_id, keys, outs, stats: TransferStats) -> list[np.ndarray]:
        results: list[np.ndarray] = []
        t0 = time.perf_counter()
        validate_s = 0.0
        for resp in self.grpc.stream_out("Get", pb.GetRequest(fingerprint_id=fingerprint_id, keys=list(keys))):
            for block in resp.blocks:
                i = len(results)
                v0 = time.perf_counter()
                results.append(_landed(block.data, block.checksum, block.key, outs[i] if outs is not None else None))
                validate_s += time.perf_counter() - v0
        stats.transfer_s += time.perf_counter() - t0 - validate_s
        stats.validate_s += validate_s
        stats.control_rpcs += 1
        stats.bytes += sum(len(r) for r in results)
        stats.blocks += len(results)
        if len(results) != len(keys):
            raise InvalidRequestError(f"server returned {len(results)} blocks for {len(keys)} keys")
        return results
