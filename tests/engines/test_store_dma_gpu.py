"""The gather kernel (csrc/paged_gather.cu) against the copy engines on a GPU: the same bytes in the same pages,
for layouts the copy plan cannot merge (scattered pool slots, pages out of order, a short last layer group),
and through a real server's pool with the in-page checksum and the unpin after landing."""
from __future__ import annotations

import mmap
import time

import numpy as np
import pytest
import torch

from engines.layerwise import CacheGeometry, plan_layer_copies, run_on_cuda
from engines.paged_cache import PagedKVCache
from engines.paged_gather import gather_kernel, kernel_error, layer_groups, plan_gather
from engines.store_dma import DmaWorkers, RegisteredPool, StreamedPrefixLoad
from kvclient.client import KVClient
from kvclient.errors import ChecksumMismatchError
from kvwire.keys import block_keys
from tests.conftest import make_fingerprint
from tests.engines.tiny import gpu_only

pytestmark = [pytest.mark.gpu, gpu_only]

LAYERS, HEADS, DIM, BLOCK_TOKENS = 5, 2, 64, 16  # bf16: 4 KiB parts, 40 KiB blocks


def new_cache(pages: int = 64) -> PagedKVCache:
    return PagedKVCache(LAYERS, HEADS, DIM, pages, BLOCK_TOKENS, dtype=torch.bfloat16, device="cuda")


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)  # compare bytes: random bytes make NaNs


@pytest.fixture
def registered():
    """An anonymous mapping registered as the store's pool is: page-locked and mapped for the GPU."""
    size = 64 * new_cache(1).block_bytes
    area = mmap.mmap(-1, size)
    array = np.frombuffer(area, dtype=np.uint8)
    array[:] = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
    pool = RegisteredPool(array)
    yield pool
    pool.close()
    del array
    area.close()


def test_gather_kernel_matches_copy_engines_for_scattered_slots_and_a_short_last_group(registered):
    kernel = gather_kernel()
    assert kernel is not None, kernel_error()
    assert registered.device_ptr is not None
    reference, gathered = new_cache(), new_cache()
    geometry, bb = CacheGeometry.of(gathered.kv), gathered.block_bytes
    slots = [0, 1, 2, 9, 4, 30, 31, 17, 5, 60, 12, 13, 14, 40, 41, 42, 43, 7, 55, 21, 22, 3, 63]  # runs, gaps, descents
    offsets = [s * bb for s in slots]
    pages = [10, 11, 12, 13, 2, 3, 40, 41, 42, 0, 1, 20, 22, 24, 26, 5, 6, 7, 50, 51, 52, 53, 63]
    stream = torch.cuda.Stream()

    copy_plan = plan_layer_copies(geometry, pages, offsets)
    for layer in range(LAYERS):
        run_on_cuda(copy_plan[layer], reference.kv.data_ptr(), registered.host.data_ptr(), stream)

    plan = plan_gather(geometry, pages, offsets, registered.host.numel(), registered.device_ptr, gathered.kv.data_ptr())
    groups = layer_groups(LAYERS, 2 * len(pages) * geometry.half_bytes, min_bytes=400 << 10)
    assert groups == [(0, 3), (3, 5)]  # the last group shorter than the first
    launch = kernel.bind(plan, kernel.upload(plan, gathered.device, stream), gathered.kv.data_ptr(), registered.device_ptr, stream, ctas=7)
    for begin, end in groups:
        launch(begin, end)
    stream.synchronize()

    assert torch.equal(raw(gathered.kv), raw(reference.kv))
    pool = registered.host
    for page, offset in zip(pages, offsets):  # and both are the pool's bytes, page by page
        assert torch.equal(raw(gathered.kv[:, :, page]).cpu(), pool[offset: offset + bb])
    untouched = sorted(set(range(64)) - set(pages))
    assert not raw(gathered.kv[:, :, untouched]).any()


def test_one_layer_group_lands_only_its_layers(registered):
    kernel = gather_kernel()
    cache = new_cache()
    geometry = CacheGeometry.of(cache.kv)
    plan = plan_gather(geometry, [4, 9], [0, 3 * cache.block_bytes], registered.host.numel(), registered.device_ptr, cache.kv.data_ptr())
    stream = torch.cuda.Stream()
    kernel.bind(plan, kernel.upload(plan, cache.device, stream), cache.kv.data_ptr(), registered.device_ptr, stream)(1, 3)
    stream.synchronize()
    assert raw(cache.kv[1:3, :, [4, 9]]).any()
    assert not raw(cache.kv[[0, 3, 4]]).any()


