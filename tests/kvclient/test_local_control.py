"""KVClient's control calls over the server's local socket: used when it can be, the same answers and errors as
gRPC, auth, server restarts, opt-outs that say why, threads, forked and spawned processes."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvclient import KVClient
from kvclient.control import ClientIdentity, GrpcControl
from kvclient.errors import FingerprintMismatchError, InvalidRequestError, KVStoreError, TimeoutError_, UnavailableError
from kvclient.local_control import MAX_IDLE_CONNECTIONS, LocalControl
from kvwire.types import PutOutcome
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import eventually, random_blocks, tokens
from tests.kvstore.admin_util import auth_flags
from tests.kvstore.test_metrics import scrape
from tests.serverproc import free_port

pytestmark = pytest.mark.timeout(120)
FLAGS = {"host_memory": "64MiB", "ssd_capacity": "128MiB", "max_block_bytes": "1MiB"}
BLOCK = 16 << 10


def local_calls(port: int) -> float:
    return sum(v for (name, _), v in scrape(port).items() if name == "kvstore_local_control_requests_total")


def status_of(call) -> tuple[str, str, str]:
    """A failed call's status, details and error type, as KVClient sees them."""
    with pytest.raises(KVStoreError) as err:
        call()
    return err.value.status, str(err.value), type(err.value).__name__


def channels(srv, socket_path: str, metadata) -> tuple[GrpcControl, LocalControl]:
    """The two control channels of one caller (metadata), side by side."""
    over_grpc = GrpcControl(srv.address, metadata, timeout_s=10)
    return over_grpc, LocalControl(socket_path, metadata, over_grpc, timeout_s=10)


def test_same_host_client_uses_the_socket_with_results_identical_to_grpc(make_server, fingerprint):
    port = free_port()
    srv = make_server(metrics_port=port, **FLAGS)
    with KVClient(srv.address, fingerprint, tenant="same") as local, KVClient(srv.address, fingerprint, tenant="same", local_control=False) as remote:
        assert local.stats()["client"]["control"] == "local" and local.stats()["client"]["control_fallback"] == ""
        assert local.transport.name == remote.transport.name == "shm"
        keys, blocks = local.block_keys(tokens(8)), random_blocks(8, BLOCK)
        before = local_calls(port)
        assert local.put(keys[:4], blocks[:4]) == [PutOutcome.STORED] * 4
        assert remote.put(keys[4:], blocks[4:]) == [PutOutcome.STORED] * 4
        assert local.lookup(keys) == remote.lookup(keys) == 8
        assert local.status(keys + local.block_keys(tokens(9))[-1:]) == remote.status(keys + remote.block_keys(tokens(9))[-1:])
        for client in (local, remote):
            assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks))
        pins = [c.pin(keys) for c in (local, remote)]
        assert [s[:3] + s[4:5] for s in pins[0].slots] == [s[:3] + s[4:5] for s in pins[1].slots]  # same slots and checksums; pin ids and expiries differ
        for pinned in pins:
            pinned.release()
        # put: Reserve + Commit; lookup: 1; status: 1; get: Pin; pin: 1 -> 6 calls went local, none of remote's did
        assert local_calls(port) - before == 6


