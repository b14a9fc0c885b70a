"""Write leases across real processes: one writer, waiters, and dead owners."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError
from kvwire.types import BlockState, LeaseOutcome
from tests.kvclient.transport_util import eventually

WORKER = [sys.executable, "-m", "tests.kvstore.lease_worker"]


def _args(server, fingerprint, **kw) -> str:
    return json.dumps({"address": server.address, "fingerprint": dataclasses.asdict(fingerprint), "tenant": "t-lease", **kw})


def test_eight_processes_race_one_writer_seven_waiters(make_server, fingerprint):
    server = make_server(lease_ttl_s=10)
    tokens = list(range(500, 516))
    procs = [subprocess.Popen(WORKER + [_args(server, fingerprint, mode="race", tokens=tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:
        assert json.loads(p.stdout.readline())["ready"]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    owners = [r for r in results if r["role"] == "owner"]
    assert len(owners) == 1
    assert sorted(r["outcome"] for r in results) == ["GRANTED"] + ["PENDING"] * 7
    assert len({r["owner"] for r in results if r["role"] == "waiter"}) == 1  # all saw the same owner
    assert all(r["ok"] for r in results)
    with KVClient(server.address, fingerprint, tenant="t-lease") as client:
        counters = client.stats()["counters"]
        assert counters["lease_grants"] == 1
        assert counters["puts"] == 1


def test_killed_owner_loses_lease_after_ttl_and_nothing_partial_is_visible(make_server, fingerprint):
    server = make_server(lease_ttl_s=1, host_memory="64MiB", stale_write_quarantine_s=1)
    tokens = list(range(700, 716))
    with KVClient(server.address, fingerprint, tenant="t-lease") as client:
        baseline = client.stats()["tiers"]["host"]["used_bytes"]
        key = client.block_keys(tokens)[0]
        proc = subprocess.Popen(WORKER + [_args(server, fingerprint, mode="hold", tokens=tokens, size=1 << 20)], stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(proc.stdout.readline())["ready"]
            held = client.stats()
            assert held["leases_held"] == 1
            assert held["tiers"]["host"]["used_bytes"] == baseline + (1 << 20)
            assert client.acquire([key])[0].outcome == LeaseOutcome.PENDING
            with pytest.raises(BlockNotFoundError):
                client.get([key])  # half-written: invisible
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        # The waiter learns within the TTL that nobody is computing the block any more.
        started = time.monotonic()
        assert client.wait([key], timeout_s=10) == [BlockState.MISSING]
        assert time.monotonic() - started < 3
        after = client.stats()
        assert after["leases_held"] == 0
        # The slot comes back once its stale-write quarantine ends (a dead writer's copy may still land).
        eventually(lambda: client.stats()["tiers"]["host"]["used_bytes"] == baseline, 5)
        assert after["counters"]["lease_expiries"] >= 1
        assert client.contains([key]) == [False]
        with pytest.raises(BlockNotFoundError):
            client.get([key])
        assert client.acquire([key])[0].outcome == LeaseOutcome.GRANTED