def wait_unpinned(client: KVClient, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.stats()["pins_held"]:
        assert time.monotonic() < deadline, "the pin outlived its load"
        time.sleep(0.05)


@pytest.mark.parametrize("host_copy", ["kernel", "copy_engines"])
def test_streamed_load_from_scattered_server_slots_is_exact_checked_and_unpinned(server, host_copy):
    fingerprint = make_fingerprint(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, block_tokens=BLOCK_TOKENS,
                                   dtype="bfloat16", model=f"gather-{host_copy}")
    client = KVClient(server.address, fingerprint=fingerprint, transport="shm")
    registered = RegisteredPool(client.transport.pool_view())
    try:
        wanted = block_keys(fingerprint, list(range(12 * BLOCK_TOKENS)), None)
        other = block_keys(fingerprint, list(range(1000, 1000 + 12 * BLOCK_TOKENS)), None)
        cache = new_cache()
        payload = torch.randn((12, *cache.block_shape)).to(torch.bfloat16)
        # Interleaved with another prompt's blocks, so the wanted ones sit in every other slot of the pool.
        client.put([k for pair in zip(wanted, other) for k in pair], [b for b in payload for _ in range(2)])
        pages = [30, 31, 32, 3, 4, 50, 51, 52, 53, 8, 60, 1]
        with client.pin(wanted) as probe:
            steps = np.diff([s.offset for s in probe.slots])
        assert (steps != cache.block_bytes).any(), "the layout under test is not scattered"

        load = StreamedPrefixLoad(DmaWorkers(host_copy=host_copy), registered, client.pin(wanted))
        with load:
            load.start(cache, pages)
            for layer in range(LAYERS):
                load.wait_for_layer(layer)
            load.finish()
        assert load.stats.extra["host_copy"] == host_copy
        assert load.stats.extra["checked_on"] == "gpu"
        assert torch.equal(raw(cache.gather_blocks(pages)), raw(payload.cuda()))
        wait_unpinned(client)  # a landed, checked load's unpin rides on a later call or the unpin thread

        with client.pin(wanted[5:6]) as probe:  # a flipped byte in the pool: the check in the pages refuses it
            offset = probe.slots[0].offset
        client.transport.pool_view()[offset + 100] ^= 0xFF
        with pytest.raises(ChecksumMismatchError), StreamedPrefixLoad(DmaWorkers(host_copy=host_copy), registered,
                                                                      client.pin(wanted)) as bad:
            bad.start(new_cache(), pages)
            bad.finish()
        assert client.stats()["pins_held"] == 0
    finally:
        registered.close()
        client.close()


def test_a_load_whose_plan_is_refused_gives_back_its_pin_and_its_table_slot(server):
    """A page outside the cache is refused at start (ValueError, before any copy); leaving the load then drops the pin
    and hands the table slot back, so later loads neither wait for it nor find the ring grown."""
    fingerprint = make_fingerprint(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, block_tokens=BLOCK_TOKENS,
                                   dtype="bfloat16", model="refused-plan")
    client = KVClient(server.address, fingerprint=fingerprint, transport="shm")
    registered = RegisteredPool(client.transport.pool_view())
    workers = DmaWorkers()
    try:
        keys = block_keys(fingerprint, list(range(4 * BLOCK_TOKENS)), None)
        cache = new_cache()
        payload = torch.randn((4, *cache.block_shape)).to(torch.bfloat16)
        client.put(keys, payload)
        for _ in range(3):
            with pytest.raises(ValueError, match="a page outside the cache's 64"), \
                    StreamedPrefixLoad(workers, registered, client.pin(keys)) as load:
                load.start(cache, [1, 2, 64, 3])
            ring = workers.lane(cache.device).tables
            assert ring._slots and not any(slot.busy for slot in ring._slots)
        wait_unpinned(client)
        with StreamedPrefixLoad(workers, registered, client.pin(keys)) as load:  # the slot serves the next load
            load.start(cache, [1, 2, 63, 3])
            for layer in range(LAYERS):
                load.wait_for_layer(layer)
            load.finish()
        assert torch.equal(raw(cache.gather_blocks([1, 2, 63, 3])), raw(payload.cuda()))
    finally:
        registered.close()
        client.close()