def test_errors_are_the_same_status_and_message_as_over_grpc(server, fingerprint):
    other = make_fingerprint(dtype="bfloat16")
    with KVClient(server.address, fingerprint, tenant="errs") as local, KVClient(server.address, other, tenant="errs") as wrong_fp:
        assert local.stats()["client"]["control"] == "local"
        keys = local.block_keys(tokens(2, start=7_000))
        local.put(keys, random_blocks(2, BLOCK))
        grpc_channel, local_channel = channels(server, local.control.socket_path, ClientIdentity(local.client_id, "errs").metadata())
        calls = {
            "Lookup": lambda ch: ch.lookup(local.fingerprint_id, [b"short"]),  # malformed key length
            "Pin": lambda ch: ch.pin(other.id, [k.digest for k in keys]),  # stored under another fingerprint
            "Commit": lambda ch: ch.commit(local.fingerprint_id, [123456789], [0]),  # unknown lease
            "Reserve": lambda ch: ch.reserve(b"\1" * 3, [], []),
        }
        for name, call in calls.items():
            over_grpc = status_of(lambda: call(grpc_channel))
            over_local = status_of(lambda: call(local_channel))
            assert over_local == over_grpc, name
        local_channel.close()
        grpc_channel.close()
        # and through the client API, as typed exceptions
        with pytest.raises(FingerprintMismatchError, match="fingerprint"):
            wrong_fp.get(keys[:1])
        assert wrong_fp.stats()["client"]["control"] == "local"
        with pytest.raises(InvalidRequestError, match="key #0 must be 16 bytes"):
            local.lookup([b"short"])


def test_missing_or_wrong_token_is_refused_as_over_grpc(make_server, tmp_path, fingerprint):
    srv = make_server(**auth_flags(tmp_path, **FLAGS))
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice:
        assert alice.stats()["client"]["control"] == "local"
        keys = alice.block_keys(tokens(1))
        assert alice.put(keys, random_blocks(1, BLOCK)) == [PutOutcome.STORED]
        digests = [k.digest for k in keys]
        for md in ((), (("authorization", "Bearer not-a-token"),), (("authorization", "Bearer alice-secret"), ("kvstore-tenant", "bob"))):
            grpc_channel, local_channel = channels(srv, alice.control.socket_path, md)
            over_grpc = status_of(lambda: grpc_channel.lookup(alice.fingerprint_id, digests))
            over_local = status_of(lambda: local_channel.lookup(alice.fingerprint_id, digests))
            assert over_local == over_grpc and over_grpc[0] in ("UNAUTHENTICATED", "PERMISSION_DENIED")
            local_channel.close()
            grpc_channel.close()
    # A client whose token is refused never gets as far as the socket: the DataPlane call over gRPC fails first.
    with KVClient(srv.address, fingerprint, token="not-a-token") as stranger:
        choice = stranger.transport_choice.as_dict()  # stats() itself would be refused
        assert choice["control"] == "grpc" and choice["control_fallback"] == "server did not describe its data plane"
        assert "UnauthenticatedError" in " ".join(choice["transport_fallbacks"])


def test_server_restart_reconnects_or_is_unavailable_never_hangs(make_server, fingerprint):
    srv = make_server(**FLAGS)
    with KVClient(srv.address, fingerprint, tenant="restart", timeout_s=5) as client:
        keys = client.block_keys(tokens(2))
        client.put(keys, random_blocks(2, BLOCK), durable=True)
        assert client.lookup(keys) == 2  # leaves an idle pooled connection to the old server
        srv.restart()
        t0 = time.monotonic()
        try:
            assert client.lookup(keys) == 2  # the blocks were durable
        except UnavailableError:
            pass
        assert time.monotonic() - t0 < 5
        assert client.lookup(keys) == 2
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="local control socket"):
            client.lookup(keys)
        assert time.monotonic() - t0 < 5
        srv.start()
        assert client.lookup(keys) == 2


def test_a_stopped_server_is_a_deadline_not_a_hang(make_server, fingerprint):
    srv = make_server(**FLAGS)
    with KVClient(srv.address, fingerprint, tenant="stall", timeout_s=1) as client:
        keys = client.block_keys(tokens(1))
        client.lookup(keys)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            eventually(lambda: Path(f"/proc/{srv.proc.pid}/stat").read_text().split()[2] == "T")  # stopping is not instant
            t0 = time.monotonic()
            with pytest.raises(TimeoutError_):
                client.lookup(keys)
            assert time.monotonic() - t0 < 3
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert client.lookup(keys) == 0  # the timed-out connection was dropped, not reused out of step


