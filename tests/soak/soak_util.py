"""Shared by the soak campaigns: the scale knob, the seed, servers with tokens, request generators, the count report.

A campaign is bounded by construction: every call carries a deadline, every wait has
a limit, and its size is BASE x KVSTORE_SOAK_SCALE (1, the default, is the short CI
run; `make soak` runs 10). Its RNG is seeded from KVSTORE_SOAK_SEED (random when
unset) and the campaign's name, and the seed is in every summary line and failure,
so `KVSTORE_SOAK_SEED=<seed> pytest tests/soak/test_x.py` replays a failure.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
import numpy as np
import xxhash
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.config import ServerConfig
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import kvstore_pb2 as pb
from tests.kvstore.admin_util import ADMIN_TOKEN, auth_flags
from tests.serverproc import ServerProc

SCALE = max(1, int(os.environ.get("KVSTORE_SOAK_SCALE", "1")))
SEED = int(os.environ.get("KVSTORE_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))

ALICE, BOB = "alice-secret", "bob-secret"
TENANT_OF = {ALICE: "alice", BOB: "bob", ADMIN_TOKEN: "ops"}
# A status no well-framed request may get: gRPC's answer to an exception the servicer did not map.
BAD_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
CALL_DEADLINE_S = 15.0  # far above any answer the servers below owe (their Waits end within max_wait_s)
# The soak servers' limits keep every legitimate wait short, so a deadline that runs out is a hang.
SERVER_FLAGS = dict(host_memory="64MiB", ssd_capacity="2GiB", max_block_bytes="1MiB", lease_ttl_s=5, max_wait_s=2,
                    local_control_read_s=2, local_control_idle_s=30, persist_on_shutdown=True)

if "ucx_all_interfaces" in {f.name for f in fields(ServerConfig)}:
    SERVER_FLAGS["ucx_all_interfaces"] = True  # ucxx listens on every interface; the soak runs the UCX data plane anyway
UCX_SERVER_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}  # over loopback TCP, as tests/kvclient's UCX tests

REPORTS: list[str] = []  # printed by conftest's terminal summary, one line per campaign


def campaign_rng(name: str, *extra: object) -> random.Random:
    return random.Random(f"{SEED}:{name}:{':'.join(map(str, extra))}")


def scaled(base: int) -> int:
    return base * SCALE


def report(campaign: str, **counts: object) -> str:
    """Record one summary line; call it before asserting, so a failing run still shows its counts."""
    line = f"soak {campaign}: seed={SEED} scale={SCALE} " + " ".join(f"{k}={v}" for k, v in counts.items())
    REPORTS.append(line)
    print(line)
    return line


def soak_server(directory: Path, **flags) -> ServerProc:
    """A server with the tokens file (alice, bob, admin ops) and the soak limits; the caller stops it."""
    directory.mkdir(parents=True, exist_ok=True)
    return ServerProc(directory / "data", flags=auth_flags(directory, **{**SERVER_FLAGS, **flags}), env=UCX_SERVER_ENV).start()


def metadata(token: str | None, client_id: str = "soak", tenant: str | None = None) -> tuple:
    md = [("kvstore-client-id", client_id)]
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    if tenant is not None:
        md.append(("kvstore-tenant", tenant))
    return tuple(md)


def server_alive(server: ServerProc, timeout_s: float = 10) -> str | None:
    """None when the process runs and answers a health check in time, else what is wrong."""
    if server.proc is None or server.proc.poll() is not None:
        return f"server process exited with {server.proc.returncode if server.proc else None}"
    try:
        with grpc.insecure_channel(server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
    except grpc.RpcError as err:
        return f"health check failed: {err.code().name} {err.details()}"
    return None if status == health_pb2.HealthCheckResponse.SERVING else f"health status {status}"


def stop_cleanly(server: ServerProc, limit_s: float = 20) -> str | None:
    """SIGTERM, and the clean exit the server owes within its shutdown grace; None, or what went wrong (a hang is killed)."""
    if server.proc is None or server.proc.poll() is not None:
        return f"server had already exited with {server.proc.returncode if server.proc else None}"
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(limit_s)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
        return f"server did not exit within {limit_s:.0f}s of SIGTERM (killed)"
    if code != 0:
        return f"server exited with {code} on SIGTERM after {time.monotonic() - started:.1f}s:\n{server.log()[-2000:]}"
    return None


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def settle(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def block_bytes(tag: bytes, size: int) -> bytes:
    """A block's content, derived from a tag alone, so a verifier rebuilds it without keeping it."""
    return np.random.default_rng(xxhash.xxh3_64_intdigest(tag)).bytes(size)


# ---- the gRPC surface --------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    service: str  # "KVStore" or "Admin"
    name: str
    path: str
    request_class: type
    response_class: type
    client_streaming: bool
    server_streaming: bool

    def parses(self, raw: bytes) -> bool:
        """Well-framed: a valid protobuf of this method's request type (nonsense values included)."""
        try:
            self.request_class.FromString(raw)
        except Exception:
            return False
        return True


