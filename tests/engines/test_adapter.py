"""StoreAdapter and the checkpoint fingerprint, in process, against a real kvstore server."""
from __future__ import annotations

import shutil

import pytest
import torch

from engines.adapter import ClaimPlan, IncompatibleFingerprintError, StoreAdapter, check_compatible, plan_copies
from engines.fingerprint import checkpoint_fingerprint, checkpoint_revision
from engines.generate import generate_greedy
from kvwire.keys import block_keys
from kvclient.client import SlotRef
from tests.engines.tiny import TINY_CONFIG, make_cache
from tests.serverproc import free_port

BLOCK = 16


@pytest.fixture
def adapter(server, tiny_model, tiny_checkpoint, request):
    """An adapter whose fingerprint is private to the test (model name = test name), so the shared server starts empty for it."""
    cache = make_cache(tiny_model, num_pages=64, block_tokens=BLOCK)
    fp = checkpoint_fingerprint(tiny_checkpoint, TINY_CONFIG, torch.float32, BLOCK, model=request.node.name)
    adapter = StoreAdapter.for_cache(server.address, fp, cache)
    yield adapter
    adapter.close()


def prefilled(model, ids):
    """A cache holding ids' KV (as sequence "s"), and the greedy continuation computed alongside."""
    cache = make_cache(model, num_pages=64, block_tokens=BLOCK)
    out = generate_greedy(model, cache, ids, 8, seq_id="s", keep_cache=True)
    return cache, out


def test_fingerprint_follows_content_dtype_and_block_size(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / tiny_checkpoint.name)
    base = checkpoint_fingerprint(tiny_checkpoint, TINY_CONFIG, torch.float32, BLOCK)
    assert checkpoint_fingerprint(copy, TINY_CONFIG, torch.float32, BLOCK) == base  # content, not path
    assert base.dtype == "float32" and base.num_layers == TINY_CONFIG.num_hidden_layers
    assert checkpoint_fingerprint(tiny_checkpoint, TINY_CONFIG, torch.bfloat16, BLOCK).id != base.id
    assert checkpoint_fingerprint(tiny_checkpoint, TINY_CONFIG, torch.float32, 32).id != base.id
    with open(copy / "model.safetensors", "r+b") as f:  # one flipped byte of weights is a new revision
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert checkpoint_revision(copy) != base.revision
    assert checkpoint_fingerprint(copy, TINY_CONFIG, torch.float32, BLOCK, revision="v7").revision == "v7"


def test_incompatible_fingerprint_is_refused(tiny_model, tiny_checkpoint):
    cache = make_cache(tiny_model, block_tokens=BLOCK)
    for dtype, block in ((torch.bfloat16, BLOCK), (torch.float32, 8)):
        with pytest.raises(IncompatibleFingerprintError):
            check_compatible(checkpoint_fingerprint(tiny_checkpoint, TINY_CONFIG, dtype, block, revision="r"), cache)


def test_block_keys_cover_full_blocks_only(adapter, prompt_ids):
    ids = (prompt_ids * 3)[:50]
    assert adapter.block_keys(ids) == block_keys(adapter.fingerprint, ids)
    assert len(adapter.block_keys(ids)) == 3


def test_upload_then_download_reproduces_generation_in_other_pages(adapter, tiny_model, prompt_ids):
    ids = (prompt_ids * 3)[:61]
    source, expected = prefilled(tiny_model, ids)
    keys = adapter.block_keys(ids)
    payload = source.gather_blocks(source.block_table("s")[: len(keys)])
    with adapter.session() as client:
        assert adapter.claim(client, keys, 1.0) == ClaimPlan(0, (0, 1, 2))
        adapter.upload(client, keys, payload)
        assert adapter.available_prefix(client, keys, 1.0) == len(keys)
        fetched = adapter.download(client, keys)
    assert torch.equal(fetched, payload)

    target = make_cache(tiny_model, num_pages=64, block_tokens=BLOCK)
    target.allocate("other", 1)  # so the sequence lands on different pages
    target.allocate("t", len(ids) + 8)
    target.scatter_blocks(target.block_table("t")[: len(keys)], fetched)
    got = generate_greedy(tiny_model, target, ids, 8, seq_id="t", num_cached_tokens=len(keys) * BLOCK)
    assert got == expected


