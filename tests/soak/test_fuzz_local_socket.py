"""The local control socket (kvclient/local_wire.py frames) fed random bytes, random frames, mutated valid frames,
valid envelopes around random, mutated and nonsense requests, cut frames, stalled and idle connections.

Every connection must end in bounded time: a complete frame is answered, a broken one
closes the connection, a stalled or idle one is dropped within the server's
local_control_read_s / local_control_idle_s. A well-framed request (a frame that decodes,
names a unary KVStore method and carries a valid protobuf of its request type) must get
an answer, never UNKNOWN or INTERNAL. Afterwards the server must still answer, hold no
extra threads for the connections, and shut down cleanly.
"""
from __future__ import annotations

import math
import socket
import struct
import time

import grpc
import pytest
import xxhash

from kvwire.local_wire import FrameError, decode_request, decode_response, encode_request, method_path, unary_methods
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.admin_util import ADMIN_TOKEN
from tests.soak.soak_util import (ALICE, BAD_CODES, BOB, CALL_DEADLINE_S, METHODS, SCALE, SEED, Pools, block_bytes,
                                  campaign_rng, metadata, mutate, report, request_bytes, scaled, server_alive, settle,
                                  soak_server, stop_cleanly, thread_count)

CONNECTIONS = 300  # x scale
STALLED = 6  # x scale, held open together: a cut frame, or nothing at all
READ_S, IDLE_S = 2.0, 3.0
pytestmark = [pytest.mark.soak, pytest.mark.timeout(120 + 60 * SCALE)]

UNARY = {method_path(m): m for m in unary_methods()}
SOCKET_METHODS = [m for m in METHODS if m.path in UNARY]
NOT_SERVED = [m.path for m in METHODS if m.path not in UNARY]  # streams and the Admin service stay on gRPC
LOOKUP, STATS = (next(m.path for m in SOCKET_METHODS if m.name == name) for name in ("Lookup", "Stats"))
_LEN = struct.Struct("<I")
TIMEOUTS = [5.0, -1.0, 0.0, 1e-9, 30.0, math.inf, -math.inf, math.nan, 1e300]


def exchange(path: str, data: bytes) -> tuple[str, list]:
    """Send data on a fresh connection, close our side, read to EOF: ('closed' | 'reset' | 'hang', response frames)."""
    reply = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(CALL_DEADLINE_S)
            sock.connect(path)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + CALL_DEADLINE_S
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return "closed", frames(reply)
                reply += chunk
        except socket.timeout:
            return "hang", frames(reply)
        except OSError:  # reset, or refused: the caller checks whether the server is still there
            return "reset", frames(reply)


def frames(reply: bytes) -> list:
    """The response frames in what the server sent; a trailing partial frame is dropped."""
    out, at = [], 0
    while at + 4 <= len(reply):
        (size,) = _LEN.unpack_from(reply, at)
        if at + 4 + size > len(reply):
            break
        try:
            out.append(decode_response(memoryview(reply)[at + 4 : at + 4 + size]))
        except FrameError:
            out.append(None)
        at += 4 + size
    return out


def well_framed(data: bytes) -> bool:
    """Exactly one frame, decodable, naming a unary KVStore method, carrying a valid request of its type."""
    if len(data) < 4 or _LEN.unpack_from(data)[0] != len(data) - 4:
        return False
    try:
        request = decode_request(memoryview(data)[4:])
    except (FrameError, ValueError):
        return False
    method = next((m for m in SOCKET_METHODS if m.path == request.method), None)
    return method is not None and method.parses(bytes(request.payload))


def connection_bytes(i: int, pools: Pools, valid: dict[str, bytes]) -> tuple[str, bytes]:
    rng = campaign_rng("socket", i)
    method = rng.choice(SOCKET_METHODS)
    token = rng.choice([ALICE] * 6 + [BOB, ADMIN_TOKEN, None, "bad-token"])
    md = metadata(token, rng.choice(["s-alice", "s-2", "", "x" * 500]))
    if rng.random() < 0.1:
        md += ((rng.randbytes(4).hex(), rng.randbytes(8).hex()), ("odd-bin", rng.randbytes(9)))
    roll = rng.random()
    if roll < 0.1:
        return "random", rng.randbytes(rng.choice([0, 1, 3, 4, 5, 64, 1000, rng.randint(0, 70_000)]))
    if roll < 0.2:
        body = rng.randbytes(rng.choice([0, 1, 2, 10, 100, 5000]))
        return "random-frame", _LEN.pack(len(body)) + body
    path = method.path if rng.random() < 0.9 else rng.choice([*NOT_SERVED, "", "/x" * 300])
    kind, payload = request_bytes(method, rng, pools, valid[method.name])
    frame = encode_request(path, rng.choice(TIMEOUTS), md, payload)
    if roll < 0.4:
        return "mutated-frame", mutate(frame, rng)
    if roll < 0.47:
        return "cut-frame", frame[: rng.randint(0, len(frame) - 1)]
    if roll < 0.52:
        return "pipelined", frame + encode_request(path, 5.0, md, payload)
    return f"envelope-{kind}", frame


