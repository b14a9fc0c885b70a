"""The durable-put contract against a real server: STORED or ALREADY_PRESENT under durable=True
means the block is in LMDB and survives SIGKILL; a block that cannot be made durable is refused
(RESOURCE_EXHAUSTED) and left uncommitted. Full-disk cases run on a real, small tmpfs."""
from __future__ import annotations

import signal
import subprocess
import time

import grpc
import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import CapacityExhaustedError, NotDurableError
from kvwire.types import PutOutcome
from tests.kvclient.transport_util import assert_all_equal, random_blocks as blocks_for

KIB = 1 << 10


def kill_and_restart(server) -> None:
    server.stop(signal.SIGKILL)
    server.start()


# ---- issue 11 #13: a durable put answered ALREADY_PRESENT makes the existing block durable ----

def test_durable_put_of_a_host_only_block_makes_it_durable(make_server, fingerprint):
    server = make_server(host_memory="64MiB", ssd_capacity="256MiB", max_block_bytes="1MiB")
    blocks = blocks_for(20, 64 * KIB, seed=1)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        keys = client.block_keys(list(range(20 * 16)))
        assert set(client.put(keys, blocks)) == {PutOutcome.STORED}
        assert client.stats()["tiers"]["ssd"]["blocks"] == 0  # host tier only, below the watermark
        assert set(client.put(keys, blocks, durable=True)) == {PutOutcome.ALREADY_PRESENT}
        assert client.stats()["tiers"]["ssd"]["blocks"] == 20
    kill_and_restart(server)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        assert_all_equal(client.get(keys), blocks)


def test_durable_reserve_commit_put_of_a_host_only_block_makes_it_durable(make_server, fingerprint):
    server = make_server(host_memory="64MiB", ssd_capacity="256MiB", max_block_bytes="1MiB")
    blocks = blocks_for(8, 64 * KIB, seed=2)
    with KVClient(server.address, fingerprint, transport="shm") as client:
        keys = client.block_keys(list(range(8 * 16)))
        assert set(client.put(keys, blocks)) == {PutOutcome.STORED}
        assert set(client.put(keys, blocks, durable=True)) == {PutOutcome.ALREADY_PRESENT}
    kill_and_restart(server)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        assert_all_equal(client.get(keys), blocks)


# ---- #14: a block that cannot reach LMDB is refused, not acknowledged ----------------------------

def assert_not_durable(excinfo, why: str) -> None:
    err = excinfo.value
    assert isinstance(err, CapacityExhaustedError)
    assert err.status == "RESOURCE_EXHAUSTED"
    assert "could not be made durable" in str(err) and why in str(err), str(err)


@pytest.mark.parametrize("transport", ["grpc", "shm"])  # inline Put; Reserve + Commit
def test_durable_put_of_a_block_larger_than_the_ssd_tier_is_refused(make_server, fingerprint, transport):
    server = make_server(host_memory="16MiB", ssd_capacity="512KiB", max_block_bytes="1MiB")
    big = blocks_for(1, 768 * KIB, seed=3)
    with KVClient(server.address, fingerprint, transport=transport) as client:
        keys = client.block_keys(list(range(16)))
        for _ in range(2):  # a retried durable put must not be acknowledged either
            with pytest.raises(NotDurableError) as excinfo:
                client.put(keys, big, durable=True)
            assert_not_durable(excinfo, "larger than the ssd tier")
            assert client.contains(keys) == [False]  # refused puts are not committed
        assert client.stats()["leases_held"] == 0


def test_durable_put_of_a_cached_block_too_large_for_the_ssd_tier_is_refused(make_server, fingerprint):
    server = make_server(host_memory="16MiB", ssd_capacity="512KiB", max_block_bytes="1MiB")
    big = blocks_for(1, 768 * KIB, seed=3)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        keys = client.block_keys(list(range(16)))
        assert client.put(keys, big) == [PutOutcome.STORED]
        # Present in the host tier, it must not be called durable by an ALREADY_PRESENT answer.
        with pytest.raises(NotDurableError) as excinfo:
            client.put(keys, big, durable=True)
        assert_not_durable(excinfo, "larger than the ssd tier")
        assert_all_equal(client.get(keys), big)  # still served from the host tier


