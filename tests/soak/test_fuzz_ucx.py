"""The UCX port fed raw TCP bytes, connections dropped at once, random hellos, hellos with a wrong token,
random and mutated requests after a valid hello, and well-shaped requests naming nothing real.

The data plane has no status codes; what it owes: a well-framed request (a hello with a
wrong token; a correctly shaped keyed get, get or put naming unknown keys, pins or leases)
gets an error reply naming a kvstore error type whose status is neither UNKNOWN nor
INTERNAL, within a deadline; nothing crashes the server; and between attempts a real UCX
client still stores and reads back byte-exact. Skipped only when ucxx is not importable.
"""
from __future__ import annotations

import socket
import time

import grpc
import numpy as np
import pytest

from kvclient import KVClient
from kvwire.errors import ERROR_TYPES
from kvwire import ucx_wire as wire
from kvwire.ucxenv import Endpoint, Worker, import_ucxx
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.conftest import make_fingerprint
from tests.soak.soak_util import (ALICE, BAD_CODES, CALL_DEADLINE_S, SCALE, SEED, block_bytes, campaign_rng, metadata,
                                  mutate, report, scaled, server_alive, soak_server, stop_cleanly)

ATTEMPTS = 60  # x scale
CHECK_EVERY = 20  # a real client's round trip after this many attempts
GARBAGE_REPLY_S = 0.3  # a broken request may get silence: wait this long, then drop the endpoint
ANSWER_S = 5.0  # a well-framed one must be answered within this
pytestmark = [pytest.mark.soak, pytest.mark.ucx, pytest.mark.skipif(import_ucxx() is None, reason="ucxx not importable"),
              pytest.mark.timeout(120 + 90 * SCALE)]
FP = make_fingerprint(model="soak-ucx")
CLIENT_ID = "u-fuzz"


class Session:
    """What a UCX client learns from DataPlane, and real keys, a pin and a lease of its caller to name."""

    def __init__(self, server) -> None:
        md = metadata(ALICE, CLIENT_ID)
        with KVClient(server.address, FP, tenant="alice", token=ALICE, transport="grpc") as client:
            keys = client.block_keys(list(range(3 * 16)))
            client.put(keys, [np.frombuffer(block_bytes(k.digest, 8192), np.uint8) for k in keys])
        self.keys = [k.digest for k in keys]
        with grpc.insecure_channel(server.address) as channel:
            kv = pb_grpc.KVStoreStub(channel)
            info = kv.DataPlane(pb.DataPlaneRequest(), metadata=md, timeout=CALL_DEADLINE_S)
            self.pin_id = kv.Pin(pb.PinRequest(fingerprint_id=FP.id, keys=self.keys[:1], ttl_ms=300_000), metadata=md, timeout=CALL_DEADLINE_S).pin_id
        assert info.ucx_listener, "ucxx is importable but the server advertises no UCX listener"
        host, port = info.ucx_listener.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.token, self.tenant = info.ucx_session_token, info.ucx_session_tenant

    def hello(self, token: bytes | None = None, client_id: str = CLIENT_ID) -> list[np.ndarray]:
        ident, tenant, token = client_id.encode(), self.tenant.encode(), self.token if token is None else token
        return [wire.header(wire.OP_HELLO, len(ident), len(token), len(tenant)), np.frombuffer(ident + token + tenant, np.uint8)]


class Attempt:
    """One endpoint: send messages, collect what comes back before a deadline, then drop it."""

    def __init__(self, worker: Worker, session: Session) -> None:
        self.worker, self.session = worker, session

    def run(self, messages: list[tuple[np.ndarray, int | None]], replies: list[np.ndarray], wait_s: float,
            hello: bool) -> tuple[str, list[np.ndarray]]:
        """('answered' | 'silent' | 'error:<why>', the reply buffers that landed). hello: a valid hello first."""
        if not self.worker.lock.acquire(timeout=CALL_DEADLINE_S):
            return "error:worker busy", []
        ep = None
        try:
            deadline = time.monotonic() + CALL_DEADLINE_S
            ep = Endpoint(self.worker, self.session.host, self.session.port, deadline)
            if hello:
                reply = wire.empty_header()
                self.worker.wait([*(ep.send(m) for m in self.session.hello()), ep.recv(reply)], deadline)
                if int(reply[0]) != wire.STATUS_OK:
                    return "error:valid hello refused", []
            sends = [ep.send(m, tag=tag) for m, tag in messages]
            landed: list[np.ndarray] = []
            try:
                for buf in replies:
                    self.worker.wait([ep.recv(buf)], time.monotonic() + wait_s)
                    landed.append(buf)
                self.worker.wait(sends, time.monotonic() + wait_s)
            except TimeoutError:
                return ("answered" if landed else "silent"), landed
            except Exception as err:  # the server dropped the endpoint (what it does to a broken request)
                return f"error:{type(err).__name__}", landed
            return "answered", landed
        except Exception as err:
            return f"error:{type(err).__name__}: {err}", []
        finally:
            if ep is not None:
                ep.abort()
            self.worker.lock.release()