def test_fuzz_local_socket(tmp_path):
    server = soak_server(tmp_path, local_control_read_s=READ_S, local_control_idle_s=IDLE_S)
    try:
        run_campaign(server)
    finally:
        server.stop()


def run_campaign(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        kv = pb_grpc.KVStoreStub(channel)
        path = kv.DataPlane(pb.DataPlaneRequest(), metadata=metadata(ALICE), timeout=CALL_DEADLINE_S).local_control_socket
        fp_id = b"\x11" * 16
        keys = [bytes([i]) * 16 for i in range(4)]
        data = block_bytes(b"socket", 4096)
        kv.Put(pb.PutRequest(fingerprint_id=fp_id, blocks=[pb.InlineBlock(key=k, data=data, checksum=xxhash.xxh3_64_intdigest(data)) for k in keys]),
               metadata=metadata(ALICE, "s-alice"), timeout=CALL_DEADLINE_S)
        pin_id = kv.Pin(pb.PinRequest(fingerprint_id=fp_id, keys=keys[:2], ttl_ms=60_000), metadata=metadata(ALICE, "s-alice"), timeout=CALL_DEADLINE_S).pin_id
    assert path, "the server advertises no local control socket"
    pools = Pools(fingerprint_ids=[fp_id], keys=keys, ids=[pin_id, 1, 2])
    valid = {m.name: m.request_class().SerializeToString() for m in SOCKET_METHODS}
    valid.update(Lookup=pb.LookupRequest(fingerprint_id=fp_id, keys=keys).SerializeToString(),
                 Pin=pb.PinRequest(fingerprint_id=fp_id, keys=keys, ttl_ms=100).SerializeToString(),
                 Put=pb.PutRequest(fingerprint_id=fp_id, blocks=[pb.InlineBlock(key=keys[0], data=data, checksum=xxhash.xxh3_64_intdigest(data))]).SerializeToString())
    baseline_threads = thread_count(server.proc.pid)

    counts = {"connections": 0, "well_framed": 0, "answered": 0, "closed": 0, "bad_status": 0, "unanswered": 0, "hangs": 0,
              "stalled_dropped": 0, "crashes": 0}
    failures: list[str] = []
    for i in range(scaled(CONNECTIONS)):
        kind, data = connection_bytes(i, pools, valid)
        framed = well_framed(data)
        outcome, replies = exchange(path, data)
        counts["connections"] += 1
        counts["well_framed"] += framed
        counts["answered" if replies else "closed"] += 1
        where = f"connection #{i} ({kind}, {len(data)} bytes {data[:80].hex()}...)"
        if outcome == "hang":
            counts["hangs"] += 1
            failures.append(f"{where}: neither answered nor closed in {CALL_DEADLINE_S}s")
            if counts["hangs"] >= 3:
                break
        if framed and not replies:
            counts["unanswered"] += 1
            failures.append(f"{where}: a well-framed request got no answer ({outcome})")
        bad = [r for r in replies if r is None or r.code in BAD_CODES]
        if framed and bad:
            counts["bad_status"] += 1
            failures.append(f"{where}: " + ", ".join("an undecodable frame" if r is None else f"{r.code.name} {r.details!r}" for r in bad))
        if outcome == "reset" and server_alive(server, 5):
            counts["crashes"] += 1
            failures.append(f"{where}: server gone: {server_alive(server, 1)}")
            break

    dropped, stall_failures = stalled_connections(path, scaled(STALLED), campaign_rng("socket-stall"))
    counts["stalled_dropped"] = dropped
    failures += stall_failures
    alive = server_alive(server)
    if alive:
        counts["crashes"] += 1
        failures.append(f"after the fuzz: {alive}")
    else:
        outcome, replies = exchange(path, encode_request(STATS, 5.0, metadata(ADMIN_TOKEN), b""))
        if not replies or replies[0] is None or replies[0].code != grpc.StatusCode.OK:
            failures.append(f"after the fuzz a valid Stats over the socket got {outcome} {replies}")
        if not settle(lambda: thread_count(server.proc.pid) <= baseline_threads + 2, 10):
            failures.append(f"server threads {thread_count(server.proc.pid)} after every connection closed, {baseline_threads} before")
        stopped = stop_cleanly(server)
        if stopped:
            failures.append(stopped)
    report("fuzz_local_socket", **counts)
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures[:40])


def stalled_connections(path: str, n: int, rng) -> tuple[int, list[str]]:
    """Connections that send a cut frame or nothing and hold on: each must be dropped by the server in time."""
    socks, failures = [], []
    frame = encode_request(LOOKUP, 5.0, metadata(ALICE), pb.LookupRequest().SerializeToString())
    for i in range(n):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        part = b"" if i % 3 == 0 else frame[: rng.randint(1, len(frame) - 1)]
        sock.sendall(part)
        socks.append((sock, part))
    limit_s = max(READ_S, IDLE_S) + 10
    deadline, dropped = time.monotonic() + limit_s, 0
    for sock, part in socks:
        with sock:
            try:
                while True:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    if not sock.recv(1 << 16):
                        dropped += 1
                        break
            except socket.timeout:
                failures.append(f"a connection that sent {len(part)} of a {len(frame)}-byte frame was still open after {limit_s:.0f}s")
            except ConnectionResetError:
                dropped += 1
    return dropped, failures
