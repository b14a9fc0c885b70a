"""The UCX data plane under concurrency and refusal: several client processes at once, byte-exact and bounded in time."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time

import numpy as np
import pytest

from kvclient import KVClient, SlotRef, TransferStats
from kvclient.errors import BlockNotFoundError, InvalidRequestError, LeaseError, UnauthenticatedError
from kvclient.transports.ucx import UcxTransport
from kvwire import ucx_wire as wire
from kvwire.types import PutOutcome
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import HAVE_UCX, UCX_SERVER_ENV, eventually, random_blocks, tokens
from tests.serverproc import ServerProc

pytestmark = [pytest.mark.ucx, pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable")]

CLIENTS = 4
DEADLINE_S = 60  # generous: a healthy run takes a few seconds; a stalled data plane takes minutes
# Large blocks travel zero-copy, one message each; the small and odd-sized ones share messages.
SIZES = [1 << 20] * 24 + [64 << 10] * 48 + [4097] * 5


@pytest.fixture(scope="module")
def ucx_server(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("ucx") / "data", flags={"host_memory": "512MiB", "ssd_capacity": "1GiB", "persist_on_shutdown": False}, env=UCX_SERVER_ENV)
    srv.start()
    yield srv
    srv.stop()


def client_for(srv, tenant: str) -> KVClient:
    client = KVClient(srv.address, make_fingerprint(), tenant=tenant, transport="ucx")
    assert client.stats()["client"]["transport"] == "ucx"
    return client


def _round_trips(idx: int, address: str, rounds: int, results) -> None:
    """One client process: put, then get into caller buffers and into fresh ones, checking every byte."""
    try:
        with KVClient(address, make_fingerprint(), tenant=f"conc-{idx}", transport="ucx") as client:
            for r in range(rounds):
                keys = client.block_keys(tokens(len(SIZES), start=idx * 10**6 + r * 10**5))
                rng = np.random.default_rng(idx * 100 + r)
                blocks = [rng.integers(0, 256, size, dtype=np.uint8) for size in SIZES]
                assert set(client.put(keys, blocks)) == {PutOutcome.STORED}
                outs = [np.zeros(size, np.uint8) for size in SIZES]
                client.get(keys, out=outs)
                assert all(np.array_equal(a, b) for a, b in zip(outs, blocks)), "get into caller buffers differs"
                assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks)), "get into fresh buffers differs"
                assert client.delete(keys) == len(keys)
        results.put((idx, None))
    except BaseException as err:  # reported to the parent, which names the client
        results.put((idx, f"{type(err).__name__}: {err}"))


def test_concurrent_clients_byte_exact_and_bounded(ucx_server):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_round_trips, args=(i, ucx_server.address, 3, results)) for i in range(CLIENTS)]
    start = time.monotonic()
    for p in procs:
        p.start()
    outcomes = {}
    try:
        while len(outcomes) < CLIENTS:
            left = DEADLINE_S - (time.monotonic() - start)
            try:
                idx, error = results.get(timeout=max(left, 0.1))
            except queue.Empty:
                pytest.fail(f"UCX clients {sorted(set(range(CLIENTS)) - set(outcomes))} did not finish in {DEADLINE_S}s")
            outcomes[idx] = error
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert outcomes == {i: None for i in range(CLIENTS)}
    with client_for(ucx_server, "observer") as obs:
        eventually(lambda: obs.stats()["pins_held"] == 0 and obs.stats()["leases_held"] == 0)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_connection_costs_the_server_no_cpu(ucx_server):
    """The root cause of multi-client stalls: each pending UCX request used to poll, a core per waiting loop."""
    with client_for(ucx_server, "idle") as client:
        keys = client.block_keys(tokens(1, start=8_000_000))
        client.put(keys, random_blocks(1, 4096))
        client.get(keys)  # the server now waits on this endpoint for the next request
        time.sleep(0.3)
        cpu0, t0 = cpu_seconds(ucx_server.proc.pid), time.monotonic()
        time.sleep(1.5)
        share = (cpu_seconds(ucx_server.proc.pid) - cpu0) / (time.monotonic() - t0)
    assert share < 0.3, f"the server used {share:.0%} of a core while its one UCX client was idle"


def test_idle_client_costs_no_cpu(ucx_server):
    """The client progresses UCX only inside a call (no progress thread, no event loop): between calls it costs nothing."""
    with client_for(ucx_server, "idle-client") as client:
        keys = client.block_keys(tokens(1, start=8_500_000))
        client.put(keys, random_blocks(1, 1 << 20))
        client.get(keys, out=[np.zeros(1 << 20, np.uint8)])
        time.sleep(0.3)
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(1.5)
        share = (time.process_time() - cpu0) / (time.monotonic() - t0)
    assert share < 0.05, f"this process used {share:.0%} of a core while its UCX client was idle"


def test_clients_in_one_process_share_the_worker_from_threads(ucx_server):
    """Several KVClients in one process, each on its own thread, take turns on the process's one UCX worker."""
    errors: list[str] = []

    def rounds(idx: int) -> None:
        try:
            with client_for(ucx_server, f"threads-{idx}") as client:
                for r in range(4):
                    keys = client.block_keys(tokens(6, start=9_000_000 + idx * 10_000 + r * 100))
                    blocks = random_blocks(6, (1 << 20) if r % 2 else (64 << 10), seed=idx * 10 + r)
                    client.put(keys, blocks)
                    outs = [np.zeros(b.size, np.uint8) for b in blocks]
                    client.get(keys, out=outs)
                    assert all(np.array_equal(a, b) for a, b in zip(outs, blocks)), f"client {idx} round {r} differs"
                    assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks)), f"client {idx} round {r} differs"
        except BaseException as err:  # reported by the main thread, which names the client
            errors.append(f"client {idx}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=rounds, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert not any(t.is_alive() for t in threads), "UCX clients sharing a worker did not finish"
    assert errors == []


def test_refusals_leave_the_transport_usable(ucx_server):
    """The transport handed a lease or pin the server never granted (as a broken control half would)."""
    with client_for(ucx_server, "refused") as client:
        transport = client.transport
        payloads = [memoryview(b) for b in random_blocks(20, 64 << 10)]  # several shared messages to drain
        leases = [SlotRef(i, 0, len(p), handle=987_654_321 + i, checksum=0) for i, p in enumerate(payloads)]
        with pytest.raises(LeaseError):
            transport.write([b"k" * 16] * 20, leases, payloads, TransferStats())
        assert transport._ep is not None, "a refused put is drained by the server; the endpoint stays in step"
        with pytest.raises(LeaseError):
            transport.read([b"k" * 16], [SlotRef(0, 0, 4096, handle=987_654_321, checksum=0)], [np.zeros(4096, np.uint8)],
                           TransferStats())
        assert transport._ep is None, "a refused get leaves receives posted; the endpoint is dropped"
        keys = client.block_keys(tokens(3, start=7_000_000))
        blocks = random_blocks(3, 1 << 20, seed=5)
        assert client.put(keys, blocks) == [PutOutcome.STORED] * 3
        assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks))
        eventually(lambda: client.stats()["pins_held"] == 0)  # the server unpins once its sends finished