def test_durable_put_is_refused_while_every_ssd_block_is_pinned(make_server, fingerprint):
    server = make_server(host_memory="16MiB", ssd_capacity="1MiB", max_block_bytes="1MiB")
    blocks = blocks_for(4, 256 * KIB, seed=4)  # three fill the ssd tier's 1 MiB
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        keys = client.block_keys(list(range(4 * 16)))
        assert client.put(keys[:3], blocks[:3], durable=True) == [PutOutcome.STORED] * 3
        pin = client.control.pin(client.fingerprint_id, [k.digest for k in keys[:3]], ttl_ms=60_000)
        with pytest.raises(NotDurableError) as excinfo:
            client.put(keys[3:], blocks[3:], durable=True)
        assert_not_durable(excinfo, "pinned")
        assert client.contains(keys) == [True, True, True, False]
        client.control.unpin([pin.pin_id])
        assert client.put(keys[3:], blocks[3:], durable=True) == [PutOutcome.STORED]  # LRU block makes room
    kill_and_restart(server)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        assert_all_equal(client.get(keys[3:]), blocks[3:])


# ---- #15: a full data disk ---------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB filesystem at tmp_path/small, to be the data directory of make_server("small").

    Request it before make_server, so the server is stopped before it is unmounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a full-disk test needs to mount a small tmpfs, and mount was refused: {done.stderr.strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def put_until_refused(client, keys, blocks, durable: bool, batch: int = 4):
    """Put batches until three are refused with RESOURCE_EXHAUSTED; any other error fails the test.

    Returns the acknowledged keys and blocks, the refused keys and the last refusal."""
    acked_keys, acked_blocks, refused_keys, refusals = [], [], [], []
    for i in range(0, len(keys), batch):
        try:
            outcomes = client.put(keys[i : i + batch], blocks[i : i + batch], durable=durable)
        except CapacityExhaustedError as err:
            assert err.status == "RESOURCE_EXHAUSTED"
            refused_keys += keys[i : i + batch]
            refusals.append(err)
            if len(refusals) == 3:
                break
            continue
        assert set(outcomes) == {PutOutcome.STORED}
        acked_keys += keys[i : i + batch]
        acked_blocks += blocks[i : i + batch]
    return acked_keys, acked_blocks, refused_keys, refusals[-1] if refusals else None


def test_full_disk_refuses_durable_puts_keeps_acknowledged_ones_and_shuts_down_cleanly(small_disk, make_server, fingerprint):
    server = make_server("small", host_memory="64MiB", ssd_capacity="256MiB", max_block_bytes="1MiB")
    n = 64  # 32 MiB of 512 KiB blocks onto a 24 MiB disk
    blocks = blocks_for(n, 512 * KIB, seed=5)
    volatile = blocks_for(8, 512 * KIB, seed=6)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        keys = client.block_keys(list(range(n * 16)))
        vkeys = client.block_keys(list(range(n * 16, (n + 8) * 16)))
        acked, acked_blocks, refused, last_refusal = put_until_refused(client, keys, blocks, durable=True)
        assert acked and refused
        assert isinstance(last_refusal, NotDurableError)
        assert "could not be made durable" in str(last_refusal) and "mdb_txn_commit" in str(last_refusal), str(last_refusal)
        assert not any(client.contains(refused))  # refused durable puts are not committed
        assert client.put(vkeys[:4], volatile[:4]) == [PutOutcome.STORED] * 4  # the host tier still takes writes
    kill_and_restart(server)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        assert_all_equal(client.get(acked), acked_blocks)
        assert client.put(vkeys[4:], volatile[4:]) == [PutOutcome.STORED] * 4
    assert server.stop(signal.SIGTERM) == 0
    log = server.log()
    assert "Traceback" not in log, log
    assert "4 blocks could not be flushed" in log, log
    server.start()
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        assert_all_equal(client.get(acked), acked_blocks)


def test_full_disk_demotion_keeps_blocks_in_the_host_tier(small_disk, make_server, fingerprint):
    server = make_server("small", host_memory="16MiB", ssd_capacity="256MiB", max_block_bytes="1MiB")
    n = 192  # 48 MiB of 256 KiB blocks: more than the disk and the host pool together
    blocks = blocks_for(n, 256 * KIB, seed=7)
    with KVClient(server.address, fingerprint, transport="grpc") as client:
        keys = client.block_keys(list(range(n * 16)))
        acked, acked_blocks, refused = [], [], 0
        for i in range(0, n, 4):
            try:
                assert client.put(keys[i : i + 4], blocks[i : i + 4]) == [PutOutcome.STORED] * 4
            except CapacityExhaustedError as err:
                assert err.status == "RESOURCE_EXHAUSTED"
                refused += 1
                continue
            acked += keys[i : i + 4]
            acked_blocks += blocks[i : i + 4]
            time.sleep(0.06)  # a demoter tick between batches, as a steady writer would allow
        time.sleep(0.2)
        # Every acknowledged block is still readable: none was dropped because LMDB refused it.
        assert_all_equal(client.get(acked), acked_blocks)
        assert refused, "the disk and the host pool should both have filled"
    assert "Traceback" not in server.log(), server.log()