def error_reply(header: np.ndarray) -> list[np.ndarray]:
    """Buffers for a reply that may be an error: the header, then up to 4 KiB of 'ErrorType: detail'."""
    return [header, np.zeros(4096, np.uint8)]


def detail_problem(landed: list[np.ndarray], length_word: int) -> str | None:
    """None when the reply is an error naming a kvstore error type whose status is not UNKNOWN/INTERNAL."""
    if not landed:
        return "no reply"
    head = landed[0]
    if int(head[0]) != wire.STATUS_ERROR:
        return f"status {int(head[0])}, expected an error reply"
    if len(landed) < 2:
        return "an error reply without its detail"
    detail = landed[1][: int(head[length_word])].tobytes().decode(errors="replace")
    name = detail.partition(": ")[0]
    cls = ERROR_TYPES.get(name)
    if cls is None or grpc.StatusCode[cls.status] in BAD_CODES:
        return f"error detail {detail!r}"
    return None


def well_framed_attempt(rng, session: Session) -> tuple[str, list, list, int, bool]:
    """(kind, messages, reply buffers, index of the detail length in the reply header, needs a valid hello first)."""
    kind = rng.choice(["bad-token", "get-keys-unknown", "get-keys-wrong-size", "get-unknown-pin", "put-unknown-lease"])
    if kind == "bad-token":
        return kind, [(m, None) for m in session.hello(token=rng.randbytes(32))], error_reply(wire.empty_header()), 1, False
    if kind.startswith("get-keys"):
        n = rng.randint(1, 4)
        keys = [rng.randbytes(16) for _ in range(n)] if kind == "get-keys-unknown" else [rng.choice(session.keys) for _ in range(n)]
        sizes = [8192 if kind == "get-keys-unknown" else rng.choice([1, 8191, 8193, 1 << 20]) for _ in range(n)]
        body = FP.id + b"".join(keys)
        head = np.array([wire.OP_GET_KEYS, n, wire.GROUP_BYTES, len(body)] + sizes + [16] * n, dtype=np.uint64)
        request = np.frombuffer(head.tobytes() + body, np.uint8)
        return kind, [(request, None)], error_reply(np.zeros(wire.HEADER_WORDS + n, np.uint64)), 3, True
    if kind == "get-unknown-pin":
        pin = rng.choice([session.pin_id + 1000, rng.randrange(1, 1 << 63)])
        return kind, [(wire.header(wire.OP_GET, 1, pin, wire.GROUP_BYTES), None)], error_reply(wire.empty_header()), 1, True
    n = rng.randint(1, 3)
    sizes = [rng.choice([4096, 65536]) for _ in range(n)]
    meta = np.array([rng.randrange(1, 1 << 63) for _ in range(n)] + sizes, dtype=np.uint64)
    messages = [(wire.header(wire.OP_PUT, n, 0), None), (meta, None)] + [(np.frombuffer(rng.randbytes(s), np.uint8), wire.DATA_TAG) for s in sizes]
    return kind, messages, error_reply(wire.empty_header()), 1, True


def garbage_attempt(rng, session: Session) -> tuple[str, list, bool]:
    """(kind, messages, valid hello first) for a request that is broken on purpose."""
    kind = rng.choice(["hello-garbage", "hello-oversized", "request-garbage", "request-mutated", "request-huge-count"])
    random_words = lambda n: np.array([rng.choice([0, 1, 2, 3, 4, 5, 1 << 20, (1 << 64) - 1, rng.randrange(1 << 64)]) for _ in range(n)], dtype=np.uint64)
    if kind == "hello-garbage":
        return kind, [(random_words(4), None), (np.frombuffer(rng.randbytes(rng.randint(0, 2000)), np.uint8), None)], False
    if kind == "hello-oversized":
        return kind, [(np.frombuffer(rng.randbytes(rng.randint(33, 70_000)), np.uint8), None)], False
    if kind == "request-garbage":
        words = random_words(4)
        words[0] = rng.choice([wire.OP_GET_KEYS, wire.OP_GET, wire.OP_PUT, wire.OP_HELLO, 9])
        extra = [(np.frombuffer(rng.randbytes(rng.randint(0, 5000)), np.uint8), rng.choice([None, wire.DATA_TAG])) for _ in range(rng.randint(0, 3))]
        return kind, [(words, None), *extra], True
    if kind == "request-huge-count":
        op = rng.choice([wire.OP_GET_KEYS, wire.OP_PUT, wire.OP_GET])
        return kind, [(wire.header(op, rng.choice([(1 << 20), (1 << 20) + 1, 1 << 40]), rng.randrange(1 << 30), rng.randrange(1 << 40)), None)], True
    body = FP.id + b"".join(session.keys)
    head = np.array([wire.OP_GET_KEYS, len(session.keys), wire.GROUP_BYTES, len(body)] + [8192] * len(session.keys) + [16] * len(session.keys), dtype=np.uint64)
    return kind, [(np.frombuffer(mutate(head.tobytes() + body, rng), np.uint8), None)], True


