"""Host -> LMDB demotion, promotion, restarts and on-disk corruption, against a real server."""
from __future__ import annotations

import signal
import time

import lmdb
import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError
from kvwire.types import PutOutcome
from tests.kvclient.transport_util import assert_all_equal

BLOCK = 64 << 10
SMALL_HOST = dict(host_memory="8MiB", max_block_bytes="1MiB", ssd_capacity="256MiB")


def blocks_for(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, BLOCK, dtype=np.uint8) for _ in range(n)]


def test_writing_past_host_capacity_demotes_to_lmdb_and_survives_restart(make_server, fingerprint):
    server = make_server(**SMALL_HOST)
    n = 320  # 20 MiB of payload into an 8 MiB host pool
    blocks = blocks_for(n, seed=1)
    with KVClient(server.address, fingerprint) as client:
        keys = client.block_keys(list(range(n * 16)))
        for i in range(0, n, 32):
            assert set(client.put(keys[i : i + 32], blocks[i : i + 32])) == {PutOutcome.STORED}
        stats = client.stats()
        assert stats["tiers"]["host"]["used_bytes"] <= 8 << 20
        assert stats["tiers"]["ssd"]["blocks"] >= n - 128
        assert stats["counters"]["demotions"] >= n - 128
        assert client.lookup(keys) == n
        assert_all_equal(client.get(keys), blocks)
        assert client.stats()["counters"]["hits_ssd"] > 0
    server.restart()
    with KVClient(server.address, fingerprint) as client:
        assert client.lookup(keys) == n
        assert_all_equal(client.get(keys), blocks)
    assert "blocks restored" in server.log()


def test_durable_puts_and_demoted_blocks_survive_sigkill(make_server, fingerprint):
    server = make_server(**SMALL_HOST)
    durable, volatile = blocks_for(4, seed=2), blocks_for(4, seed=3)
    with KVClient(server.address, fingerprint) as client:
        keys = client.block_keys(list(range(8 * 16)))
        client.put(keys[:4], durable, durable=True)
        client.put(keys[4:], volatile)
        assert client.stats()["tiers"]["ssd"]["blocks"] == 4
    server.stop(signal.SIGKILL)
    server.start()
    with KVClient(server.address, fingerprint) as client:
        assert_all_equal(client.get(keys[:4]), durable)
        # The host tier is a cache: what was never acknowledged as durable may be gone.
        assert client.contains(keys[4:]) == [False] * 4


def test_corrupt_lmdb_value_reads_as_miss_and_is_counted(make_server, fingerprint):
    server = make_server(**SMALL_HOST)
    blocks = blocks_for(6, seed=4)
    with KVClient(server.address, fingerprint) as client:
        keys = client.block_keys(list(range(6 * 16)))
        client.put(keys, blocks, durable=True)
    server.stop()
    env = lmdb.open(str(server.data_dir / "ssd"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        items = sorted((k, v) for k, v in txn.cursor())
        target = next(k for k, v in items if bytes(v).endswith(blocks[2].tobytes()))
        value = bytearray(txn.get(target))
        value[-100] ^= 0xFF  # one flipped payload byte; the header still parses
        txn.put(target, bytes(value))
    env.close()
    server.start()
    with KVClient(server.address, fingerprint, transport="shm") as client:
        # A prefix pin promotes from LMDB and stops at the corrupt block, keeping the run before it.
        pinned = client.pin(keys, prefix=True)
        assert [s.index for s in pinned.slots] == [0, 1]
        assert_all_equal([pinned.pool_view[s.offset: s.offset + s.size_bytes] for s in pinned.slots], blocks[:2])
        pinned.release(failed=True)
        assert client.stats()["counters"]["checksum_failures"] == 1
        assert not client.contains([keys[2]])[0]  # dropped, as a plain get would have
    server.stop()
    server.start()
    with KVClient(server.address, fingerprint) as client:
        with pytest.raises(BlockNotFoundError):  # the drop persisted across the restart
            client.get([keys[2]])
        assert client.contains(keys) == [True, True, False, True, True, True]
        others = [k for i, k in enumerate(keys) if i != 2]
        assert_all_equal(client.get(others), [b for i, b in enumerate(blocks) if i != 2])
        # Still serving writes, too: the block can be recomputed and stored again.
        assert client.put([keys[2]], [blocks[2]]) == [PutOutcome.STORED]
        assert_all_equal(client.get([keys[2]]), [blocks[2]])


def test_read_pins_keep_blocks_from_eviction(make_server, fingerprint):
    """A pinned block stays in the host pool however much is written after it."""
    server = make_server(**SMALL_HOST)
    with KVClient(server.address, fingerprint) as client:
        keys = client.block_keys(list(range(200 * 16)))
        blocks = blocks_for(200, seed=5)
        client.put(keys[:1], blocks[:1])
        pin = client.control.pin(client.fingerprint_id, [keys[0].digest], ttl_ms=60_000)
        slot = pin.offsets[0]
        for i in range(1, 200, 40):
            client.put(keys[i : i + 40], blocks[i : i + 40])
        time.sleep(0.3)
        status, _ = client.status(keys[:1])
        assert status[0].tier.name == "HOST"
        again = client.control.pin(client.fingerprint_id, [keys[0].digest])
        assert again.offsets[0] == slot
        client.control.unpin([pin.pin_id, again.pin_id])
        assert client.stats()["pins_held"] == 0
