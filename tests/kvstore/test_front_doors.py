"""The three front doors answer the same bad request alike: gRPC, the local control socket and UCX give the same
status, error type and detail, each through its own one error table over the one request layer."""
from __future__ import annotations

import socket
import time

import grpc
import numpy as np
import pytest
import xxhash

from kvwire import ucx_wire as wire
from kvwire.errors import ERROR_TYPE_METADATA, ERROR_TYPES
from kvwire.local_wire import decode_response, encode_request, read_frame
from kvwire.ucxenv import Endpoint, Worker
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvclient.transport_util import HAVE_UCX, UCX_SERVER_ENV
from tests.kvstore.admin_util import auth_flags
from tests.serverproc import ServerProc

pytestmark = pytest.mark.timeout(120)

FP = b"f" * 16
STORED = b"s" * 16
DATA = bytes(range(256)) * 16
CLIENT_ID = "doors-1"

Answer = tuple[str, str, str]  # status, error type, detail


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    """A server with every door open, one block of alice's stored, and alice's session on the UCX door."""
    tmp = tmp_path_factory.mktemp("doors")
    srv = ServerProc(tmp / "data", flags=auth_flags(tmp, host_memory="16MiB", ssd_capacity="32MiB", persist_on_shutdown=False),
                     env=UCX_SERVER_ENV).start()
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        put = pb.PutRequest(fingerprint_id=FP, blocks=[pb.InlineBlock(key=STORED, data=DATA, checksum=xxhash.xxh3_64_intdigest(DATA))])
        stub.Put(put, metadata=metadata("alice-secret"), timeout=10)
        plane = stub.DataPlane(pb.DataPlaneRequest(), metadata=metadata("alice-secret"), timeout=10)
    yield srv, plane
    srv.stop()


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("kvstore-client-id", CLIENT_ID))


def over_grpc(srv: ServerProc, method: str, request, token: str) -> Answer:
    with grpc.insecure_channel(srv.address) as channel:
        call = getattr(pb_grpc.KVStoreStub(channel), method)
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=metadata(token), timeout=10)
    error_type = dict(err.value.trailing_metadata() or ()).get(ERROR_TYPE_METADATA, "")
    return err.value.code().name, error_type, err.value.details()


def over_socket(path: str, method: str, request, token: str) -> Answer:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(encode_request(f"/kvstore.v1.KVStore/{method}", 10.0, metadata(token), request.SerializeToString()))
        answer = decode_response(read_frame(sock))
    return answer.code.name, dict(answer.trailing_metadata).get(ERROR_TYPE_METADATA, ""), answer.details


def over_ucx(plane: pb.DataPlaneResponse, fingerprint_id: bytes, keys: list[bytes], token: bytes | None = None) -> Answer:
    """A keyed get (OP_GET_KEYS) of keys on a session opened with token; the refusal, from the hello or the get."""
    host, port = plane.ucx_listener.rsplit(":", 1)
    worker = Worker.get()
    with worker.lock:
        deadline = time.monotonic() + 15
        ep = Endpoint(worker, host, int(port), deadline)
        try:
            ident, tenant, token = CLIENT_ID.encode(), plane.ucx_session_tenant.encode(), token or plane.ucx_session_token
            hello = wire.empty_header()
            worker.wait([ep.send(wire.header(wire.OP_HELLO, len(ident), len(token), len(tenant))),
                         ep.send(np.frombuffer(ident + token + tenant, dtype=np.uint8)), ep.recv(hello)], deadline)
            if int(hello[0]) != wire.STATUS_OK:
                return _ucx_detail(worker, ep, int(hello[1]), deadline)
            body = fingerprint_id + b"".join(keys)
            head = np.array([wire.OP_GET_KEYS, len(keys), 0, len(body)] + [len(DATA)] * len(keys) + [len(k) for k in keys], dtype=np.uint64)
            reply = np.zeros(wire.HEADER_WORDS + len(keys), dtype=np.uint64)
            worker.wait([ep.send(np.frombuffer(head.tobytes() + body, dtype=np.uint8)), ep.recv(reply)], deadline)
            assert int(reply[0]) == wire.STATUS_ERROR, "the keyed get was served"
            return _ucx_detail(worker, ep, int(reply[3]), deadline)
        finally:
            ep.abort()


def _ucx_detail(worker: Worker, ep: Endpoint, length: int, deadline: float) -> Answer:
    detail = np.empty(length, dtype=np.uint8)
    worker.wait([ep.recv(detail)], deadline)
    type_name, _, text = detail.tobytes().decode().partition(": ")
    return ERROR_TYPES[type_name].status, type_name, text


def test_a_missing_block(doors):
    srv, plane = doors
    missing = b"m" * 16
    pin = pb.PinRequest(fingerprint_id=FP, keys=[missing])
    expected = ("NOT_FOUND", "BlockNotFoundError", f"1 of 1 blocks not found: {missing.hex()}")
    assert over_grpc(srv, "Pin", pin, "alice-secret") == expected
    assert over_socket(plane.local_control_socket, "Pin", pin, "alice-secret") == expected
    if HAVE_UCX:
        assert over_ucx(plane, FP, [missing]) == expected


def test_another_tenants_block_is_missing_too(doors):
    srv, plane = doors
    pin = pb.PinRequest(fingerprint_id=FP, keys=[STORED])
    expected = ("NOT_FOUND", "BlockNotFoundError", f"1 of 1 blocks not found: {STORED.hex()}")
    assert over_grpc(srv, "Pin", pin, "bob-secret") == expected
    assert over_socket(plane.local_control_socket, "Pin", pin, "bob-secret") == expected


def test_a_malformed_fingerprint(doors):
    srv, plane = doors
    pin = pb.PinRequest(fingerprint_id=b"\1" * 3, keys=[STORED])
    expected = ("INVALID_ARGUMENT", "InvalidRequestError", "fingerprint_id must be 16 bytes, got 3")
    assert over_grpc(srv, "Pin", pin, "alice-secret") == expected
    assert over_socket(plane.local_control_socket, "Pin", pin, "alice-secret") == expected
    if HAVE_UCX:
        assert over_ucx(plane, b"\1" * 3, [STORED]) == expected


def test_a_block_stored_under_another_fingerprint(doors):
    srv, plane = doors
    other = b"g" * 16
    pin = pb.PinRequest(fingerprint_id=other, keys=[STORED])
    answers = [over_grpc(srv, "Pin", pin, "alice-secret"), over_socket(plane.local_control_socket, "Pin", pin, "alice-secret")]
    if HAVE_UCX:
        answers.append(over_ucx(plane, other, [STORED]))
    assert answers[0][:2] == ("FAILED_PRECONDITION", "FingerprintMismatchError")
    assert all(a == answers[0] for a in answers)


def test_a_caller_who_cannot_prove_who_it_is(doors):
    srv, plane = doors
    lookup = pb.LookupRequest(fingerprint_id=FP, keys=[STORED])
    expected = ("UNAUTHENTICATED", "UnauthenticatedError", "the bearer token is not valid for this server")
    assert over_grpc(srv, "Lookup", lookup, "mallory") == expected
    assert over_socket(plane.local_control_socket, "Lookup", lookup, "mallory") == expected
    if HAVE_UCX:  # UCX proves it with the session token the DataPlane call handed out, not a bearer token
        status, error_type, _ = over_ucx(plane, FP, [STORED], token=b"\0" * 32)
        assert (status, error_type) == expected[:2]
