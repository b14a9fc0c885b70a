"""Whole calls of many blocks over shm and UCX, byte-exact, with the native block copies and with their reference.

Each put and get moves its blocks in one copy call (kvwire.blockcopy), on both sides: these run every shape
that call splits differently (one block, a thousand tiny ones, sizes around a packed message's, blocks larger
than a thread's share), with the client's native copies on and off, against a server with them on and one with
them off (KVSTORE_NATIVE=0), so a checksum or a byte that either implementation gets wrong fails a commit or a get.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError, ChecksumMismatchError, InvalidRequestError
from kvwire import blockcopy
from kvwire.types import PutOutcome
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import HAVE_UCX, UCX_SERVER_ENV, assert_all_equal, map_pool, tokens
from tests.serverproc import ServerProc

MIB = 1 << 20
TRANSPORTS = ["shm", pytest.param("ucx", marks=[pytest.mark.ucx, pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable")])]
SHAPES = {
    "one block": [4096],
    "1000 tiny": [int(n) for n in np.random.default_rng(3).integers(64, 700, 1000)],
    "around a packed message": [1, 4095, 64 << 10, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 300, 5],
    "larger than a thread's share": [9 * MIB + 7, 3 * MIB, 12345],
}


@pytest.fixture(scope="module", params=["native server", "reference server"])
def server(request, tmp_path_factory):
    env = dict(UCX_SERVER_ENV, **({"KVSTORE_NATIVE": "0"} if request.param == "reference server" else {}))
    srv = ServerProc(tmp_path_factory.mktemp("batched") / "data", flags={"host_memory": "256MiB", "ssd_capacity": "1GiB", "max_block_bytes": "16MiB"},
                     env=env).start()
    yield srv
    srv.stop()


@pytest.fixture(params=["native client", "reference client"])
def client_copies(request, monkeypatch):
    if request.param == "reference client":
        monkeypatch.setattr(blockcopy, "native", None)
    elif blockcopy.native is None:
        pytest.skip("kvwire._native is not built or is off here")
    return request.param


def blocks_of(sizes: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def client(srv, transport: str, tenant: str) -> KVClient:
    c = KVClient(srv.address, make_fingerprint(), tenant=tenant, transport=transport)
    assert c.stats()["client"]["transport"] == transport
    return c


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_shape_round_trips_byte_exact(server, client_copies, transport, shape):
    sizes = SHAPES[shape]
    with client(server, transport, f"shape-{transport}-{client_copies[:3]}") as c:
        keys = c.block_keys(tokens(len(sizes), start=list(SHAPES).index(shape) * 100_000))
        blocks = blocks_of(sizes, seed=len(sizes))
        assert c.put(keys, blocks) == [PutOutcome.STORED] * len(sizes)
        assert_all_equal(c.get(keys), blocks)  # fresh arrays
        outs = [np.full(n, 0xEE, np.uint8) for n in sizes]
        got = c.get(keys, out=outs)
        assert_all_equal(outs, blocks)
        assert all(np.shares_memory(g, o) for g, o in zip(got, outs) if len(o))
        if transport == "shm":
            c.transport.early_copies = True
        assert_all_equal(c.get(keys, out=outs), blocks)  # again: the shm read-ahead copies from remembered slots
        c.delete(keys)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blocks_written_by_one_implementation_read_by_the_other(server, transport, monkeypatch):
    if blockcopy.native is None:
        pytest.skip("kvwire._native is not built or is off here")
    sizes = SHAPES["1000 tiny"][:300] + SHAPES["around a packed message"]
    blocks = blocks_of(sizes, seed=11)
    with client(server, transport, f"cross-{transport}") as c:
        keys = c.block_keys(tokens(len(sizes), start=7_000_000))
        assert c.put(keys, blocks) == [PutOutcome.STORED] * len(sizes)  # native hashes, checked by the server's commit
        with monkeypatch.context() as m:
            m.setattr(blockcopy, "native", None)
            assert_all_equal(c.get(keys, out=[np.zeros(n, np.uint8) for n in sizes]), blocks)
            more = c.block_keys(tokens(len(sizes), start=8_000_000))
            assert c.put(more, blocks) == [PutOutcome.STORED] * len(sizes)  # the reference's hashes
        assert_all_equal(c.get(more, out=[np.zeros(n, np.uint8) for n in sizes]), blocks)
        c.delete(keys + more)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_present_and_missing_blocks_in_one_call(server, transport):
    sizes = SHAPES["1000 tiny"][:200]
    blocks = blocks_of(sizes, seed=5)
    with client(server, transport, f"mixed-{transport}") as c:
        keys = c.block_keys(tokens(len(sizes), start=9_000_000))
        assert c.put(keys[::2], blocks[::2]) == [PutOutcome.STORED] * 100
        rewritten = [b if i % 2 else np.zeros_like(b) for i, b in enumerate(blocks)]  # present ones must keep their bytes
        assert c.put(keys, rewritten) == [PutOutcome.STORED if i % 2 else PutOutcome.ALREADY_PRESENT for i in range(200)]
        assert_all_equal(c.get(keys), blocks)
        c.delete(keys[50:60])
        outs = [np.full(n, 7, np.uint8) for n in sizes]
        with pytest.raises(BlockNotFoundError, match="10 of 200 blocks not found"):
            c.get(keys, out=outs)
        present = keys[:50] + keys[60:]
        assert_all_equal(c.get(present), blocks[:50] + blocks[60:])
        c.delete(keys)


def test_a_corrupted_tiny_block_among_a_thousand_fails_the_get_by_name(server):
    sizes = SHAPES["1000 tiny"]
    blocks = blocks_of(sizes, seed=8)
    with client(server, "shm", "corrupt") as c:
        keys = c.block_keys(tokens(len(sizes), start=10_000_000))
        c.put(keys, blocks)
        pinned = c.pin(keys[700:701])
        offset = pinned.slots[0].offset
        pinned.release()
        pool = map_pool(c.control.data_plane().shm_name)
        pool[offset] ^= 0xFF
        with pytest.raises(ChecksumMismatchError, match=f"block {keys[700].hex()} failed its checksum"):
            c.get(keys, out=[np.zeros(n, np.uint8) for n in sizes])
        pool[offset] ^= 0xFF
        assert_all_equal(c.get(keys), blocks)
        c.delete(keys)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_buffers_are_refused_before_anything_moves(server, transport):
    with client(server, transport, f"bad-{transport}") as c:
        keys = c.block_keys(tokens(3, start=11_000_000))
        blocks = blocks_of([100, 200, 300], seed=1)
        with pytest.raises(InvalidRequestError, match="C-contiguous"):
            c.put(keys, [blocks[0], np.zeros(400, np.uint8)[::2], blocks[2]])
        assert c.contains(keys) == [False] * 3
        c.put(keys, blocks)
        with pytest.raises(InvalidRequestError, match="holds 201 bytes; the block has 200"):
            c.get(keys, out=[np.zeros(100, np.uint8), np.zeros(201, np.uint8), np.zeros(300, np.uint8)])
        assert_all_equal(c.get(keys), blocks)
        c.delete(keys)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_four_clients_at_once_each_get_their_own_bytes(server, transport):
    """Four clients of one process put and get at once: the native copies run without the GIL, side by side."""
    errors: list[str] = []

    def worker(k: int) -> None:
        sizes = SHAPES["1000 tiny"][k * 100 : k * 100 + 300] + [MIB + k, 3 * MIB - k, 64 << 10]
        blocks = blocks_of(sizes, seed=100 + k)
        try:
            with client(server, transport, f"four-{transport}-{k}") as c:
                keys = c.block_keys(tokens(len(sizes), start=12_000_000 + k * 10_000))
                for rnd in range(3):
                    c.put(keys, blocks)
                    outs = [np.zeros(n, np.uint8) for n in sizes]
                    c.get(keys, out=outs)
                    if not all(np.array_equal(a, b) for a, b in zip(outs, blocks)):
                        errors.append(f"client {k} round {rnd}: bytes differ")
                    c.delete(keys)
        except Exception as err:  # reported below, with the others
            errors.append(f"client {k}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
