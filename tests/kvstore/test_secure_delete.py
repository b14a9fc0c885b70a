"""`delete --secure`: no byte pattern of a deleted block survives in the host pool or the SSD tier files.

The blocks are random, so any 32-byte window of one is a fingerprint of it. Before the
delete every victim can be found in the raw files (so the scan is not vacuous); after
it, and after shutdown, none can, while the blocks that were not deleted still can.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError
from kvwire.v1 import kvstore_pb2 as pb
from tests.conftest import make_fingerprint
from tests.kvstore.admin_util import admin_json, kv_stub, patterned_blocks, pin, unpin

WINDOW = 32


def windows(block: np.ndarray) -> list[bytes]:
    raw = block.tobytes()
    return [raw[o : o + WINDOW] for o in sorted({0, len(raw) // 3, len(raw) // 2, 50_000 % (len(raw) - WINDOW), len(raw) - WINDOW})]


def found(blocks: list[np.ndarray], haystack: bytes) -> list[bool]:
    return [any(w in haystack for w in windows(b)) for b in blocks]


def data_files(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())


def test_secure_delete_leaves_no_recoverable_bytes(make_server, tmp_path):
    srv = make_server(host_memory="16MiB", ssd_capacity="64MiB", max_block_bytes="1MiB")
    fp_victim, fp_keep = make_fingerprint(model="victim"), make_fingerprint(model="keeper")
    victims_ssd, keepers_ssd = patterned_blocks(6, 60_000, 1), patterned_blocks(4, 65_536, 2)
    keepers_host, victims_host = patterned_blocks(2, 40_000, 3), patterned_blocks(3, 100_000, 4)
    with KVClient(srv.address, fp_victim, tenant="alice") as victim, KVClient(srv.address, fp_keep, tenant="alice") as keeper:
        kv_ssd, kk_ssd = victim.block_keys(range(6 * 16)), keeper.block_keys(range(4 * 16))
        victim.put(kv_ssd, victims_ssd)
        keeper.put(kk_ssd, keepers_ssd)
        # Demotion writes them to LMDB and frees their pool slots, zeroed.
        assert admin_json(srv, "evict", "--watermark", "0.0001", token=None)["demoted"] == 10
        # Pool slots 0-5 held the victims and 6-9 the keepers; all are free now, and zero.
        kk_host = keeper.block_keys(range(1000, 1000 + 2 * 16))
        keeper.put(kk_host, keepers_host)
        victim.get(kv_ssd[:2])  # promoted into slots 2-3: now in both tiers
        kv_host = victim.block_keys(range(2000, 2000 + 3 * 16))
        victim.put(kv_host, victims_host)  # another size class: host tier only
        held = pin(srv, fp_victim.id, [kv_host[0].digest], ttl_ms=800, metadata=(("kvstore-tenant", "alice"),))  # a reader still copying when the delete comes
        assert len(held.offsets) == 1

        channel, stub = kv_stub(srv)
        with channel:
            shm_name = stub.DataPlane(pb.DataPlaneRequest()).shm_name
        pool_fd = os.open(f"/dev/shm/{shm_name}", os.O_RDONLY)  # outlives the server's unlink at shutdown
        try:
            pool_size = os.fstat(pool_fd).st_size
            before_pool, before_files = os.pread(pool_fd, pool_size, 0), data_files(srv.data_dir)
            assert all(found(victims_ssd, before_files)) and all(found(victims_ssd[:2] + victims_host, before_pool))
            assert not any(found(victims_ssd[2:], before_pool))  # demoted and not read back: their slots were zeroed

            report = admin_json(srv, "delete", "--secure", "--fingerprint", fp_victim.id_hex, token=None)
            assert (report["deleted"], report["pending_pinned"], report["bytes"]) == (9, 0, 6 * 60_000 + 3 * 100_000)
            assert report["scrubbed_host_bytes"] > 0 and report["ssd_bytes_rewritten"] > 0
            for keys in (kv_ssd, kv_host):
                for key in keys:
                    try:
                        victim.get([key])
                        raise AssertionError("a securely deleted block is still readable")
                    except BlockNotFoundError:
                        pass
            # Only host-resident keepers: promoting ssd ones would overwrite the free slots under test.
            assert all(np.array_equal(a, b) for a, b in zip(keeper.get(kk_host), keepers_host))
        finally:
            assert srv.stop() == 0
            pool = os.pread(pool_fd, pool_size, 0)
            os.close(pool_fd)

    files = data_files(srv.data_dir)
    assert not any(found(victims_ssd + victims_host, pool)), "deleted bytes left in the host pool"
    assert not any(found(victims_ssd + victims_host, files)), "deleted bytes left in the data directory"
    assert all(found(keepers_ssd + keepers_host, files))  # shutdown flushed every keeper to ssd
    assert all(found(keepers_host, pool))

    srv.start()
    with KVClient(srv.address, fp_keep, tenant="alice") as keeper:
        assert all(np.array_equal(a, b) for a, b in zip(keeper.get(kk_ssd + kk_host), keepers_ssd + keepers_host))
    with KVClient(srv.address, fp_victim, tenant="alice") as victim:
        assert victim.lookup(kv_ssd) == 0 and victim.lookup(kv_host) == 0


def test_secure_delete_answers_within_the_callers_deadline_and_zeroes_a_pinned_slot_at_unpin(make_server):
    """A reader pinned for the whole pin TTL (30 s) must not hold the operator's call past its deadline:
    the delete answers in time, counts the block as pending, and the slot is zeroed when the pin drops."""
    srv = make_server(host_memory="16MiB", max_block_bytes="1MiB")
    fp = make_fingerprint(model="victim")
    victim_block = patterned_blocks(1, 100_000, 5)
    md = (("kvstore-tenant", "alice"),)
    with KVClient(srv.address, fp, tenant="alice") as victim:
        keys = victim.block_keys(range(16))
        victim.put(keys, victim_block)
        held = pin(srv, fp.id, [keys[0].digest], ttl_ms=30_000, metadata=md)
        channel, stub = kv_stub(srv)
        with channel:
            shm_name = stub.DataPlane(pb.DataPlaneRequest()).shm_name
        pool_fd = os.open(f"/dev/shm/{shm_name}", os.O_RDONLY)
        try:
            pool_size = os.fstat(pool_fd).st_size
            assert all(found(victim_block, os.pread(pool_fd, pool_size, 0)))

            started = time.monotonic()
            report = admin_json(srv, "--timeout", "4s", "delete", "--secure", "--fingerprint", fp.id_hex, token=None)
            assert time.monotonic() - started < 4
            assert (report["deleted"], report["pending_pinned"]) == (1, 1)
            assert victim.lookup(keys) == 0
            assert all(found(victim_block, os.pread(pool_fd, pool_size, 0)))  # the reader's copy stays until it unpins

            unpin(srv, [held.pin_id], metadata=md)
            assert not any(found(victim_block, os.pread(pool_fd, pool_size, 0))), "the unpinned slot kept deleted bytes"
        finally:
            os.close(pool_fd)
