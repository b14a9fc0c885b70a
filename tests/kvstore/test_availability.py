"""One caller cannot take the server down: abandoned or piled-up Waits, stalled, idle or garbled local-socket
connections. Each test holds the server the way a hostile or broken client would, then checks that everyone
else is still answered within seconds."""
from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvclient import KVClient
from kvclient.errors import ERROR_TYPE_METADATA
from kvwire.local_wire import IDLE_ERROR_TYPE, decode_response, encode_request, read_frame
from kvwire.types import BlockState, LeaseOutcome, PutOutcome
from kvstore.local_control import peer_hung_up
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.admin_util import ADMIN_TOKEN, auth_flags

pytestmark = pytest.mark.timeout(120)
FLAGS = {"host_memory": "16MiB", "ssd_capacity": "32MiB", "max_block_bytes": "1MiB"}
FOREVER_MS = 2**32 - 1  # the largest timeout a WaitRequest can carry


def md(token: str, client_id: str) -> tuple:
    return (("authorization", f"Bearer {token}"), ("kvstore-client-id", client_id))


ALICE, BOB, ADMIN = md("alice-secret", "alice-1"), md("bob-secret", "bob-1"), md(ADMIN_TOKEN, "ops-1")


def pending_key(stub, fingerprint_id: bytes, key: bytes, ttl_ms: int = 30_000) -> int:
    """A key whose write lease alice holds, so Waits on it block; returns the lease id."""
    lease = stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=fingerprint_id, keys=[key], ttl_ms=ttl_ms), metadata=ALICE, timeout=10).leases[0]
    assert lease.outcome == LeaseOutcome.GRANTED
    return lease.lease_id


def wait_request(fingerprint_id: bytes, key: bytes, timeout_ms: int = FOREVER_MS) -> pb.WaitRequest:
    return pb.WaitRequest(fingerprint_id=fingerprint_id, keys=[key], timeout_ms=timeout_ms)


def refused(future: grpc.Future) -> grpc.RpcError:
    err = future.exception(timeout=10)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert dict(err.trailing_metadata())[ERROR_TYPE_METADATA] == "CapacityExhaustedError"
    return err


# ---- Wait ------------------------------------------------------------------------


def test_abandoned_waits_leave_every_other_caller_answered(make_server, tmp_path, fingerprint):
    """40 Waits with the largest timeout, cancelled after 1 s: with 32 server threads, they must neither hold
    the threads (the servicer notices the caller left) nor be allowed to take them all (per-tenant cap)."""
    srv = make_server(**auth_flags(tmp_path, **FLAGS))
    key = b"\x01" * 16
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        lease_id = pending_key(stub, fingerprint.id, key)
        waits = [stub.Wait.future(wait_request(fingerprint.id, key), metadata=ALICE) for _ in range(40)]
        time.sleep(1)
        for w in waits:
            w.cancel()
    with grpc.insecure_channel(srv.address) as channel:
        started = time.monotonic()
        lookup = pb_grpc.KVStoreStub(channel).Lookup(pb.LookupRequest(fingerprint_id=fingerprint.id, keys=[key]), metadata=BOB, timeout=5)
        assert lookup.statuses[0].state == BlockState.MISSING  # bob's namespace: alice's pending key is not his
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        admin = apb_grpc.AdminStub(channel)
        assert lease_id in [e.id for e in admin.ListLeases(apb.ListLeasesRequest(tenant="alice"), metadata=ADMIN, timeout=5).leases]
        assert admin.RevokeLeases(apb.RevokeLeasesRequest(ids=[lease_id]), metadata=ADMIN, timeout=5).leases == 1
        assert time.monotonic() - started < 10


