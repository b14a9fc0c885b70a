"""Clients killed mid-transfer leave nothing behind; the shm path moves no payload through the server."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError
from kvwire.types import BlockState, PutOutcome
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import HAVE_UCX, UCX_SERVER_ENV, eventually, proc_io_bytes, random_blocks, tokens
from tests.serverproc import ServerProc

DATA_TRANSPORTS = ["shm", pytest.param("ucx", marks=[pytest.mark.ucx, pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable")])]
TTL_S = 1


@pytest.fixture
def ttl_server(tmp_path):
    flags = {"host_memory": "512MiB", "ssd_capacity": "1GiB", "lease_ttl_s": TTL_S, "pin_ttl_s": TTL_S, "stale_write_quarantine_s": TTL_S}
    srv = ServerProc(tmp_path / "data", flags=flags, env=UCX_SERVER_ENV).start()
    yield srv
    srv.stop()


def stalled_client(srv, transport: str, op: str, n_blocks: int, block_bytes: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.kvclient.stalled_client", srv.address, transport, op, str(n_blocks), str(block_bytes)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc


def wait_for_line(proc: subprocess.Popen, line: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if not got and proc.poll() is not None:
            break
        seen.append(got)
        if got.strip() == line:
            return
    proc.kill()
    raise AssertionError(f"child never printed {line!r}:\n{''.join(seen)}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def observer(srv) -> KVClient:
    return KVClient(srv.address, make_fingerprint(), tenant="stalled", transport="grpc")


@pytest.mark.parametrize("transport", DATA_TRANSPORTS)
def test_client_killed_mid_put_leaves_no_visible_block(ttl_server, transport):
    child = stalled_client(ttl_server, transport, "put-filled", 8, 1 << 20)
    wait_for_line(child, "STALLED")
    with observer(ttl_server) as obs:
        keys = obs.block_keys(tokens(8))
        statuses, prefix = obs.status(keys)
        assert prefix == 0 and {s.state for s in statuses} == {BlockState.PENDING}
        kill(child)
        eventually(lambda: obs.stats()["leases_held"] == 0, 10 * TTL_S)
        assert obs.contains(keys) == [False] * 8
        with pytest.raises(BlockNotFoundError):
            obs.get(keys[:1])
        eventually(lambda: obs.stats()["tiers"]["host"]["used_bytes"] == 0, 10 * TTL_S)  # after the stale-write quarantine
        # The keys are free for the next writer.
        assert obs.put(keys, random_blocks(8, 1 << 20)) == [PutOutcome.STORED] * 8


@pytest.mark.parametrize("op", ["get-pinned", "get-midway"])
@pytest.mark.parametrize("transport", DATA_TRANSPORTS)
def test_client_killed_mid_get_leaves_no_pin(ttl_server, transport, op):
    with observer(ttl_server) as obs:
        keys = obs.block_keys(tokens(16))
        blocks = [np.full(1 << 20, i % 251, np.uint8) for i in range(16)]
        obs.put(keys, blocks)
        child = stalled_client(ttl_server, transport, op, 16, 1 << 20)
        wait_for_line(child, "STALLED")
        if op == "get-pinned" or transport == "shm":
            assert obs.stats()["pins_held"] == 1
        kill(child)
        eventually(lambda: obs.stats()["pins_held"] == 0, 10 * TTL_S)
        # Unpinned blocks can be deleted and their slots reclaimed.
        assert obs.delete(keys) == 16
        eventually(lambda: obs.stats()["tiers"]["host"]["used_bytes"] == 0, 10 * TTL_S)


@pytest.mark.ucx
@pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable")
def test_ucx_client_killed_during_transfer_server_keeps_serving(ttl_server):
    with observer(ttl_server) as obs:
        keys = obs.block_keys(tokens(64))
        blocks = random_blocks(64, 4 << 20)
        obs.put(keys, blocks)
        for _ in range(3):
            child = stalled_client(ttl_server, "ucx", "get-midway", 64, 4 << 20)
            # Kill as soon as the pin exists: the server is then mid-way through sending 256 MiB.
            eventually(lambda: obs.stats()["pins_held"] > 0 or child.poll() is not None, 10 * TTL_S)
            kill(child)
        eventually(lambda: obs.stats()["pins_held"] == 0, 10 * TTL_S)
    with KVClient(ttl_server.address, make_fingerprint(), tenant="stalled", transport="ucx") as fresh:
        assert all(np.array_equal(a, b) for a, b in zip(fresh.get(keys), blocks))


def test_shm_moves_no_payload_through_the_server(ttl_server):
    block, n = 4 << 20, 64  # 256 MiB stored, read back 4 times: 1.25 GiB moved
    with KVClient(ttl_server.address, make_fingerprint(), tenant="zero-copy", transport="shm") as client:
        keys = client.block_keys(tokens(n))
        blocks = random_blocks(n, block)
        outs = [np.empty(block, np.uint8) for _ in range(n)]
        counters = lambda: {k: v for k, v in client.stats()["counters"].items() if k.startswith(("grpc_bytes", "ucx_bytes"))}
        before_counters, before_io = counters(), proc_io_bytes(ttl_server.proc.pid)
        client.put(keys, blocks)
        for _ in range(4):
            client.get(keys, out=outs)
        moved = n * block * 5
        server_io = proc_io_bytes(ttl_server.proc.pid) - before_io
        assert counters() == before_counters
        # Control RPCs and logs only: under 1% of the payload went through the server's syscalls.
        assert server_io < moved // 100, f"server moved {server_io} bytes through syscalls for {moved} payload bytes"
        assert all(np.array_equal(a, b) for a, b in zip(outs, blocks))
