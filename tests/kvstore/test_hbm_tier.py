"""The HBM tier's logic without a GPU: its device memory is host memory behind the same protocol (tiers/device.py).

In process, a Store over an unshared host pool, a tmp_path LMDB and a HostDeviceMemory: blocks read often
are promoted and verified, pins name their HBM copies, room is made by displacing colder or deeper copies
only, dropping an HBM copy leaves the block served from the host tier, a failed upload or a lost device
costs only the tier. Against real server processes (hbm_backend = "host"): Pin answers, KVClient's
PinnedBlocks, `kvstore-admin stats`, `ls` and `evict`, and /metrics show the tier; a server asked for an
HBM tier on a machine without CUDA logs it once and serves without one.
"""
from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import xxhash

from kvclient import KVClient
from kvwire.types import PutOutcome, Tier
from kvclient.control import DataPlaneInfo
from kvclient.hbm import open_hbm_pool
from kvstore.api import StoreAPI
from kvstore.config import ServerConfig
from kvwire.hostid import host_id
from kvstore.store import Caller, Store
from kvstore.tiers.device import DeviceError, HostDeviceMemory
from kvstore.tiers.host import HostPool
from tests.kvstore.admin_util import admin_json, run_admin, scrape
from tests.kvclient.transport_util import HAVE_UCX, UCX_SERVER_ENV, eventually
from tests.serverproc import ServerProc, free_port

pytestmark = pytest.mark.timeout(120)