def test_waits_beyond_the_tenant_and_server_caps_are_refused_with_a_retry_hint(make_server, tmp_path, fingerprint):
    """max_waits_per_tenant per tenant, and half the server threads in all, whoever asks."""
    srv = make_server(**auth_flags(tmp_path, max_waits_per_tenant=2, grpc_workers=6, **FLAGS))  # 3 Waits in all
    key = b"\x02" * 16
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        pending_key(stub, fingerprint.id, key)
        bob_lease = stub.AcquireLeases(pb.AcquireLeasesRequest(fingerprint_id=fingerprint.id, keys=[key], ttl_ms=30_000), metadata=BOB, timeout=10)
        assert bob_lease.leases[0].outcome == LeaseOutcome.GRANTED  # bob's namespace: his own lease on the same digest
        held = [stub.Wait.future(wait_request(fingerprint.id, key), metadata=ALICE) for _ in range(2)]
        time.sleep(0.5)
        err = refused(stub.Wait.future(wait_request(fingerprint.id, key), metadata=ALICE, timeout=10))
        assert "retry" in err.details() and "bob" not in err.details()
        held.append(stub.Wait.future(wait_request(fingerprint.id, key), metadata=BOB))  # bob's first: the server's third
        time.sleep(0.5)
        err = refused(stub.Wait.future(wait_request(fingerprint.id, key), metadata=BOB, timeout=10))
        assert "retry" in err.details() and "alice" not in err.details()
        assert not any(w.done() for w in held)
        for w in held:
            w.cancel()
        time.sleep(1)  # the cancelled Waits give their places back (the servicer polls every 0.25 s)
        done = stub.Wait(wait_request(fingerprint.id, key, timeout_ms=100), metadata=ALICE, timeout=10)
        assert done.statuses[0].state == BlockState.PENDING  # served (its timeout ran out), not refused


def test_client_wait_polls_lookups_when_the_server_refuses_to_block(make_server, tmp_path, fingerprint):
    srv = make_server(**auth_flags(tmp_path, max_waits_per_tenant=1, **FLAGS))
    with KVClient(srv.address, fingerprint, token="alice-secret") as writer, KVClient(srv.address, fingerprint, token="alice-secret") as waiter:
        keys = writer.block_keys(list(range(32)))
        assert [l.outcome for l in writer.acquire(keys)] == [LeaseOutcome.GRANTED] * 2
        with grpc.insecure_channel(srv.address) as channel:  # alice's one Wait place, taken
            hog = pb_grpc.KVStoreStub(channel).Wait.future(pb.WaitRequest(fingerprint_id=fingerprint.id, keys=[keys[0].digest], timeout_ms=FOREVER_MS), metadata=ALICE)
            time.sleep(0.5)
            threading.Timer(0.5, lambda: writer.put(keys, [bytes(1024)] * 2)).start()
            started = time.monotonic()
            assert waiter.wait(keys, timeout_s=10) == [BlockState.PRESENT] * 2
            assert time.monotonic() - started < 5
            started = time.monotonic()  # nobody commits: the polling ends at the caller's timeout, as a Wait would
            other = writer.block_keys(list(range(100, 116)))
            assert writer.acquire(other)[0].outcome == LeaseOutcome.GRANTED
            assert waiter.wait(other, timeout_s=1) == [BlockState.PENDING]
            assert 0.9 < time.monotonic() - started < 4
            hog.cancel()


def test_a_local_socket_wait_ends_when_its_caller_hangs_up(make_server, tmp_path, fingerprint):
    """A local-socket Wait has no gRPC cancellation: the server notices the peer closed the connection."""
    srv = make_server(**auth_flags(tmp_path, max_waits_per_tenant=1, **FLAGS))
    key = b"\x03" * 16
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        pending_key(stub, fingerprint.id, key)
        path = stub.DataPlane(pb.DataPlaneRequest(), metadata=ALICE, timeout=10).local_control_socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(encode_request("/kvstore.v1.KVStore/Wait", None, ALICE, wait_request(fingerprint.id, key).SerializeToString()))
            time.sleep(0.5)
            refused(stub.Wait.future(wait_request(fingerprint.id, key), metadata=ALICE, timeout=10))  # the socket's Wait holds alice's place
        deadline = time.monotonic() + 3  # hung up: the place is free again within a poll or two
        while True:
            answer = stub.Wait.future(wait_request(fingerprint.id, key, timeout_ms=100), metadata=ALICE, timeout=10)
            if answer.exception(timeout=10) is None:
                break
            assert time.monotonic() < deadline, "the abandoned local-socket Wait still holds its place"
            time.sleep(0.1)
        assert answer.result().statuses[0].state == BlockState.PENDING