def test_keyed_get_is_one_ucx_round_trip_and_refusals_drop_the_pin(ucx_server):
    """With output buffers the server pins inside the UCX request: no gRPC Pin, and no pin outlives the call."""
    with client_for(ucx_server, "keyed") as client:
        assert client.transport.keyed_get
        assert not client.transport.hbm_sends  # no HBM tier: nothing to send GPU to GPU (tests/kvstore/test_hbm_tier.py)
        keys = client.block_keys(tokens(4, start=6_000_000))
        blocks = random_blocks(4, 1 << 20, seed=3)
        client.put(keys, blocks)
        outs = [np.zeros(1 << 20, np.uint8) for _ in blocks]
        client.get(keys, out=outs)
        assert client.last_transfer.control_rpcs == 0 and client.last_transfer.bytes == 4 << 20
        assert all(np.array_equal(a, b) for a, b in zip(outs, blocks))
        with pytest.raises(InvalidRequestError):
            client.get(keys, out=outs[:3] + [np.zeros(1000, np.uint8)])
        with pytest.raises(BlockNotFoundError):
            client.get(client.block_keys(tokens(1, start=5_000_000)), out=[np.zeros(1 << 20, np.uint8)])
        eventually(lambda: client.stats()["pins_held"] == 0)  # dropped once the refusal was sent
        client.get(keys, out=outs)  # the endpoint dropped after a refusal reconnects
        assert all(np.array_equal(a, b) for a, b in zip(outs, blocks))


def test_keyed_get_too_large_for_one_request_message(ucx_server):
    """Enough keys that the request no longer fits in REQUEST_BYTES: header, sizes and keys travel as three messages."""
    with client_for(ucx_server, "keyed-many") as client:
        keys = client.block_keys(tokens(3000, start=4_000_000))
        assert not wire.keyed_get_inline(len(keys), sum(len(k.digest) for k in keys) + len(client.fingerprint_id))
        blocks = random_blocks(3000, 300, seed=4)
        client.put(keys, blocks)
        outs = [np.zeros(300, np.uint8) for _ in blocks]
        client.get(keys, out=outs)
        assert client.last_transfer.control_rpcs == 0
        assert all(np.array_equal(a, b) for a, b in zip(outs, blocks))
        eventually(lambda: client.stats()["pins_held"] == 0)  # the server unpins once its sends finished


