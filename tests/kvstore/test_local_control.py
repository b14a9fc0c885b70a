"""The server's local control socket: where it lives, who may use it, what it serves, what it counts, and its lifecycle."""
from __future__ import annotations

import os
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from tests.kvclient.local_stub import LocalControlStub, LocalRpcError
from kvwire.local_wire import decode_response, encode_request, read_frame
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.test_metrics import scrape
from tests.serverproc import ServerProc, free_port

pytestmark = pytest.mark.timeout(90)
FLAGS = {"host_memory": "16MiB", "ssd_capacity": "32MiB", "max_block_bytes": "1MiB"}
MD = (("kvstore-client-id", "test-local"), ("kvstore-tenant", "local"))


def advertised(srv: ServerProc) -> str:
    with grpc.insecure_channel(srv.address) as channel:
        return pb_grpc.KVStoreStub(channel).DataPlane(pb.DataPlaneRequest(), metadata=MD, timeout=10).local_control_socket


def raw_call(path: str, method: str, payload: bytes = b"") -> grpc.StatusCode:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(encode_request(method, 5.0, MD, payload))
        return decode_response(read_frame(sock)).code


def test_socket_in_data_dir_mode_0600_advertised_and_removed_at_stop(make_server, tmp_path):
    srv = make_server(**FLAGS)
    path = advertised(srv)
    assert path == str((tmp_path / "data" / "control.sock").absolute())
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    srv.stop()
    assert not os.path.exists(path)


def test_off_by_config_advertises_nothing(make_server, tmp_path):
    srv = make_server(local_control=False, **FLAGS)
    assert advertised(srv) == ""
    assert not (tmp_path / "data" / "control.sock").exists()


def test_configured_path_and_a_live_servers_socket_is_left_alone(make_server, tmp_path):
    path = tmp_path / "ctl.sock"
    first = make_server("one", local_control_socket=path, **FLAGS)
    assert advertised(first) == str(path)
    # A second server pointed at the same path must not steal the first one's socket: it runs without one.
    second = make_server("two", local_control_socket=path, **FLAGS)
    assert advertised(second) == ""
    assert "another server is listening" in second.log()
    assert raw_call(str(path), "/kvstore.v1.KVStore/Stats") == grpc.StatusCode.OK


def test_socket_left_by_a_killed_server_is_replaced(make_server):
    srv = make_server(**FLAGS)
    path = advertised(srv)
    srv.stop(signal.SIGKILL)
    assert os.path.exists(path)  # nobody removed it
    srv.start()
    assert advertised(srv) == path
    assert raw_call(path, "/kvstore.v1.KVStore/Stats") == grpc.StatusCode.OK