def tcp_garbage(session: Session, rng) -> None:
    """Raw bytes straight at the UCX listener's TCP port, below UCX's own connection protocol."""
    garbage = rng.randbytes(rng.choice([1, 16, 64, 1024, rng.randint(0, 20_000)]))
    try:
        with socket.create_connection(("127.0.0.1", session.port), timeout=CALL_DEADLINE_S) as sock:
            sock.sendall(garbage)
            sock.settimeout(GARBAGE_REPLY_S)
            sock.recv(1 << 16)
    except OSError:  # timed out or dropped: fine; a server that is gone shows at the next liveness check
        pass


def round_trip(server, rng) -> str | None:
    """A real UCX client: put and get back byte-exact, or what went wrong."""
    try:
        with KVClient(server.address, FP, tenant="alice", token=ALICE, transport="ucx", timeout_s=CALL_DEADLINE_S) as client:
            start = rng.randrange(1 << 30)
            keys = client.block_keys(list(range(start, start + 4 * 16)))
            blocks = [np.frombuffer(block_bytes(k.digest, 64 << 10), np.uint8) for k in keys]
            client.put(keys, blocks)
            outs = [np.zeros(64 << 10, np.uint8) for _ in keys]
            client.get(keys, out=outs)
            if not all(np.array_equal(a, b) for a, b in zip(outs, blocks)):
                return "a real UCX client read back other bytes"
            if client.transport.name != "ucx":
                return f"the real client fell back to {client.transport.name}"
    except Exception as err:
        return f"a real UCX client failed: {type(err).__name__}: {err}"
    return None


def test_fuzz_ucx_port(tmp_path):
    server = soak_server(tmp_path)
    try:
        run_campaign(server)
    finally:
        server.stop()


def run_campaign(server) -> None:
    session = Session(server)
    attempt = Attempt(Worker.get(), session)
    counts = {"attempts": 0, "tcp_garbage": 0, "connect_drop": 0, "garbage": 0, "well_framed": 0, "answered": 0,
              "bad_replies": 0, "client_checks": 0, "crashes": 0}
    failures: list[str] = []
    for i in range(scaled(ATTEMPTS)):
        rng = campaign_rng("ucx", i)
        roll = rng.random()
        counts["attempts"] += 1
        if roll < 0.15:
            counts["tcp_garbage"] += 1
            tcp_garbage(session, rng)
        elif roll < 0.25:
            counts["connect_drop"] += 1
            attempt.run([], [], 0, hello=rng.random() < 0.5)
        elif roll < 0.6:
            counts["garbage"] += 1
            kind, messages, hello = garbage_attempt(rng, session)
            outcome, _ = attempt.run(messages, [np.zeros(wire.REQUEST_BYTES, np.uint8)], GARBAGE_REPLY_S, hello)
            counts["answered"] += outcome == "answered"
            if outcome.startswith("error:") and "valid hello refused" in outcome:
                failures.append(f"attempt #{i} ({kind}): a valid hello was refused")
        else:
            counts["well_framed"] += 1
            kind, messages, replies, length_word, hello = well_framed_attempt(rng, session)
            outcome, landed = attempt.run(messages, replies, ANSWER_S, hello)
            counts["answered"] += bool(landed)
            problem = detail_problem(landed, length_word)
            if problem:
                counts["bad_replies"] += 1
                failures.append(f"attempt #{i} ({kind}): {problem} ({outcome})")
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == scaled(ATTEMPTS):
            alive = server_alive(server)
            if alive:
                counts["crashes"] += 1
                failures.append(f"after attempt #{i}: {alive}\n{server.log()[-3000:]}")
                break
            counts["client_checks"] += 1
            problem = round_trip(server, rng)
            if problem:
                failures.append(f"after attempt #{i}: {problem}")
    if not counts["crashes"]:
        stopped = stop_cleanly(server)
        if stopped:
            failures.append(f"after the fuzz: {stopped}")
    report("fuzz_ucx", **counts)
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures[:40])