def test_token_server_binds_the_tenant_into_the_session_and_refuses_another(tmp_path):
    """The bearer token never crosses UCX (not encrypted): the DataPlane RPC's session token binds the
    tenant the server resolved from it, so keyed gets work, and a hello naming another tenant is refused."""
    from tests.kvstore.admin_util import auth_flags

    srv = ServerProc(tmp_path / "data", flags=auth_flags(tmp_path, host_memory="64MiB", persist_on_shutdown=False), env=UCX_SERVER_ENV).start()
    try:
        with KVClient(srv.address, make_fingerprint(), token="alice-secret", transport="ucx") as client:
            assert client.transport.name == "ucx" and client.transport.keyed_get
            assert client.transport.tenant == "alice"
            keys = client.block_keys(tokens(2, start=3_000_000))
            blocks = random_blocks(2, 1 << 20, seed=6)
            client.put(keys, blocks)
            outs = [np.zeros(1 << 20, np.uint8) for _ in blocks]
            client.get(keys, out=outs)
            assert client.last_transfer.control_rpcs == 0
            assert all(np.array_equal(a, b) for a, b in zip(outs, blocks))
            t = client.transport
            with pytest.raises(UnauthenticatedError, match="session token"):
                UcxTransport(t.host, t.port, t.client_id, t.token, 5, tenant="bob")
    finally:
        srv.stop()


def test_message_groups_pack_small_blocks_and_keep_large_ones_alone():
    mib = 1 << 20
    assert wire.message_groups([], mib) == []
    assert wire.message_groups([mib, mib], mib) == [range(0, 1), range(1, 2)]
    assert wire.message_groups([mib // 4] * 6, mib) == [range(0, 4), range(4, 6)]
    assert wire.message_groups([100, 2 * mib, 100, 100], mib) == [range(0, 1), range(1, 2), range(2, 4)]
    assert wire.message_groups([100, 100, 100], 0) == [range(0, 1), range(1, 2), range(2, 3)]
    assert wire.contiguous([0, 10, 30], [10, 20, 5]) and not wire.contiguous([0, 11], [10, 5])


def test_keyed_get_of_blocks_only_on_ssd_stages_them_off_the_event_loop(tmp_path):
    """After a restart every block is in LMDB only: the keyed get pins them from a worker thread (the
    loop would otherwise stall every client while LMDB is read), byte-exact; once staged, on the loop."""
    srv = ServerProc(tmp_path / "data", flags={"host_memory": "64MiB", "ssd_capacity": "256MiB"}, env=UCX_SERVER_ENV)
    srv.start()
    try:
        blocks = random_blocks(6, 1 << 20, seed=7)
        with client_for(srv, "cold") as client:
            keys = client.block_keys(tokens(6, start=7_000_000))
            client.put(keys, blocks, durable=True)
        srv.stop()
        srv.start()

        def staged(client) -> int:
            return client.stats()["counters"].get("ucx_pins_staged_off_loop", 0)

        with client_for(srv, "cold") as client:
            outs = [np.zeros(1 << 20, np.uint8) for _ in blocks]
            client.get(keys, out=outs)
            assert client.last_transfer.control_rpcs == 0  # keyed: pinned inside the UCX request
            assert all(np.array_equal(a, b) for a, b in zip(outs, blocks))
            assert staged(client) == 1
            client.get(keys, out=outs)  # promoted by the first get: pinned on the loop
            assert staged(client) == 1
            eventually(lambda: client.stats()["pins_held"] == 0)
    finally:
        srv.stop()


def _forked_child(address: str, results) -> None:
    started = time.monotonic()
    try:
        with KVClient(address, make_fingerprint(), tenant="fork", transport="ucx"):
            results.put(("connected", 0.0))
    except Exception as err:
        results.put((type(err).__name__, time.monotonic() - started))
    with KVClient(address, make_fingerprint(), tenant="fork", transport="auto") as client:
        results.put((client.transport.name, 0.0))


def test_a_child_forked_after_ucx_started_is_refused_at_once_and_falls_back(ucx_server):
    with client_for(ucx_server, "fork"):
        ctx = mp.get_context("fork")
        results = ctx.Queue()
        child = ctx.Process(target=_forked_child, args=(ucx_server.address, results))
        child.start()
        refused, seconds = results.get(timeout=60)
        fallback, _ = results.get(timeout=60)
        child.join(30)
    assert refused == "UnavailableError" and seconds < 5  # not a 15 s connect timeout
    assert fallback in ("shm", "grpc")


class GpuLike:
    """Stands for a GPU array on a machine without one: what a transport looks at is __cuda_array_interface__."""

    __cuda_array_interface__ = {"shape": (16,), "typestr": "|u1", "data": (1 << 40, False), "version": 3}
    nbytes = 16


def test_gpu_buffers_are_refused_where_ucx_cannot_move_gpu_memory(ucx_server):
    """UCX without a CUDA transport would take a GPU address for host memory: the transport says it cannot move GPU
    memory, and a GPU buffer is refused with an error naming the fix before anything reaches UCX or the store."""
    with client_for(ucx_server, "no-cuda") as client:
        if client.transport.moves_device_memory:
            pytest.skip("this process's UCX moves GPU memory (a CUDA transport in UCX_TLS): tests/kvclient/test_transport_gpu.py")
        keys = client.block_keys(tokens(1, start=8_000_000))
        with pytest.raises(InvalidRequestError, match="UCX_TLS"):
            client.put(keys, [GpuLike()])
        assert client.lookup(keys) == 0
        assert client.put(keys, random_blocks(1, 16)) == [PutOutcome.STORED]
        with pytest.raises(InvalidRequestError, match="UCX_TLS"):
            client.get(keys, out=[GpuLike()])
        assert client.stats()["pins_held"] == 0
