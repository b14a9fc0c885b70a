"""The ceiling of Python gRPC on this host: grpcio itself moving the same blocks, with no store behind it.

bench/peers.py measures kvstore's gRPC fallback against Redis; this is the anchor that says how much of
that gap is grpcio's own. A server process answers two generic methods with raw bytes (no protobuf):
Get streams back the blocks of a call one message each, from bytes built once; Put reads a client stream
and answers empty. The client does what any client of a store must and no more: a get copies each
message into a resident buffer, a put sends each block as one bytes message. Same loop shape as every
other system (peers_common.put_get_gbps), 1 MiB messages like kvstore's Get and Write.
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent import futures
from typing import Iterator, Sequence

import numpy as np

from peers_common import LoopShape, put_get_gbps  # bench/ is on sys.path wherever this module is imported

SERVICE = "/kvbench.Bare/"
MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def _serve(port_queue) -> None:
    import grpc

    stored: dict[int, bytes] = {}  # position -> block, as put

    def get(request: bytes, context) -> Iterator[bytes]:
        lo, n = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:16], "little")
        for i in range(lo, lo + n):
            yield stored[i]

    def put(requests: Iterator[bytes], context) -> bytes:
        position = int.from_bytes(next(requests), "little")  # the first message says where the blocks go
        for i, block in enumerate(requests):
            stored[position + i] = block
        return b""

    handler = grpc.method_handlers_generic_handler("kvbench.Bare", {
        "Get": grpc.unary_stream_rpc_method_handler(get),
        "Put": grpc.stream_unary_rpc_method_handler(put),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler], options=OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_queue.put(port)
    server.wait_for_termination()


def bare_grpc_round(block_bytes: int, shape: LoopShape) -> dict[str, float]:
    """'grpc-bare put/get <size>' GB/s: grpcio's own throughput for the shape, its server in another process."""
    import grpc

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}", options=OPTIONS) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            call_get = channel.unary_stream(SERVICE + "Get")
            call_put = channel.stream_unary(SERVICE + "Put")
            positions: dict[str, int] = {}

            def put(keys: Sequence[str], blocks: Sequence[np.ndarray]) -> None:
                lo = positions.setdefault(keys[0], len(positions))
                for i, key in enumerate(keys[1:], 1):
                    positions[key] = lo + i
                call_put(iter([lo.to_bytes(8, "little"), *(bytes(b) for b in blocks)]))

            def get(keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
                request = positions[keys[0]].to_bytes(8, "little") + len(keys).to_bytes(8, "little")
                for message, out in zip(call_get(request), outs):
                    out[:] = np.frombuffer(message, np.uint8)

            return put_get_gbps("grpc-bare", put, get, lambda keys: None, block_bytes, shape, "bare")
    finally:
        server.kill()
        server.join(10)