def _method(service: str, m: MethodDescriptor) -> Method:
    path = f"/{m.containing_service.full_name}/{m.name}"
    return Method(service, m.name, path, GetMessageClass(m.input_type), GetMessageClass(m.output_type), m.client_streaming,
                  m.server_streaming)


METHODS = [_method("KVStore", m) for m in pb.DESCRIPTOR.services_by_name["KVStore"].methods] + [
    _method("Admin", m) for m in apb.DESCRIPTOR.services_by_name["Admin"].methods
]


@dataclass
class Pools:
    """Real values a generated request may name, so nonsense reaches past the first check."""

    fingerprint_ids: list[bytes] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # lease and pin ids seen


_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_INT_EDGES = {
    FieldDescriptor.TYPE_UINT32: [0, 1, 2, 1000, _U32 - 1, _U32],
    FieldDescriptor.TYPE_UINT64: [0, 1, 2, 1 << 20, 1 << 31, 1 << 32, 1 << 63, _U64],
    FieldDescriptor.TYPE_INT64: [0, 1, -1, -(1 << 63), (1 << 63) - 1, int(time.time() * 1000)],
    FieldDescriptor.TYPE_INT32: [0, 1, -1, -(1 << 31), (1 << 31) - 1],
}
_DOUBLES = [0.0, -0.0, 0.5, 1.0, 2.0, -1.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf")]
_STRINGS = ["", "alice", "bob", "ops", "default", "zz", "00", "ff" * 16, "../../etc/passwd", "\x00", "é" * 40, "A" * 2000]


def _bytes_value(rng: random.Random, pools: Pools, name: str) -> bytes:
    roll = rng.random()
    if roll < 0.45:
        pool = pools.fingerprint_ids if "fingerprint" in name else pools.keys
        if pool:
            return rng.choice(pool)
    if roll < 0.6:
        return rng.randbytes(16)
    return rng.randbytes(rng.choice([0, 1, 15, 17, 32, 300, 4096]))


def _scalar(rng: random.Random, pools: Pools, f: FieldDescriptor):
    if f.type in _INT_EDGES:
        if "id" in f.name and pools.ids and rng.random() < 0.5:
            return rng.choice(pools.ids)
        edges = _INT_EDGES[f.type]
        if rng.random() < 0.6:
            return rng.choice(edges)
        lo, hi = min(edges), max(edges)
        return rng.randint(lo, hi) if rng.random() < 0.3 else rng.randint(max(lo, 0), min(hi, 100_000))
    if f.type == FieldDescriptor.TYPE_DOUBLE:
        return rng.choice(_DOUBLES) if rng.random() < 0.7 else rng.uniform(-10, 10)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if f.type == FieldDescriptor.TYPE_ENUM:
        return rng.choice([0, 1, 2, 3, 4, 5, 99, -1])
    if f.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS) if rng.random() < 0.7 else "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 40)))
    if f.type == FieldDescriptor.TYPE_BYTES:
        return _bytes_value(rng, pools, f.name)
    raise AssertionError(f"no generator for field type {f.type} ({f.full_name})")


def _repeats(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.01:
        return rng.choice([70_000, 3_000])  # past max_keys_per_request, and a long batch
    return rng.choice([0, 1, 1, 2, 3, 5, 17]) if roll < 0.95 else rng.randint(18, 300)


def fill_message(msg, rng: random.Random, pools: Pools, depth: int = 0) -> None:
    """Set a random subset of msg's fields to edge and random values (a valid message, nonsense values)."""
    descriptor: Descriptor = msg.DESCRIPTOR
    for f in descriptor.fields:
        if rng.random() < 0.25:
            continue
        repeated = f.is_repeated
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 2:
                continue
            if repeated:
                container = getattr(msg, f.name)
                for _ in range(min(_repeats(rng), 400)):
                    fill_message(container.add(), rng, pools, depth + 1)
            else:
                fill_message(getattr(msg, f.name), rng, pools, depth + 1)
        elif repeated:
            n = _repeats(rng)
            if n > 1000:  # a huge batch repeats one value: cheap to build, as costly to serve
                getattr(msg, f.name).extend([_scalar(rng, pools, f)] * n)
            else:
                getattr(msg, f.name).extend(_scalar(rng, pools, f) for _ in range(n))
        else:
            setattr(msg, f.name, _scalar(rng, pools, f))


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One to four byte-level mutations of a serialized message: flips, overwrites, inserts, cuts, splices."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(data)) if data else 0
        if op == 0 and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and data:
            del data[pos : pos + rng.randint(1, 16)]
        elif op == 4:
            del data[pos:]
        else:
            data += bytes(data[: rng.randint(0, len(data))])  # concatenated protobufs merge: still well-framed often
    return bytes(data)


def request_bytes(method: Method, rng: random.Random, pools: Pools, valid: bytes | None) -> tuple[str, bytes]:
    """(kind, serialized request) for one fuzzed call: raw random bytes, a mutated valid message, or nonsense values."""
    roll = rng.random()
    if roll < 0.3:
        return "random", rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 256, 1024, rng.randint(0, 8192)]))
    if roll < 0.6 and valid is not None:
        return "mutated", mutate(valid, rng)
    msg = method.request_class()
    fill_message(msg, rng, pools)
    return "nonsense", msg.SerializeToString()