@pytest.mark.parametrize(
    "client_kwargs, server_flags, reason",
    [
        ({"local_control": False}, {}, "turned off by the client"),
        ({}, {"local_control": False}, "server advertises no local control socket"),
        ({"transport": "grpc"}, {}, "transport 'grpc' keeps every call on gRPC"),
    ],
)
def test_opt_outs_fall_back_to_grpc_and_say_why(make_server, fingerprint, client_kwargs, server_flags, reason):
    port = free_port()
    srv = make_server(metrics_port=port, **FLAGS, **server_flags)
    with KVClient(srv.address, fingerprint, tenant="optout", **client_kwargs) as client:
        choice = client.stats()["client"]
        assert choice["control"] == "grpc" and reason in choice["control_fallback"]
        assert not isinstance(client.control, LocalControl)
        keys = client.block_keys(tokens(3))
        assert client.put(keys, random_blocks(3, BLOCK)) == [PutOutcome.STORED] * 3
        assert client.lookup(keys) == 3 and len(client.get(keys)) == 3
    assert local_calls(port) == 0


def test_many_threads_share_one_client(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="threads") as client:
        assert client.stats()["client"]["control"] == "local"
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                keys = client.block_keys(tokens(4, start=100_000 * (i + 1)))
                blocks = random_blocks(4, BLOCK, seed=i)
                client.put(keys, blocks)
                for _ in range(50):
                    assert client.lookup(keys) == 4
                    assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks))
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        # a connection per call in flight, reused; after the burst only a few stay open (a server thread each)
        assert 1 <= len(client.control._pool._idle) <= MAX_IDLE_CONNECTIONS


def test_forked_child_opens_its_own_connections(server, fingerprint):
    with KVClient(server.address, fingerprint, tenant="fork") as client:
        keys = client.block_keys(tokens(4, start=900_000))
        blocks = random_blocks(2, BLOCK)
        client.put(keys[:2], blocks)
        assert client.lookup(keys) == 2  # the parent now has a pooled connection the child inherits
        # ...and, after gets over shm, the read-ahead helper and unpin threads that do not exist in a child
        client.transport.early_copies = True
        assert all((got == want).all() for got, want in zip(client.get(keys[:2]), blocks))
        early = [np.empty(BLOCK, dtype=np.uint8) for _ in blocks]  # copied from the slots remembered by the get above
        assert all((got == want).all() for got, want in zip(client.get(keys[:2], out=early), blocks))
        assert client.transport._helper is not None
        inherited = list(client.control._pool._idle)
        pid = os.fork()
        if pid == 0:  # no pytest here: report through the exit status, and never run the parent's teardown
            code = 1
            try:
                ok = client.lookup(keys) == 2 and client.put(keys[2:], random_blocks(2, BLOCK, seed=5)) == [PutOutcome.STORED] * 2
                ok = ok and client.lookup(keys) == 4 and not set(client.control._pool._idle) & set(inherited)
                outs = [np.empty(BLOCK, dtype=np.uint8) for _ in blocks]  # the early copy from remembered slots, too
                for got in (client.get(keys[:2]), client.get(keys[:2], out=outs)):
                    ok = ok and all((g == w).all() for g, w in zip(got, blocks))
                code = 0 if ok else 2
            finally:
                os._exit(code)
        for _ in range(20):  # the parent keeps using its connections meanwhile
            assert client.lookup(keys[:2]) == 2
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # a hung child must not hang the suite too
                os.waitpid(pid, 0)
                pytest.fail("forked child hung")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert client.lookup(keys) == 4


def _spawned_client(address: str, results) -> None:
    with KVClient(address, make_fingerprint(), tenant="spawn") as client:
        keys = client.block_keys(tokens(2, start=950_000))
        client.put(keys, random_blocks(2, BLOCK))
        results.put((client.stats()["client"]["control"], client.lookup(keys)))


def test_spawned_process_uses_the_socket(server):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_spawned_client, args=(server.address, results))
    proc.start()
    try:
        assert results.get(timeout=60) == ("local", 2)
    finally:
        proc.join(30)
    assert proc.exitcode == 0
