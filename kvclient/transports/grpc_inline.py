"""Inline gRPC transport: payload bytes inside protobuf messages.

The universal fallback: works across hosts with nothing but the gRPC channel. Small
blocks travel in one Put (put_inline: reserve, write and commit inside the one call);
large ones take KVClient's Reserve -> write (a Write stream of chunks here) -> Commit,
so no single message has to hold many large blocks. A get is one streaming Get by key
(read_keys): no pin, and no slot is ever read directly. These calls carry payload, so
they stay on gRPC even when the control calls go over the local socket.

Payload never passes through a message object (kvwire/payload_codec.py): a request is one
join of small headers and views of the caller's buffers, and each piece of a Get answer is
copied from the received message straight into the caller's buffer, which is checked once
the block is whole. What was tried and dropped, on a loaded 2-core loopback host where bare
gRPC (bytes in, bytes out, no work per message) moves 32 MiB in 1 MiB messages in ~30 ms each
way: several Get streams for one large get (two moved no more than one), two Puts in flight
(slower than one at a time), 4 MiB messages (slower than 1-2 MiB), and the HTTP/2 options
(grpc.http2.lookahead_bytes, max_frame_size, bdp_probe: within the noise of the defaults).
"""
from __future__ import annotations

import time
from contextlib import closing
from typing import Any, Iterator, Sequence

import numpy as np

from kvclient.control import GrpcControl
from kvclient.errors import InvalidRequestError, TransferError
from kvclient.integrity import check_block
from kvclient.transports.base import SlotRef, TransferStats, Transport
from kvwire import payload_codec
from kvwire.types import PutOutcome
from kvwire.v1 import kvstore_pb2 as pb

INLINE_MAX_BLOCK_BYTES = 1 << 20
# Blocks up to INLINE_MAX_BLOCK_BYTES go in one Put while they total at most MESSAGE_BUDGET_BYTES. In a larger put,
# blocks of STREAM_BLOCK_BYTES or more go Reserve -> Write stream -> Commit, smaller ones in Puts of MESSAGE_BUDGET_BYTES.
# On a loaded 2-core loopback host, 32 MiB: of 1 MiB blocks, ~58 ms streamed, 60-90 ms in 4 MiB Puts, ~250 ms in one Put;
# of 64 KiB blocks, ~195 ms streamed (a message a block), ~86 ms in 4 MiB Puts.
MESSAGE_BUDGET_BYTES = 4 << 20
STREAM_BLOCK_BYTES = 512 << 10
WRITE_CHUNK_BYTES = 1 << 20  # a Write message's payload: like the server's Get messages (kvstore/rpc_codec.py)


def _batches(sizes: Sequence[int], budget: int) -> Iterator[range]:
    start, acc = 0, 0
    for i, size in enumerate(sizes):
        if acc and acc + size > budget:
            yield range(start, i)
            start, acc = i, 0
        acc += size
    if start < len(sizes):
        yield range(start, len(sizes))


def land(messages: Iterator[bytes], keys: Sequence[bytes], outs: Sequence[Any] | None, results: list[Any], stats: TransferStats) -> int:
    """Copy a Get stream's pieces into results (the caller's buffers, or fresh arrays), checking each block once
    it is whole (timed in stats.validate_s); the payload bytes landed. Raises unless the stream held exactly
    the blocks of keys, in order, each whole."""
    i, size, landed, checksum, view, nbytes = -1, 0, 0, 0, memoryview(b""), 0
    for message in messages:
        for piece in payload_codec.decode_get_response(message):
            if piece.offset == 0 and landed == size:  # a new block
                i += 1
                if i >= len(keys):
                    raise TransferError(f"server sent more than the {len(keys)} blocks asked for")
                if piece.key != keys[i]:
                    raise TransferError(f"server sent block {piece.key.hex()} where {keys[i].hex()} was asked for")
                size, landed, checksum = piece.size_bytes, 0, piece.checksum
                if outs is None:
                    dest = np.empty(size, dtype=np.uint8)
                else:
                    dest = np.frombuffer(outs[i], dtype=np.uint8)
                    if len(dest) != size:
                        raise InvalidRequestError(f"output buffer for block {keys[i].hex()} holds {len(dest)} bytes; the block has {size}")
                results[i] = dest
                view = memoryview(dest)
            elif piece.key != keys[i] or piece.offset != landed or piece.size_bytes != size:
                raise TransferError(f"server sent a piece of block {piece.key.hex()} out of order")
            n = len(piece.data)
            if landed + n > size:
                raise TransferError(f"server sent more than the {size} bytes of block {keys[i].hex()}")
            view[landed : landed + n] = piece.data
            landed += n
            nbytes += n
            if landed == size:
                v0 = time.perf_counter()
                check_block(keys[i], view, checksum)
                stats.validate_s += time.perf_counter() - v0
    if landed != size:
        raise TransferError(f"server's stream ended {size - landed} bytes short of block {keys[i].hex()}")
    if i != len(keys) - 1:
        raise TransferError(f"server returned {i + 1} blocks for {len(keys)} keys")
    return nbytes


class GrpcInlineTransport(Transport):
    name = "grpc"
    reads_slots = False
    keyed_get = True
    inline_block_bytes = INLINE_MAX_BLOCK_BYTES
    inline_call_bytes = MESSAGE_BUDGET_BYTES
    stream_block_bytes = STREAM_BLOCK_BYTES

    def __init__(self, grpc_control: GrpcControl) -> None:
        self.grpc = grpc_control

    def put_inline(self, fingerprint_id, keys, payloads, checksums, durable: bool, stats: TransferStats) -> list[PutOutcome]:
        outcomes: list[PutOutcome] = []
        for batch in _batches([len(p) for p in payloads], MESSAGE_BUDGET_BYTES):
            request = payload_codec.encode_put_request(fingerprint_id, [keys[i] for i in batch], [payloads[i] for i in batch],
                                                       [checksums[i] for i in batch], durable)
            t0 = time.perf_counter()
            resp = self.grpc.call_bytes("Put", request, pb.PutResponse)
            stats.transfer_s += time.perf_counter() - t0
            stats.control_rpcs += 1
            stats.bytes += sum(len(payloads[i]) for i in batch)
            outcomes += [PutOutcome(o) for o in resp.outcomes]
        return outcomes

    def write(self, keys, slots: Sequence[SlotRef], payloads, stats: TransferStats) -> None:
        def chunks() -> Iterator[bytes]:
            for s in slots:
                view = payloads[s.index]
                for off in range(0, len(view), WRITE_CHUNK_BYTES):
                    yield payload_codec.encode_write_chunk(s.handle, off, view[off : off + WRITE_CHUNK_BYTES])

        t0 = time.perf_counter()
        self.grpc.call_bytes("Write", chunks(), pb.WriteSummary)
        stats.transfer_s += time.perf_counter() - t0
        stats.control_rpcs += 1

    def read_keys(self, fingerprint_id, keys, outs, stats: TransferStats) -> list[np.ndarray]:
        results: list[Any] = [None] * len(keys)
        t0, validated_s = time.perf_counter(), stats.validate_s
        request = pb.GetRequest(fingerprint_id=fingerprint_id, keys=list(keys))
        with closing(self.grpc.stream_bytes("Get", request)) as messages:  # closed early, the call is cancelled
            nbytes = land(messages, keys, outs, results, stats)
        stats.transfer_s += time.perf_counter() - t0 - (stats.validate_s - validated_s)
        stats.control_rpcs += 1
        stats.bytes += nbytes
        stats.blocks += len(keys)
        return results

