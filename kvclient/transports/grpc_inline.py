"""Inline gRPC transport: payload bytes inside protobuf messages.

The universal fallback: works across hosts with nothing but the control channel.
Small blocks go in one Put; large ones take the two-phase Reserve -> Write -> Commit
so no single message has to hold many large blocks.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import numpy as np
import xxhash

from kvclient.errors import ChecksumMismatchError, InvalidRequestError, LeaseError
from kvclient.transports.base import TransferStats
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


def validate_into(data: bytes | memoryview, expected: int, key: bytes, out: memoryview | None) -> np.ndarray:
    """The one client-side integrity check: a block is handed over only if its checksum matches."""
    if xxhash.xxh3_64_intdigest(data) != expected:
        raise ChecksumMismatchError(f"block {key.hex()} failed its checksum after transfer")
    if out is None:
        return np.frombuffer(bytearray(data), dtype=np.uint8)
    if len(out) != len(data):
        raise InvalidRequestError(f"output buffer for block {key.hex()} holds {len(out)} bytes; the block has {len(data)}")
    out[:] = data
    return np.frombuffer(out, dtype=np.uint8)


class GrpcInlineTransport:
    name = "grpc"

    def __init__(self, stub, fingerprint_id: bytes, call: Callable) -> None:
        self.stub = stub
        self.fingerprint_id = fingerprint_id
        self.call = call  # wraps a stub method with metadata and error mapping

    def put(self, keys, payloads, checksums, durable: bool, stats: TransferStats) -> list[int]:
        outcomes = [0] * len(keys)
        small = [i for i, p in enumerate(payloads) if len(p) <= INLINE_MAX_BLOCK_BYTES]
        large = [i for i, p in enumerate(payloads) if len(p) > INLINE_MAX_BLOCK_BYTES]
        for batch in _batches([len(payloads[i]) for i in small], MESSAGE_BUDGET_BYTES):
            idx = [small[j] for j in batch]
            req = pb.PutRequest(fingerprint_id=self.fingerprint_id, durable=durable, blocks=[pb.InlineBlock(key=keys[i], data=bytes(payloads[i]), checksum=checksums[i]) for i in idx])
            t0 = time.perf_counter()
            resp = self.call(self.stub.Put, req)
            stats.transfer_s += time.perf_counter() - t0
            stats.control_rpcs += 1
            for i, o in zip(idx, resp.outcomes):
                outcomes[i] = o
        if large:
            self._put_two_phase(keys, payloads, checksums, durable, large, outcomes, stats)
        stats.bytes += sum(len(p) for p in payloads)
        stats.blocks += len(keys)
        return outcomes

    def _put_two_phase(self, keys, payloads, checksums, durable, idx, outcomes, stats: TransferStats) -> None:
        t0 = time.perf_counter()
        resp = self.call(self.stub.Reserve, pb.ReserveRequest(fingerprint_id=self.fingerprint_id, durable=durable, blocks=[pb.BlockSpec(key=keys[i], size_bytes=len(payloads[i])) for i in idx]))
        stats.control_s += time.perf_counter() - t0
        granted = []
        for i, lease in zip(idx, resp.leases):
            if lease.outcome == pb.LEASE_GRANTED:
                granted.append((i, lease.lease_id))
            else:
                outcomes[i] = pb.PUT_ALREADY_PRESENT if lease.outcome == pb.LEASE_ALREADY_PRESENT else pb.PUT_PENDING_ELSEWHERE
        if not granted:
            return

        def chunks() -> Iterator[pb.WriteChunk]:
            for i, lease_id in granted:
                view = payloads[i]
                for off in range(0, len(view), WRITE_CHUNK_BYTES):
                    yield pb.WriteChunk(lease_id=lease_id, offset=off, data=bytes(view[off : off + WRITE_CHUNK_BYTES]))

        try:
            t0 = time.perf_counter()
            self.call(self.stub.Write, chunks())
            stats.transfer_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            commit = self.call(self.stub.Commit, pb.CommitRequest(fingerprint_id=self.fingerprint_id, durable=durable, items=[pb.CommitItem(lease_id=lid, checksum=checksums[i]) for i, lid in granted]))
            stats.control_s += time.perf_counter() - t0
        except Exception:
            try:
                self.call(self.stub.ReleaseLeases, pb.ReleaseLeasesRequest(lease_ids=[lid for _, lid in granted]))
            except LeaseError:
                pass
            raise
        stats.control_rpcs += 3
        for (i, _), o in zip(granted, commit.outcomes):
            outcomes[i] = o

    def get(self, keys, outs, stats: TransferStats) -> list[np.ndarray]:
        results: list[np.ndarray] = []
        t0 = time.perf_counter()
        validate_s = 0.0
        for resp in self.call(self.stub.Get, pb.GetRequest(fingerprint_id=self.fingerprint_id, keys=list(keys)), stream=True):
            for block in resp.blocks:
                i = len(results)
                v0 = time.perf_counter()
                results.append(validate_into(block.data, block.checksum, block.key, outs[i] if outs is not None else None))
                validate_s += time.perf_counter() - v0
        stats.transfer_s += time.perf_counter() - t0 - validate_s
        stats.validate_s += validate_s
        stats.control_rpcs += 1
        stats.bytes += sum(len(r) for r in results)
        stats.blocks += len(results)
        if len(results) != len(keys):
            raise InvalidRequestError(f"server returned {len(results)} blocks for {len(keys)} keys")
        return results

    def close(self) -> None:
        pass