def test_only_unary_kvstore_methods_are_served(make_server):
    srv = make_server(**FLAGS)
    path = advertised(srv)
    get = pb.GetRequest(fingerprint_id=b"\0" * 16, keys=[b"\0" * 16]).SerializeToString()
    assert raw_call(path, "/kvstore.v1.KVStore/Get", get) == grpc.StatusCode.UNIMPLEMENTED  # server-streaming
    assert raw_call(path, "/kvstore.v1.KVStore/Write") == grpc.StatusCode.UNIMPLEMENTED  # client-streaming
    assert raw_call(path, "/kvstore.v1.Admin/Stats") == grpc.StatusCode.UNIMPLEMENTED
    assert raw_call(path, "/kvstore.v1.KVStore/Nope") == grpc.StatusCode.UNIMPLEMENTED
    assert raw_call(path, "/kvstore.v1.KVStore/Lookup", b"\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT  # not a LookupRequest
    assert raw_call(path, "/kvstore.v1.KVStore/Stats") == grpc.StatusCode.OK  # the connection-per-call above left it serving


def test_local_calls_are_counted_with_the_grpc_request_metrics(make_server):
    port = free_port()
    srv = make_server(metrics_port=port, **FLAGS)
    stub = LocalControlStub(advertised(srv), None)
    try:
        for _ in range(3):
            stub.Lookup(pb.LookupRequest(fingerprint_id=b"f" * 16, keys=[b"k" * 16]), metadata=MD, timeout=10)
        with pytest.raises(LocalRpcError) as err:
            stub.Lookup(pb.LookupRequest(fingerprint_id=b"short"), metadata=MD, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stub.close()
    m = scrape(port)
    rpc = {"service": "kvstore.v1.KVStore", "method": "Lookup"}
    assert m[("kvstore_local_control_requests_total", frozenset({"method": "Lookup", "code": "OK"}.items()))] == 3
    assert m[("kvstore_local_control_requests_total", frozenset({"method": "Lookup", "code": "INVALID_ARGUMENT"}.items()))] == 1
    # The same series as gRPC calls: dashboards of request rate, errors and latency see every call.
    assert m[("kvstore_grpc_requests_total", frozenset({**rpc, "code": "OK"}.items()))] == 3
    assert m[("kvstore_grpc_requests_total", frozenset({**rpc, "code": "INVALID_ARGUMENT"}.items()))] == 1
    assert m[("kvstore_grpc_request_duration_seconds_count", frozenset(rpc.items()))] == 4
    assert m[("kvstore_request_errors_total", frozenset({"code": "invalid_argument"}.items()))] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
def test_peer_of_another_uid_is_refused(make_server):
    # The socket's mode keeps other users out; open it up here so the SO_PEERCRED check is what refuses.
    public = Path(tempfile.mkdtemp(prefix="kvs-"))
    try:
        public.chmod(0o755)
        srv = make_server(local_control_socket=public / "ctl.sock", **FLAGS)
        path = advertised(srv)
        os.chmod(path, 0o666)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody, then call
            code = 255
            try:
                os.setgid(65534)
                os.setuid(65534)
                code = raw_call(path, "/kvstore.v1.KVStore/Stats").value[0]
            finally:
                os.write(write, bytes([code]))
                os._exit(0)
        os.close(write)
        got = os.read(read, 1)
        os.waitpid(pid, 0)
        assert got == bytes([grpc.StatusCode.PERMISSION_DENIED.value[0]])
        assert "refused pid" in srv.log()
        assert raw_call(path, "/kvstore.v1.KVStore/Stats") == grpc.StatusCode.OK  # our own uid still gets in
    finally:
        for child in public.iterdir():
            child.unlink()
        public.rmdir()


def test_connections_beyond_the_limit_are_turned_away_and_their_calls_go_over_grpc(make_server):
    port = free_port()
    srv = make_server(metrics_port=port, local_control_max_connections=1, **FLAGS)
    path = advertised(srv)
    lookup = pb.LookupRequest(fingerprint_id=b"f" * 16, keys=[b"k" * 16])

    def local_lookups() -> float:
        return scrape(port).get(("kvstore_local_control_requests_total", frozenset({"method": "Lookup", "code": "OK"}.items())), 0)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.connect(path)  # takes the one connection the server serves
        holder.sendall(encode_request("/kvstore.v1.KVStore/Lookup", 5.0, MD, lookup.SerializeToString()))
        assert decode_response(read_frame(holder)).code == grpc.StatusCode.OK
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(10)
            extra.connect(path)
            extra.sendall(encode_request("/kvstore.v1.KVStore/Lookup", 5.0, MD, lookup.SerializeToString()))
            turned_away = decode_response(read_frame(extra))
            assert turned_away.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 1 connections" in turned_away.details
            assert read_frame(extra) is None  # and closed
        with grpc.insecure_channel(srv.address) as channel:
            stub = LocalControlStub(path, pb_grpc.KVStoreStub(channel))
            try:
                assert len(stub.Lookup(lookup, metadata=MD, timeout=10).statuses) == 1  # answered, over gRPC
                assert local_lookups() == 1  # only the holder's
            finally:
                stub.close()
    with grpc.insecure_channel(srv.address) as channel:  # the holder gone, calls go local again
        stub = LocalControlStub(path, pb_grpc.KVStoreStub(channel))
        try:
            deadline = time.monotonic() + 10
            while local_lookups() < 2:
                assert time.monotonic() < deadline, "calls never went local again"
                stub.Lookup(lookup, metadata=MD, timeout=10)
                time.sleep(0.05)
        finally:
            stub.close()


def test_limit_must_allow_a_connection(make_server):
    with pytest.raises(RuntimeError, match="local_control_max_connections must be at least 1"):
        make_server(local_control_max_connections=0, **FLAGS)


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("busy_poll_us", [0, 50_000])
def test_busy_poll_keeps_the_reader_polling_between_calls_and_answers_alike(make_server, busy_poll_us):
    """With local_control_busy_poll_us a connection thread polls for its next call instead of blocking: calls
    30 ms apart keep it spending CPU between them (off: next to none), and every call is answered as before."""
    srv = make_server(local_control_busy_poll_us=busy_poll_us, **FLAGS)
    path = advertised(srv)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(encode_request("/kvstore.v1.KVStore/Lookup", 5.0, MD, pb.LookupRequest().SerializeToString()))
        assert decode_response(read_frame(sock)).code is not None  # connected, thread started
        before = _cpu_s(srv.proc.pid)
        for _ in range(10):
            time.sleep(0.03)
            sock.sendall(encode_request("/kvstore.v1.KVStore/Stats", 5.0, MD, b""))
            assert decode_response(read_frame(sock)).code in (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED)
        spent = _cpu_s(srv.proc.pid) - before
    if busy_poll_us:
        assert spent > 0.08, f"the connection thread spent {spent:.3f} s of 0.3 s polling"
    else:
        assert spent < 0.08, f"{spent:.3f} s of CPU for ten idle-spaced calls without polling"
