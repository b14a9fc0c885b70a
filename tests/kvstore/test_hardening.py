"""The server process's outer shell against a hostile local user or client (issue 11): file modes,
/metrics behind the admin token, a bounded SIGTERM that still flushes, and tenant/client names
bounded where they enter."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import InvalidRequestError, from_rpc_error
from tests.kvclient.local_stub import LocalControlStub
from kvwire.types import PutOutcome
from kvstore.store import checksum
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.admin_util import ADMIN_TOKEN, auth_flags, patterned_blocks
from tests.serverproc import ServerProc, free_port

BLOCK = 4096
SMALL = dict(host_memory="32MiB", ssd_capacity="64MiB", max_block_bytes="1MiB", ucx=False)


def modes(root) -> dict[str, int]:
    """Permission bits of root and of everything under it, by path relative to root."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def store_something(srv: ServerProc, fingerprint) -> None:
    """Blocks demoted to the ssd tier (LMDB's files) by an admin action (the audit log)."""
    with KVClient(srv.address, fingerprint, transport="grpc") as client:
        keys = client.block_keys(list(range(32)))
        assert client.put(keys, patterned_blocks(2, BLOCK, 1)) == [PutOutcome.STORED] * 2
    with grpc.insecure_channel(srv.address) as channel:
        evicted = apb_grpc.AdminStub(channel).Evict(apb.EvictRequest(watermark=0.0001, tier=pb.TIER_HOST), timeout=10)
    assert evicted.demoted == 2


def assert_owner_only(root) -> None:
    found = modes(root)
    for name in (".", "ssd", "ssd/data.mdb", "ssd/lock.mdb", "audit.log"):
        assert name in found, f"{name} missing from {sorted(found)}"
    loose = {name: oct(mode) for name, mode in found.items() if mode & 0o077}
    assert not loose, f"readable or writable by others: {loose}"
    assert found["."] == found["ssd"] == 0o700
    assert found["ssd/data.mdb"] == found["ssd/lock.mdb"] == found["audit.log"] == 0o600


# ---- 4: files readable by any local user -----------------------------------------------


def test_new_data_dir_is_owner_only(make_server, fingerprint):
    old = os.umask(0o022)  # the umask a server is typically started under
    try:
        srv = make_server(**SMALL)
    finally:
        os.umask(old)
    store_something(srv, fingerprint)
    assert_owner_only(srv.data_dir)


def test_an_older_data_dir_is_tightened_at_start(make_server, fingerprint):
    srv = make_server(**SMALL)
    store_something(srv, fingerprint)
    srv.stop()
    # What an older version left: world-readable directories and files.
    for path in (srv.data_dir, srv.data_dir / "ssd"):
        os.chmod(path, 0o755)
    for path in (srv.data_dir / "ssd" / "data.mdb", srv.data_dir / "ssd" / "lock.mdb", srv.data_dir / "audit.log"):
        os.chmod(path, 0o644)
    srv.start()
    assert_owner_only(srv.data_dir)
    with KVClient(srv.address, fingerprint, transport="grpc") as client:  # and the blocks are still there
        assert client.contains(client.block_keys(list(range(32)))) == [True, True]


# ---- 5: /metrics needs the admin token ------------------------------------------------------


