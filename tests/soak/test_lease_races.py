"""Lease races: racers (one KVClient each, one tenant) go for the same keys at once, over gRPC, the local
socket with shm, and UCX; owners write, give up, or stall past their TTL; some losers write anyway.

Whatever the interleaving, exactly one put per key may be STORED, and every reader then
gets that writer's bytes. Every racer must finish in bounded time (waits end within the
server's max_wait_s; a lease given up or expired lets the next racer in).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import grpc
import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError
from kvwire.keys import BlockKey, block_keys
from kvwire.types import BlockState, LeaseOutcome, PutOutcome
from kvwire.ucxenv import import_ucxx
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.conftest import make_fingerprint
from tests.soak.soak_util import (ALICE, CALL_DEADLINE_S, SCALE, SEED, block_bytes, campaign_rng, metadata, report, scaled,
                                  soak_server, stop_cleanly)

ROUNDS = 4  # x scale
KEYS_PER_ROUND = 20
RACERS = 4
STALL_TTL_S = 0.5
ROUND_LIMIT_S = 60
FP = make_fingerprint(model="soak-leases")
TRANSPORTS = ["grpc", "shm", "ucx" if import_ucxx() is not None else "auto", "auto"]
pytestmark = [pytest.mark.soak, pytest.mark.timeout(120 + 60 * SCALE)]


def payload(key: bytes, racer: int) -> bytes:
    """What racer writes for key: the bytes read back name the writer."""
    return block_bytes(key + bytes([racer]), 4096 + 512 * (key[0] % 64))


class Round:
    def __init__(self, r: int) -> None:
        rng = campaign_rng("leases", r)
        self.number = r
        tokens = list(range(r * 10_000, r * 10_000 + KEYS_PER_ROUND * 16))
        self.keys = [k.digest for k in block_keys(FP, tokens, "alice")]
        # write: the owner writes at once; release: the first owner gives up; stall: the first owner outlives its TTL
        self.variant = {k: rng.choices(["write", "release", "stall"], [80, 15, 5])[0] for k in self.keys}
        self.rogue = {(k, i): rng.random() < 0.1 for k in self.keys for i in range(RACERS)}
        self.first_owner: dict[bytes, int] = {}
        self.outcomes: dict[bytes, list[tuple[int, str]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(RACERS)
        self.errors: list[str] = []
        self.contended: set[bytes] = set()  # keys some racer found held by another

    def record(self, key: bytes, racer: int, what: str) -> None:
        with self.lock:
            self.outcomes[key].append((racer, what))

    def claim_first(self, key: bytes, racer: int) -> bool:
        with self.lock:
            return self.first_owner.setdefault(key, racer) == racer


def race(address: str, rnd: Round, racer: int, deadline: float) -> None:
    try:
        with KVClient(address, FP, tenant="alice", token=ALICE, transport=TRANSPORTS[racer % len(TRANSPORTS)], timeout_s=15) as client:
            for key in rnd.keys:
                rnd.barrier.wait(30)  # all racers at each key at once
                race_key(client, rnd, racer, key, deadline)
    except Exception as err:
        rnd.barrier.abort()  # the others stop at the next key instead of waiting for this racer
        if not isinstance(err, threading.BrokenBarrierError):
            rnd.errors.append(f"racer {racer}: {type(err).__name__}: {err}")


def race_key(client: KVClient, rnd: Round, racer: int, key: bytes, deadline: float) -> None:
    bkey, variant = BlockKey(key), rnd.variant[key]
    while time.monotonic() < deadline:
        lease = client.acquire([bkey], ttl_s=STALL_TTL_S if variant == "stall" else None)[0]
        if lease.outcome == LeaseOutcome.ALREADY_PRESENT:
            return
        if lease.outcome == LeaseOutcome.PENDING:
            rnd.contended.add(key)
        if lease.outcome == LeaseOutcome.GRANTED:
            first = rnd.claim_first(key, racer)
            if variant == "release" and first:
                client.release([bkey])
                rnd.record(key, racer, "released")
                return
            if variant == "stall" and first:
                time.sleep(STALL_TTL_S + 0.3)  # the lease expires under us; the put below must not land over another's
            rnd.record(key, racer, client.put([bkey], [np.frombuffer(payload(key, racer), np.uint8)])[0].name)
            return
        if rnd.rogue[(key, racer)]:
            outcome = client.put([bkey], [np.frombuffer(payload(key, racer), np.uint8)])[0]
            rnd.record(key, racer, f"rogue-{outcome.name}")
            if outcome == PutOutcome.STORED:
                return
        if client.wait([bkey], timeout_s=5)[0] == BlockState.PRESENT:
            return
    rnd.errors.append(f"racer {racer}: key {key.hex()} neither present nor won within the round's {ROUND_LIMIT_S}s")


def test_lease_races(tmp_path):
    server = soak_server(tmp_path, lease_ttl_s=5)
    counts = {"races": 0, "contended": 0, "one_writer": 0, "violations": 0, "releases": 0, "stalls": 0, "rogue_puts": 0, "hangs": 0}
    failures: list[str] = []
    try:
        for r in range(scaled(ROUNDS)):
            rnd = Round(r)
            deadline = time.monotonic() + ROUND_LIMIT_S
            racers = [threading.Thread(target=race, args=(server.address, rnd, i, deadline), daemon=True) for i in range(RACERS)]
            for t in racers:
                t.start()
            for t in racers:
                t.join(max(1.0, deadline - time.monotonic() + 15))
            if any(t.is_alive() for t in racers):
                counts["hangs"] += 1
                failures.append(f"round {r}: racers still running {ROUND_LIMIT_S + 15}s after the start")
                break
            failures += [f"round {r}: {e}" for e in rnd.errors]
            failures += check_round(server.address, rnd, counts)
            if failures:
                break
            counts["contended"] += len(rnd.contended)
            counts["releases"] += sum(v == "release" for v in rnd.variant.values())
            counts["stalls"] += sum(v == "stall" for v in rnd.variant.values())
            counts["rogue_puts"] += sum(what.startswith("rogue") for o in rnd.outcomes.values() for _, what in o)
        stopped = stop_cleanly(server)
        if stopped:
            failures.append(stopped)
    finally:
        report("lease_races", **counts)
        server.stop()
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures[:40])


def check_round(address: str, rnd: Round, counts: dict) -> list[str]:
    """Per key: exactly one STORED put, and the block holds that writer's bytes."""
    failures = []
    with KVClient(address, FP, tenant="alice", token=ALICE, transport="grpc", timeout_s=15) as client:
        for key in rnd.keys:
            counts["races"] += 1
            writers = [racer for racer, what in rnd.outcomes[key] if what.endswith("STORED")]
            try:
                got = client.get([BlockKey(key)])[0].tobytes()
            except BlockNotFoundError:
                got = b""
            if len(writers) == 1 and got == payload(key, writers[0]):
                counts["one_writer"] += 1
                continue
            counts["violations"] += 1
            readers = [i for i in range(RACERS) if got == payload(key, i)]
            failures.append(f"key {key.hex()} ({rnd.variant[key]}): STORED for racers {writers}, bytes of racer {readers}; "
                            f"history {rnd.outcomes[key]}")
    return failures