KIB, MIB = 1 << 10, 1 << 20
BLOCK = 64 * KIB
FP = b"f" * 16
ALICE = Caller("alice", "c1")
HBM, HOST, SSD = Tier.HBM, Tier.HOST, Tier.SSD


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = BLOCK) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def crc(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(device: HostDeviceMemory | None = None, hbm_bytes: int = 4 * MIB, **settings) -> Store:
        values = dict(data_dir=str(tmp_path / f"data{len(stores)}"), host_memory=4 * MIB, max_block_bytes=MIB, ssd_capacity=64 * MIB)
        cfg = ServerConfig(**{**values, **settings}).validate()
        store = Store(cfg, host=HostPool(cfg.host_memory, cfg.max_block_bytes, shared=False),
                      hbm_device=device if device is not None else HostDeviceMemory(hbm_bytes))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def put(store: Store, ids) -> None:
    ids = list(ids)
    for start in range(0, len(ids), 16):
        chunk = ids[start : start + 16]
        assert set(store.put_inline(ALICE, FP, [(key(i), payload(i), crc(payload(i))) for i in chunk])) == {PutOutcome.STORED}


def read(store: Store, ids, times: int = 1) -> None:
    """times prefix Pins of ids (a chain, in order), each dropped again: what an engine's loads do."""
    for _ in range(times):
        info = store.pin(ALICE, FP, [key(i) for i in ids], prefix=True)
        store.unpin(ALICE, [info.pin_id])


def hbm_blocks(store: Store, ids) -> list[bool]:
    views = {v.key: v for v in store.blocks(lambda v: True)}
    return [HBM in views[key(i)].tiers for i in ids]


def device_bytes(store: Store, i: int) -> bytes:
    info = store.pin(ALICE, FP, [key(i)])
    try:
        assert info.slots.tiers == [HBM], "the block has no HBM copy"
        return store.hbm.tier.device.download(info.slots.hbm_offsets[0], info.slots.sizes[0])
    finally:
        store.unpin(ALICE, [info.pin_id])


# ---- promotion ---------------------------------------------------------------------------

def test_blocks_read_twice_are_promoted_verified_and_named_by_pins(make_store):
    store = make_store()
    put(store, range(4))
    read(store, range(4))
    assert store.promote_hot().promoted == 0  # one read is what every prompt costs
    read(store, range(4))
    report = store.promote_hot()
    assert report.promoted == 4 and hbm_blocks(store, range(4)) == [True] * 4
    assert all(device_bytes(store, i) == payload(i) for i in range(4))
    info = store.pin(ALICE, FP, [key(i) for i in range(6)], prefix=True)
    slots = info.slots
    assert slots.tiers == [HBM] * 4 and len(set(slots.hbm_offsets)) == 4 and info.hbm_pool_id == store.hbm.tier.device.pool_id
    assert [crc(payload(i)) for i in range(4)] == slots.checksums  # the host columns are as they always were
    store.unpin(ALICE, [info.pin_id])
    stats = store.stats()
    assert [(t.tier, t.blocks, t.used_bytes) for t in stats.tiers][0] == (HBM, 4, 4 * BLOCK)
    assert stats.counters["hbm_promotions"] == 4 and stats.counters["hits_hbm"] == 4 + 4  # device_bytes pinned each once
    assert store.promote_hot().promoted == 0  # nothing is copied twice


def test_pins_of_blocks_not_in_hbm_answer_as_before(make_store):
    store = make_store()
    put(store, range(2))
    info = store.pin(ALICE, FP, [key(0), key(1)])
    assert info.slots.tiers == [] and info.slots.hbm_offsets == [] and info.hbm_pool_id == 0
    store.unpin(ALICE, [info.pin_id])
    read(store, [0], times=2)
    store.promote_hot()
    info = store.pin(ALICE, FP, [key(0), key(1)])  # mixed: one block in HBM, one on the host only
    assert info.slots.tiers == [HBM, HOST] and info.slots.hbm_offsets[1] == 0
    store.unpin(ALICE, [info.pin_id])


def test_a_copy_that_does_not_verify_is_not_attached(make_store):
    class FlipsAByte(HostDeviceMemory):
        """A device that damages the first block of every upload, as a bad copy would."""

        def upload(self, items):
            super().upload(items)
            self.bytes[items[0][0]] ^= 0xFF

    store = make_store(device=FlipsAByte(4 * MIB))
    put(store, range(3))
    read(store, range(3), times=2)
    report = store.promote_hot()
    assert (report.promoted, report.failed) == (2, 1) and hbm_blocks(store, range(3)) == [False, True, True]
    assert store.counters["hbm_verify_failures"] == 1 and store.hbm.tier.used_bytes == 2 * BLOCK
    assert b"".join(d for _, d, _ in store.get(ALICE, FP, [key(0)])) == payload(0)  # served from the host as always


def test_blocks_are_held_on_the_host_tier_while_they_are_uploaded(make_store):
    class Watching(HostDeviceMemory):
        def upload(self, items):
            self.pins_seen = sorted(m.pins for m in store.index)
            super().upload(items)

    device = Watching(4 * MIB)
    store = make_store(device=device)
    put(store, range(3))
    read(store, range(2), times=2)
    assert store.promote_hot().promoted == 2
    assert device.pins_seen == [0, 1, 1]  # held, so demotion cannot move a host copy mid-upload
    assert all(m.pins == 0 for m in store.index)


# ---- making room, and dropping copies -------------------------------------------------------------

def test_cold_copies_give_way_and_their_blocks_stay_served_from_the_host(make_store):
    store = make_store(hbm_bytes=MIB, hbm_promote_window_s=0.3)  # one slab: 16 slots of 64 KiB
    put(store, range(32))
    read(store, range(16), times=2)
    assert store.promote_hot().promoted == 16
    time.sleep(0.35)  # the first set cools
    read(store, range(16, 32), times=2)
    report = store.promote_hot()
    assert (report.promoted, report.displaced) == (16, 16)
    assert hbm_blocks(store, range(32)) == [False] * 16 + [True] * 16
    assert [d for _, d, _ in store.get(ALICE, FP, [key(i) for i in range(16)])] == [payload(i) for i in range(16)]
    assert store.counters["hbm_evictions"] == 16 and store.counters["evictions"] == 0


def test_shallow_blocks_displace_the_deepest_hot_copies(make_store):
    store = make_store(hbm_bytes=MIB)
    put(store, range(24))
    read(store, range(16), times=2)  # a 16-block prompt: positions 0..15
    assert store.promote_hot().promoted == 16
    read(store, range(16, 20), times=2)  # another prompt's first 4 blocks: positions 0..3
    report = store.promote_hot()
    assert (report.promoted, report.displaced) == (4, 4)
    assert hbm_blocks(store, range(20)) == [True] * 12 + [False] * 4 + [True] * 4  # the first prompt's deepest gave way


def test_pinned_copies_are_never_displaced(make_store):
    store = make_store(hbm_bytes=MIB, hbm_promote_window_s=0.2)
    put(store, range(32))
    read(store, range(16), times=2)
    store.promote_hot()
    held = store.pin(ALICE, FP, [key(i) for i in range(16)])  # an engine is copying them out
    time.sleep(0.25)
    read(store, range(16, 32), times=2)
    report = store.promote_hot()
    assert report.promoted == 0 and report.no_room == 16 and hbm_blocks(store, range(16)) == [True] * 16
    store.unpin(ALICE, [held.pin_id])


def test_operator_evict_drops_only_the_hbm_copies(make_store):
    store = make_store()
    put(store, range(8))
    read(store, range(8), times=2)
    store.promote_hot()
    report = store.evict_to_watermark(HBM, 0.0)
    assert (report.evicted, report.demoted, report.bytes) == (0, 8, 8 * BLOCK)
    assert hbm_blocks(store, range(8)) == [False] * 8 and store.hbm.tier.used_bytes == 0
    assert len(store.index) == 8 and [d for _, d, _ in store.get(ALICE, FP, [key(i) for i in range(8)])] == [payload(i) for i in range(8)]


def test_delete_frees_and_zeroes_the_hbm_slot(make_store):
    store = make_store()
    put(store, range(2))
    read(store, range(2), times=2)
    store.promote_hot()
    info = store.pin(ALICE, FP, [key(0)])
    offset, size = info.slots.hbm_offsets[0], info.slots.sizes[0]
    assert store.delete(ALICE, FP, [key(0)]) == 1
    assert store.hbm.tier.used_bytes == 2 * BLOCK  # a reader still holds it
    store.unpin(ALICE, [info.pin_id])
    assert store.hbm.tier.used_bytes == BLOCK
    assert not store.hbm.tier.device.bytes[offset : offset + size].any()  # a secure delete leaves no copy there


def test_a_host_copy_leaving_without_an_ssd_copy_takes_its_hbm_copy_along(make_store):
    # An ssd tier too small for anything: blocks demoted from the host tier leave the store.
    store = make_store(ssd_capacity=16 * KIB)
    put(store, range(2))
    read(store, range(2), times=2)
    assert store.promote_hot().promoted == 2
    put(store, range(2, 60))  # the hot blocks are now the host tier's least recently used
    store.demote_cold()
    assert store.prefix_length(ALICE, FP, [key(0), key(1)]) == 0  # gone, with nothing below them
    assert store.hbm.tier.used_bytes == 0 and store.index.blocks_in(HBM) == 0  # never an HBM-only block


# ---- a device that fails -------------------------------------------------------------------

def test_a_lost_device_drops_the_tier_and_the_store_serves_on(make_store):
    device = HostDeviceMemory(4 * MIB)
    store = make_store(device=device)
    put(store, range(8))
    read(store, range(4), times=2)
    assert store.promote_hot().promoted == 4
    device.fail("GPU fell off the bus")
    read(store, range(4, 8), times=2)
    store.promote_hot()  # the upload fails: the tier is dropped
    assert not store.hbm.available and store.counters["hbm_device_errors"] == 1
    assert [t.tier for t in store.stats().tiers] == [HOST, SSD]
    info = store.pin(ALICE, FP, [key(i) for i in range(8)])
    assert info.slots.tiers == [] and info.hbm_pool_id == 0  # clients copy from the host tier again
    store.unpin(ALICE, [info.pin_id])
    assert [d for _, d, _ in store.get(ALICE, FP, [key(i) for i in range(8)])] == [payload(i) for i in range(8)]
    put(store, range(8, 10))
    read(store, range(8, 10), times=2)
    assert store.promote_hot().promoted == 0 and store.hbm.tier.used_bytes == 0
    assert store.delete(ALICE, FP, [key(0)]) == 1  # bookkeeping goes on without the device


def test_a_device_failing_while_a_slot_is_zeroed_does_not_fail_the_request(make_store):
    device = HostDeviceMemory(4 * MIB)
    store = make_store(device=device)
    put(store, range(2))
    read(store, range(2), times=2)
    store.promote_hot()
    device.fail()
    assert store.delete(ALICE, FP, [key(0)]) == 1  # the release's zeroing fails under the store lock: no raise
    assert store.hbm.tier.lost
    store.promote_hot()
    assert store.index.blocks_in(HBM) == 0
    assert [d for _, d, _ in store.get(ALICE, FP, [key(1)])] == [payload(1)]
    with pytest.raises(DeviceError):
        device.download(0, 1)


# ---- exporting the pool to same-host clients ------------------------------------------------------

def test_the_ipc_handle_is_published_only_to_the_servers_os_user(make_store):
    class Exported(HostDeviceMemory):
        def ipc_handle(self) -> bytes:  # what a GPU's cudaIpcGetMemHandle gives: 64 opaque bytes
            return bytes(range(64))

    store = make_store(device=Exported(4 * MIB))
    path = store.hbm.handle_file
    assert path is not None and path.read_bytes() == bytes(range(64))
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent == store.cfg.data_path.absolute()
    api = StoreAPI(store)
    plane = api.data_plane(ALICE)
    assert plane.hbm_handle_file == str(path) and plane.hbm_size_bytes == 4 * MIB and plane.hbm_pool_id == store.hbm.tier.device.pool_id
    store.cfg.shm = False  # the operator's switch for publishing same-host memory
    assert api.data_plane(ALICE).hbm_handle_file == "" and api.data_plane(ALICE).hbm_size_bytes == 4 * MIB
    # A client that cannot read the file (another OS user; here: it is gone) maps nothing and copies from the host.
    info = DataPlaneInfo(host_id(), hbm_device_uuid="GPU-none", hbm_handle_file=str(path.parent / "absent"), hbm_size=4 * MIB, hbm_pool_id=7)
    assert open_hbm_pool(info) is None
    put(store, range(2))
    read(store, range(2), times=2)
    store.hbm.tier.device.fail()
    store.promote_hot()  # the upload fails: the tier is dropped, and its handle with it
    assert not path.exists() and api.data_plane(ALICE).hbm_size_bytes == 0


# ---- through real server processes -------------------------------------------------------------

HOST_HBM = dict(hbm_memory="16MiB", hbm_backend="host", host_memory="64MiB", ssd_capacity="256MiB")


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def put_and_promote_four(client: KVClient, blocks: list[np.ndarray], hits: int = 2) -> list:
    """Put the blocks as one prompt, pin its first four `hits` times (the policy's threshold) and wait for their promotion."""
    keys = client.block_keys(list(range(len(blocks) * 16)))
    assert client.put(keys, blocks) == [PutOutcome.STORED] * len(blocks)
    for _ in range(hits):
        with client.pin(keys[:4], prefix=True):
            pass
    wait_for(lambda: client.stats()["tiers"].get("hbm", {}).get("blocks") == 4)
    return keys


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_a_server_with_an_hbm_tier_shows_it_everywhere(make_server, fingerprint, transport):
    metrics_port = free_port()
    server = make_server(**HOST_HBM, metrics_port=metrics_port)
    rng = np.random.default_rng(7)
    blocks = [rng.integers(0, 256, BLOCK, dtype=np.uint8) for _ in range(6)]
    with KVClient(server.address, fingerprint, transport=transport) as client:
        keys = put_and_promote_four(client, blocks)
        assert client.hbm_pool() is None  # host memory standing in for a GPU: nothing to map
        with client.pin(keys, prefix=True) as pinned:
            assert pinned.tiers == [Tier.HBM] * 4 + [Tier.HOST] * 2
            assert all(pinned.hbm_offset(i) is not None for i in range(4)) and pinned.hbm_offset(4) is None
            assert pinned.device_ptr(0) is None  # no mapping in this process
            columns = pinned.columns  # what an engine plans its copies from: the same answer, as arrays
            assert columns.offsets.tolist() == [s.offset for s in pinned.slots]
            assert columns.sizes.tolist() == [BLOCK] * 6 and columns.checksums.tolist() == [s.checksum for s in pinned.slots]
            assert columns.tiers.tolist() == [Tier.HBM.value] * 4 + [Tier.HOST.value] * 2
            assert columns.hbm_offsets[:4].tolist() == [pinned.hbm_offset(i) for i in range(4)]
            assert pinned.in_hbm() == [0, 1, 2, 3]
            for i in range(6):
                if pinned.pool_view is not None:
                    pinned.verify(i)  # the host copy is still what the pin hands out
        stats = client.stats()
        assert stats["tiers"]["hbm"]["capacity_bytes"] == 16 << 20 and stats["tiers"]["hbm"]["used_bytes"] == 4 * BLOCK
        assert stats["counters"]["hbm_promotions"] == 4 and stats["counters"]["hits_hbm"] >= 4
        text = run_admin(server, "stats", token=None).stdout
        assert text.splitlines()[1].split()[0] == "hbm" and "4 hbm" in text and "hbm tier" in text
        listed = run_admin(server, "ls", "--tier", "hbm", token=None).stdout
        assert listed.count(" hbm ") == 4 and "4 of 4 matching blocks" in listed
        assert "6 of 6 matching blocks" in run_admin(server, "ls", "--tier", "host", token=None).stdout  # every block has a host copy
        m = scrape(metrics_port)
        assert m[("kvstore_tier_blocks", frozenset({"tier": "hbm"}.items()))] == 4
        assert m[("kvstore_hbm_promotions_total", frozenset())] == 4
        assert m[("kvstore_hits_total", frozenset({"tier": "hbm"}.items()))] >= 4
        evicted = admin_json(server, "evict", "--watermark", "0.00001", "--tier", "hbm", token=None)
        assert (evicted["evicted"], evicted["demoted"]) == (0, 4)
        assert client.stats()["tiers"]["hbm"]["blocks"] == 0
        with client.pin(keys, prefix=True) as pinned:
            assert pinned.tiers == [Tier.HOST] * 6
            assert len(pinned.columns.tiers) == 0 and len(pinned.columns.offsets) == 6
            assert pinned.in_hbm() == []
        assert all(np.array_equal(a, b) for a, b in zip(client.get(keys), blocks))  # evicting from HBM loses nothing


def test_a_server_without_cuda_serves_without_the_tier(make_server, fingerprint):
    if importlib.util.find_spec("cupy") is not None:
        from cupy.cuda import runtime

        try:
            if runtime.getDeviceCount() > 0:
                pytest.skip("this machine has a GPU: the tier would be on (tests/kvstore/test_hbm_gpu.py)")
        except Exception:
            pass
    server = make_server(hbm_memory="64MiB", host_memory="64MiB")
    with KVClient(server.address, fingerprint) as client:
        keys = client.block_keys(list(range(32)))
        client.put(keys, [np.full(BLOCK, 3, np.uint8)] * 2)
        for _ in range(3):
            with client.pin(keys) as pinned:
                assert pinned.tiers == [Tier.HOST] * 2
        assert "hbm" not in client.stats()["tiers"]
    assert server.log().count("HBM tier off") == 1


@pytest.mark.ucx
@pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable")
def test_ucx_gets_that_ask_are_sent_from_the_hbm_copies(tmp_path, fingerprint):
    """A UCX get with FLAG_FROM_HBM is sent from the blocks' HBM copies (host memory standing in for the GPU here;
    tests/kvstore/test_hbm_gpu.py does it GPU to GPU), byte-exact and checked against the blocks' checksums, keyed
    (one UCX round trip) or after a gRPC Pin; a get that does not ask, or blocks without a copy, go from the host pool."""
    # Three reads make a block hot: blocks 4 and 5, read by the first two gets, are not promoted before the third.
    server = ServerProc(tmp_path / "data", flags={**HOST_HBM, "hbm_memory": "32MiB", "host_memory": "128MiB", "hbm_promote_hits": 3},
                        env=UCX_SERVER_ENV).start()
    try:
        rng = np.random.default_rng(11)
        blocks = [rng.integers(0, 256, MIB, dtype=np.uint8) for _ in range(6)]  # 1 MiB: each travels alone

        def sent_from_hbm(client: KVClient) -> int:
            return client.stats()["counters"].get("ucx_hbm_sends", 0)

        with KVClient(server.address, fingerprint, transport="ucx") as client:
            assert client.stats()["client"]["transport"] == "ucx"
            keys = put_and_promote_four(client, blocks, hits=3)
            transport = client.transport
            assert transport.hbm_sends
            outs = [np.zeros(MIB, np.uint8) for _ in blocks]
            client.get(keys, out=outs)  # lands in host memory: nothing to gain from HBM, nothing asked
            assert all(np.array_equal(a, b) for a, b in zip(outs, blocks)) and sent_from_hbm(client) == 0
            transport.prefer_hbm = True
            outs = [np.zeros(MIB, np.uint8) for _ in blocks]
            client.get(keys, out=outs)  # keyed: the server pins, sends blocks 0-3 from HBM and 4-5 from the host pool
            assert client.last_transfer.control_rpcs == 0
            assert all(np.array_equal(a, b) for a, b in zip(outs, blocks))
            assert sent_from_hbm(client) == 4
            got = client.get(keys[2:])  # no output buffers: a gRPC Pin, then the pinned blocks over UCX
            assert all(np.array_equal(a, b) for a, b in zip(got, blocks[2:]))
            assert sent_from_hbm(client) == 6
            eventually(lambda: client.stats()["pins_held"] == 0)
            admin_json(server, "evict", "--watermark", "0.00001", "--tier", "hbm", token=None)
            client.get(keys, out=outs)  # the copies are gone: every block from the host pool, as before
            assert all(np.array_equal(a, b) for a, b in zip(outs, blocks)) and sent_from_hbm(client) == 6
    finally:
        server.stop()