def http_get(port: int, token: str | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_metrics_need_an_admin_token(make_server, tmp_path):
    port = free_port()
    make_server(**auth_flags(tmp_path, metrics_port=port, **SMALL))
    status, headers, body = http_get(port)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer"), (status, headers)
    assert b"kvstore_blocks" not in body
    status, headers, _ = http_get(port, "not-a-token")
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    status, _, body = http_get(port, "alice-secret")  # a tenant's token: store-wide counts are not its business
    assert status == 403 and b"kvstore_blocks" not in body
    status, _, body = http_get(port, ADMIN_TOKEN)
    assert status == 200 and b"kvstore_blocks " in body


def test_metrics_stay_open_without_auth(make_server):
    port = free_port()
    make_server(metrics_port=port, **SMALL)
    status, _, body = http_get(port)
    assert status == 200 and b"kvstore_blocks " in body


# ---- 10: SIGTERM is bounded and still flushes ----------------------------------------------


def test_sigterm_with_malformed_write_streams_exits_and_flushes(make_server, fingerprint):
    grace_s = 1.0
    srv = make_server(shutdown_grace_s=grace_s, **SMALL)
    blocks = patterned_blocks(6, BLOCK, 7)
    with KVClient(srv.address, fingerprint, transport="grpc") as client:
        keys = client.block_keys(list(range(6 * 16)))
        assert client.put(keys, blocks) == [PutOutcome.STORED] * 6  # non-durable: only in the host tier
    metadata = (("kvstore-client-id", "stuck-writer"),)
    hold = threading.Event()
    channel = grpc.insecure_channel(srv.address)
    write = channel.stream_unary("/kvstore.v1.KVStore/Write",
                                 request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                                 response_deserializer=pb.WriteSummary.FromString)
    reserved = pb_grpc.KVStoreStub(channel).Reserve(pb.ReserveRequest(
        fingerprint_id=fingerprint.id, blocks=[pb.BlockSpec(key=bytes([i]) * 16, size_bytes=BLOCK) for i in range(2)], ttl_ms=60_000),
        metadata=metadata, timeout=10).leases

    def stream(first):  # one chunk, then never half-closes
        yield first
        hold.wait()

    firsts = [b"\xff\xff\xff\xff"] * 3  # does not parse as a WriteChunk: grpc's own stop never completes after these
    firsts += [pb.WriteChunk(lease_id=(1 << 60) + i, data=b"x" * 16) for i in range(2)]  # a lease nobody holds
    firsts += [pb.WriteChunk(lease_id=lease.lease_id, data=b"x" * 16) for lease in reserved]  # a real one, never finished
    calls = [write.future(stream(first), metadata=metadata) for first in firsts]
    try:
        time.sleep(0.5)
        assert not any(call.done() for call in calls[-len(reserved):])  # still writing when SIGTERM comes
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            rc = srv.proc.wait(grace_s + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not end the server in {grace_s + 10} s:\n{srv.log()[-2000:]}")
        assert rc == 0, srv.log()[-2000:]
        assert time.monotonic() - started < grace_s + 10
    finally:
        hold.set()
        for call in calls:
            call.cancel()
        channel.close()
    srv.start()
    with KVClient(srv.address, fingerprint, transport="grpc") as client:
        got = client.get(keys)
    assert all(np.array_equal(a, b) for a, b in zip(got, blocks))


# ---- 18: tenant and client names bounded where they enter -------------------------------------


def local_put(srv: ServerProc, fingerprint, metadata, durable: bool = True) -> list[int]:
    stub = LocalControlStub(str(srv.data_dir / "control.sock"), None)
    data = b"n" * BLOCK
    request = pb.PutRequest(fingerprint_id=fingerprint.id, durable=durable,
                            blocks=[pb.InlineBlock(key=b"k" * 16, data=data, checksum=checksum(data))])
    try:
        return list(stub.Put(request, metadata=metadata, timeout=10).outcomes)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
    finally:
        stub.close()


@pytest.mark.parametrize("tenant, limit", [("t" * 70_000, "256 bytes"), ("t" * 257, "256 bytes"), ("a\nb", "control character"),
                                           ("", None)])
def test_tenant_names_are_bounded_over_the_local_socket(make_server, fingerprint, tenant, limit):
    srv = make_server(**SMALL)  # insecure_no_auth: the tenant is whatever the caller names
    metadata = (("kvstore-tenant", tenant), ("kvstore-client-id", "c1"))
    if limit is None:  # no name: the default tenant, as before
        assert local_put(srv, fingerprint, metadata) == [pb.PUT_STORED]
        return
    with pytest.raises(InvalidRequestError) as err:
        local_put(srv, fingerprint, metadata)
    assert limit in str(err.value) and "tttt" not in str(err.value)
    with pytest.raises(InvalidRequestError, match="256 bytes"):
        local_put(srv, fingerprint, (("kvstore-tenant", "ok"), ("kvstore-client-id", "c" * 70_000)))
    # Nothing was stored or pinned under the bad name, and the store still takes and flushes good puts.
    assert local_put(srv, fingerprint, (("kvstore-tenant", "t" * 256), ("kvstore-client-id", "c" * 256)), durable=False) == [pb.PUT_STORED]
    assert srv.stop() == 0, srv.log()[-2000:]
    srv.start()
    assert local_put(srv, fingerprint, (("kvstore-tenant", "t" * 256),)) == [pb.PUT_ALREADY_PRESENT]


def test_tenant_names_are_bounded_over_grpc(make_server, fingerprint):
    srv = make_server(**SMALL)
    with KVClient(srv.address, fingerprint, tenant="t" * 257, transport="grpc") as client:  # gRPC metadata is ASCII
        with pytest.raises(InvalidRequestError, match="256 bytes") as err:
            client.lookup(client.block_keys(list(range(16))))
        assert "tttt" not in str(err.value)
    with KVClient(srv.address, fingerprint, tenant="t" * 256, transport="grpc") as client:
        keys = client.block_keys(list(range(16)))
        assert client.put(keys, patterned_blocks(1, BLOCK, 3)) == [PutOutcome.STORED]


@pytest.mark.parametrize("tenant", ["t" * 257, "a\tb", ""])
def test_a_tokens_file_with_a_bad_tenant_name_is_refused_at_start(tmp_path, tenant):
    tokens = tmp_path / "tokens.toml"
    escaped = tenant.replace("\t", "\\t")  # TOML's escape: the file itself stays one line per key
    tokens.write_text(f'[[tokens]]\ntoken = "s3cret"\ntenant = "{escaped}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
                             str(tmp_path / "data"), "--tokens-file", str(tokens), "--no-ucx"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the server started with a bad tenant name in its tokens file")
    assert proc.returncode == 2, stderr
    assert "tenant name" in stderr and str(tokens) in stderr, stderr