def test_claim_leases_only_what_is_missing_and_waits_for_others(adapter, tiny_model, prompt_ids):
    ids = (prompt_ids * 3)[:80]  # 5 full blocks
    source, _ = prefilled(tiny_model, ids)
    keys = adapter.block_keys(ids)
    payload = source.gather_blocks(source.block_table("s")[: len(keys)])
    with adapter.session() as first, adapter.session() as second:
        assert first.client_id != second.client_id
        adapter.upload(first, keys[:2], payload[:2])
        assert adapter.claim(first, keys, 1.0) == ClaimPlan(2, (2, 3, 4))
        # Blocks 2..4 are leased by `first`: `second` waits, times out and computes them unleased.
        assert adapter.claim(second, keys, 0.2) == ClaimPlan(2, (), waited=True)
        first.release(keys[2:])
        # Holder gone: the waiter re-acquires, so what it computes is still published.
        assert adapter.claim(second, keys, 5.0) == ClaimPlan(2, (2, 3, 4))
        adapter.upload(second, keys[2:], payload[2:])
        assert adapter.claim(first, keys, 1.0) == ClaimPlan(5, ())


def test_fetch_falls_back_to_nothing_when_a_block_vanished(adapter, tiny_model, prompt_ids):
    ids = (prompt_ids * 3)[:48]
    source, _ = prefilled(tiny_model, ids)
    keys = adapter.block_keys(ids)
    with adapter.session() as client:
        adapter.upload(client, keys, source.gather_blocks(source.block_table("s")[:3]))
        client.delete(keys[1:2])
        assert len(adapter.fetch(client, keys)) == 0
        assert len(adapter.fetch(client, keys[:1])) == 1


def test_upload_refuses_a_payload_of_the_wrong_shape(adapter):
    keys = adapter.block_keys(list(range(BLOCK)))
    with adapter.session() as client, pytest.raises(ValueError, match="does not match"):
        adapter.upload(client, keys, torch.zeros((1, *adapter.block_shape), dtype=torch.float64))



def test_plan_copies_merges_back_to_back_slots_and_splits_groups():
    def slot(index, offset):
        return SlotRef(index, offset, 100, 1, 0)

    slots = [slot(0, 1000), slot(1, 1100), slot(2, 1200), slot(3, 5000), slot(4, 5100)]
    groups = plan_copies(slots, 100, group_bytes=1 << 20)
    assert groups == [([(0, 1000, 300), (300, 5000, 200)], slots)]
    groups = plan_copies(slots, 100, group_bytes=200)
    assert [copies for copies, _ in groups] == [[(0, 1000, 200)], [(200, 1200, 100), (300, 5000, 100)], [(400, 5100, 100)]]
    assert [s for _, members in groups for s in members] == slots


def test_prefix_load_takes_the_cached_run_and_leaves_the_last_block_to_compute(adapter, tiny_model, prompt_ids):
    ids = (prompt_ids * 3)[:64]  # exactly 4 blocks
    source, _ = prefilled(tiny_model, ids)
    keys = adapter.block_keys(ids)
    payload = source.gather_blocks(source.block_table("s")[:4])
    with adapter.session() as client:
        adapter.upload(client, keys[:2] + keys[3:], payload[[0, 1, 3]])
        with adapter.prepare_prefix_load(client, keys, len(ids)) as load:
            assert load.num_blocks == 2  # block 2 is missing: the run ends there
            assert torch.equal(load.payload, payload[:2])
        adapter.upload(client, keys[2:3], payload[2:3])
        with adapter.prepare_prefix_load(client, keys, len(ids)) as load:
            assert load.num_blocks == 3  # all four cached, but the last token's block is computed
        with adapter.prepare_prefix_load(client, keys, len(ids) + 1) as load:
            assert load.num_blocks == 4


def test_a_client_a_store_error_escapes_from_is_closed_not_pooled_again(adapter, tiny_model):
    """After a store restart a pooled client still maps the old server's pool: one error, and it is replaced."""
    from kvclient.errors import BlockNotFoundError, ChecksumMismatchError, UnavailableError

    with adapter.session() as client:
        kept = client
    with pytest.raises(ValueError), adapter.session() as client:
        assert client is kept  # pooled
        raise ValueError("not the store's fault")
    with pytest.raises(BlockNotFoundError), adapter.session() as client:
        assert client is kept  # still pooled after an error of the caller's own
        client.get(adapter.block_keys(list(range(BLOCK))))
    with pytest.raises(ChecksumMismatchError), adapter.session() as client:
        assert client is kept  # a miss is the store's answer: still pooled
        raise ChecksumMismatchError("what a read through the old server's pool raises after a restart")
    with adapter.session() as client:
        assert client is not kept
    with pytest.raises(UnavailableError, match="did not answer"):  # a store that cannot be reached lends no client
        with StoreAdapter(f"127.0.0.1:{free_port()}", adapter.fingerprint, adapter.block_shape, adapter.dtype).session():
            pass
    assert adapter.no_load().num_blocks == 0