def test_abandoned_waits_free_their_places(tmp_path):
    """Waiters that give up (their deadline passes while the key is still pending) must not keep holding the
    tenant's concurrent-Wait places: a waiter that stays gets served once the abandoned ones are noticed."""
    server = soak_server(tmp_path, max_wait_s=30, max_waits_per_tenant=4)
    abandoned, failures, last = 0, [], ""
    try:
        with KVClient(server.address, FP, tenant="alice", token=ALICE, transport="grpc", timeout_s=15) as holder, \
                grpc.insecure_channel(server.address) as channel:
            key = holder.block_keys(list(range(16)))[0]
            assert holder.acquire([key], ttl_s=60)[0].outcome == LeaseOutcome.GRANTED
            wait = pb_grpc.KVStoreStub(channel).Wait
            request = pb.WaitRequest(fingerprint_id=FP.id, keys=[key.digest], timeout_ms=20_000)
            for _ in range(scaled(8)):  # twice the places
                try:
                    wait(request, metadata=metadata(ALICE, "quitter"), timeout=0.3)
                except grpc.RpcError as err:
                    abandoned += err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline, served = time.monotonic() + 5, None
            short = pb.WaitRequest(fingerprint_id=FP.id, keys=[key.digest], timeout_ms=200)
            while served is None and time.monotonic() < deadline:
                try:
                    served = wait(short, metadata=metadata(ALICE, "stayer"), timeout=CALL_DEADLINE_S).statuses[0].state
                except grpc.RpcError as err:  # RESOURCE_EXHAUSTED while abandoned Waits still count
                    last = f"{err.code().name}: {err.details()}"
                    time.sleep(0.2)
            if served != pb.BLOCK_PENDING:
                failures.append(f"after {abandoned} abandoned Waits a waiter was still turned away 5 s later: {last}")
        stopped = stop_cleanly(server)
        if stopped:
            failures.append(stopped)
    finally:
        report("abandoned_waits", abandoned=abandoned, turned_away=len(failures))
        server.stop()
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures)