# ---- local control socket --------------------------------------------------------


def local_path(srv) -> str:
    with grpc.insecure_channel(srv.address) as channel:
        return pb_grpc.KVStoreStub(channel).DataPlane(pb.DataPlaneRequest(), metadata=ALICE, timeout=10).local_control_socket


def closed_within(sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the server closed sock (reading and dropping whatever it said first)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    while sock.recv(4096):
        pass
    return time.monotonic() - started


def test_a_half_sent_frame_is_dropped_after_the_read_timeout(make_server, tmp_path):
    srv = make_server(**auth_flags(tmp_path, local_control_read_s=0.5, **FLAGS))
    frame = encode_request("/kvstore.v1.KVStore/Stats", 5.0, ALICE, b"")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(local_path(srv))
        sock.sendall(frame[: len(frame) // 2])
        assert closed_within(sock, 5) < 3
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a header cut short is a started frame too
        sock.connect(local_path(srv))
        sock.sendall(frame[:2])
        assert closed_within(sock, 5) < 3


def test_an_idle_connection_is_closed_and_a_client_reconnects_without_noticing(make_server, tmp_path, fingerprint):
    srv = make_server(**auth_flags(tmp_path, local_control_idle_s=0.5, **FLAGS))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(local_path(srv))
        sock.sendall(encode_request("/kvstore.v1.KVStore/Lookup", 5.0, ALICE, pb.LookupRequest(fingerprint_id=fingerprint.id).SerializeToString()))
        sock.settimeout(5)
        assert decode_response(read_frame(sock)).code == grpc.StatusCode.OK
        started = time.monotonic()
        notice = decode_response(read_frame(sock))  # why, before the close: a request sent meanwhile was not read
        assert notice.code == grpc.StatusCode.UNAVAILABLE and dict(notice.trailing_metadata)[ERROR_TYPE_METADATA] == IDLE_ERROR_TYPE
        assert read_frame(sock) is None
        assert 0.3 < time.monotonic() - started < 3
    with KVClient(srv.address, fingerprint, token="alice-secret") as client:
        assert client.stats()["client"]["control"] == "local"  # and stays so: the socket's stub never falls back on its own
        keys = client.block_keys(list(range(64)))
        for rounds in range(3):
            assert client.put(keys[rounds : rounds + 1], [bytes(1000)]) == [PutOutcome.STORED]
            assert client.lookup(keys) == rounds + 1
            time.sleep(0.8)  # outlasts the idle timeout: the server closes every pooled connection
            pooled = list(client.control._pool._idle)
            assert pooled and all(peer_hung_up(conn) for conn in pooled)
        assert client.lookup(keys) == 3


def raw_local_call(path: str, method: str, payload: bytes, body: bytes | None = None):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        frame = encode_request(method, 5.0, ALICE, payload)
        if body is not None:  # a frame whose body is not a request at all
            frame = len(body).to_bytes(4, "little") + body
        sock.sendall(frame)
        return decode_response(read_frame(sock))


def test_undecodable_requests_are_invalid_argument_and_log_no_traceback(make_server, tmp_path, fingerprint):
    srv = make_server(**auth_flags(tmp_path, **FLAGS))
    path = local_path(srv)
    for _ in range(5):
        bad = raw_local_call(path, "/kvstore.v1.KVStore/Lookup", b"\xff\xff\xff")
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.details.startswith("cannot decode Lookup request: ")
        assert dict(bad.trailing_metadata)[ERROR_TYPE_METADATA] == "InvalidRequestError"
        bad = raw_local_call(path, "", b"", body=b"\x07")
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.details.startswith("cannot decode request: ")
    lookup = pb.LookupRequest(fingerprint_id=fingerprint.id).SerializeToString()
    assert raw_local_call(path, "/kvstore.v1.KVStore/Lookup", lookup).code == grpc.StatusCode.OK
    assert "Traceback" not in srv.log() and "cannot decode" not in srv.log()
