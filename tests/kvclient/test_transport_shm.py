"""shm specifics beyond the shared transport tests: one RPC a get, deferred unpins, the early copy, pins read in the pool."""
from __future__ import annotations


import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError, ChecksumMismatchError
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import eventually, map_pool, random_blocks, tokens
from tests.serverproc import ServerProc

BLOCK = 1 << 20


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("shm") / "data", flags={"host_memory": "128MiB", "ucx": False})
    srv.start()
    yield srv
    srv.stop()


def pins_held(srv, fingerprint) -> int:
    with KVClient(srv.address, fingerprint, transport="grpc") as observer:
        return observer.stats()["pins_held"]


def wait_no_pins(srv, fingerprint) -> None:
    eventually(lambda: pins_held(srv, fingerprint) == 0)


def test_a_stream_of_gets_costs_one_rpc_each_and_quiet_pins_are_dropped(shm_server, fingerprint):
    with KVClient(shm_server.address, fingerprint, tenant="stream", transport="shm") as client:
        keys = client.block_keys(tokens(4))
        client.put(keys, random_blocks(4, BLOCK))
        for _ in range(5):
            client.get(keys)
            assert client.last_transfer.control_rpcs == 1  # the Pin carries the last get's release
        wait_no_pins(shm_server, fingerprint)
        client.get(keys)
    assert pins_held(shm_server, fingerprint) == 0  # close() drops what is still deferred


def test_early_copy_is_used_and_never_serves_a_deleted_or_rewritten_block(shm_server, fingerprint):
    with KVClient(shm_server.address, fingerprint, tenant="early", transport="shm") as client:
        client.transport.early_copies = True  # on whatever the host's core count
        keys = client.block_keys(tokens(8, start=1000))
        blocks = random_blocks(8, BLOCK, seed=1)
        client.put(keys, blocks)
        out = [np.zeros(BLOCK, np.uint8) for _ in keys]
        client.get(keys, out=out)
        assert client.last_transfer.extra.get("early_blocks", 0) == 0  # nothing remembered yet
        out = [np.zeros(BLOCK, np.uint8) for _ in keys]
        client.get(keys, out=out)
        assert client.last_transfer.extra["early_blocks"] == 8
        assert all(np.array_equal(a, b) for a, b in zip(out, blocks))

        # The freed slot still holds the old bytes, which match the remembered checksum: the Pin must win.
        wait_no_pins(shm_server, fingerprint)  # a block deleted while pinned is zeroed when unpinned; not this one
        old_slot = slot_of(client, keys[3])
        client.delete(keys[3:4])
        with pytest.raises(BlockNotFoundError):
            client.get(keys, out=out)

        # Rewrite block 3 into another slot while its old slot keeps the old bytes, which still match the
        # remembered checksum: only the Pin's slot and checksum can tell the early copy is stale.
        client.delete(keys[5:6])  # freed last, so the slab allocator hands this slot out next
        rewritten = random_blocks(1, BLOCK, seed=2)[0]
        client.put(keys[3:4], [rewritten])
        assert slot_of(client, keys[3]) != old_slot
        wanted = keys[:5] + keys[6:]
        out = [np.zeros(BLOCK, np.uint8) for _ in wanted]
        client.get(wanted, out=out)
        assert np.array_equal(out[3], rewritten)
        assert all(np.array_equal(got, blocks[i]) for got, i in zip(out, [0, 1, 2, 3, 4, 6, 7]) if i != 3)
        assert client.last_transfer.extra["early_blocks"] == 6


def slot_of(client: KVClient, key) -> int:
    pin = client.control.pin(client.fingerprint_id, [key.digest])
    client.control.unpin([pin.pin_id])
    return pin.offsets[0]


def test_prefix_pin_pins_the_leading_present_run_in_one_rpc(shm_server, fingerprint):
    with KVClient(shm_server.address, fingerprint, tenant="prefix-pin", transport="shm") as client:
        keys = client.block_keys(tokens(6, start=2000))
        blocks = random_blocks(6, BLOCK, seed=3)
        client.put(keys[:2] + keys[3:], blocks[:2] + blocks[3:])  # block 2 missing: the run ends there
        pinned = client.pin(keys, prefix=True)
        assert pinned.stats.control_rpcs == 1 and client.last_transfer is pinned.stats
        assert [s.index for s in pinned.slots] == [0, 1] and pinned.keys == [k.digest for k in keys[:2]]
        pool = pinned.pool_view
        for slot, block in zip(pinned.slots, blocks):
            assert np.array_equal(pool[slot.offset: slot.offset + slot.size_bytes], block)
        assert pins_held(shm_server, fingerprint) == 1
        with pytest.raises(BlockNotFoundError):  # without prefix it is all or nothing
            client.pin(keys)
        pinned.release(failed=True)
        assert pins_held(shm_server, fingerprint) == 0

        assert len(client.pin(keys[2:], prefix=True)) == 0
        assert pins_held(shm_server, fingerprint) == 0  # nothing present, nothing pinned

    # The same digests asked for under another fingerprint (another dtype): never served, even in prefix mode.
    with KVClient(shm_server.address, make_fingerprint(dtype="bfloat16"), tenant="prefix-pin", transport="shm") as client:
        assert client.pin(keys, prefix=True).slots == []


def test_pinned_blocks_are_read_and_verified_in_the_pool_and_released_on_exit(shm_server, fingerprint):
    with KVClient(shm_server.address, fingerprint, tenant="pin-verify", transport="shm") as client:
        keys = client.block_keys(tokens(3, start=3000))
        blocks = random_blocks(3, BLOCK, seed=4)
        client.put(keys, blocks)
        wait_no_pins(shm_server, fingerprint)
        with client.pin(keys) as pinned:
            assert pins_held(shm_server, fingerprint) == 1
            for i, block in enumerate(blocks):
                pinned.verify(i)
                assert np.array_equal(pinned.block(i), block)
            s = pinned.slots[2]
            pool = map_pool(client.control.data_plane().shm_name)  # another mapping: the server's bytes themselves
            pool[s.offset + 5] ^= 0xFF
            with pytest.raises(ChecksumMismatchError, match=keys[2].hex()):
                pinned.verify(2)
            pool[s.offset + 5] ^= 0xFF
        wait_no_pins(shm_server, fingerprint)  # released on exit, with the next Pin or after a quiet moment
        with pytest.raises(ChecksumMismatchError):
            with client.pin(keys) as pinned:
                pool[pinned.slots[0].offset] ^= 0xFF
                try:
                    pinned.verify(0)
                finally:
                    pool[pinned.slots[0].offset] ^= 0xFF
        assert pins_held(shm_server, fingerprint) == 0  # an error leaving the block drops the pin at once
