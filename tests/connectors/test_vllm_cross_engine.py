"""vLLM and the bundled engine reuse each other's prefixes through kvstore (the connector's `canonical` layout).

Both sides run the same checkpoint with 128-token blocks in float32: vLLM in its own process
(vllmproc.py), the bundled engine in this one through its StoreAdapter. Each side's greedy
answer from the other's blocks must equal its own recompute.
"""
from __future__ import annotations

import pytest
import torch

from engines.adapter import StoreAdapter
from engines.checkpoint import load_checkpoint
from engines.fingerprint import checkpoint_fingerprint
from engines.generate import generate_greedy
from engines.paged_cache import PagedKVCache
from kvwire.keys import Fingerprint
from tests.connectors.test_vllm_connector import job, prompt
from tests.connectors.vllmproc import BLOCK_TOKENS, make_checkpoint, requests, run_vllm, stats, tokens, vllm_missing
from tests.serverproc import ServerProc

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(bool(vllm_missing()), reason=vllm_missing() or "vLLM present")]

FROM_BUNDLED = tokens(2 * BLOCK_TOKENS, seed=6)  # computed by the bundled engine, loaded by vLLM
FROM_VLLM = tokens(2 * BLOCK_TOKENS, seed=7)  # computed by vLLM, loaded by the bundled engine
NEW_TOKENS = 8


def test_vllm_and_bundled_engine_reuse_each_others_prefixes(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "tiny-llama")
    model = load_checkpoint(checkpoint, dtype=torch.float32)
    fingerprint = checkpoint_fingerprint(checkpoint, model.config, torch.float32, BLOCK_TOKENS)

    def bundled(prompt_ids: list[int], cached: torch.Tensor | None = None, keep: bool = False) -> tuple[list[int], PagedKVCache]:
        cache = PagedKVCache.for_model(model.config, 16, BLOCK_TOKENS, dtype=torch.float32, device="cpu")
        cache.allocate("other", 1)  # so the prompt lands on pages other than the writer's
        cached_tokens = 0
        if cached is not None:
            cache.allocate("s", len(prompt_ids) + NEW_TOKENS)
            cache.scatter_blocks(cache.block_table("s")[: len(cached)], cached)
            cached_tokens = len(cached) * BLOCK_TOKENS
        out = generate_greedy(model, cache, prompt_ids, NEW_TOKENS, seq_id="s", num_cached_tokens=cached_tokens, keep_cache=keep)
        return out, cache

    store = ServerProc(tmp_path / "store", flags={"host_memory": "256MiB", "ssd_capacity": "1GiB"}).start()
    adapter = StoreAdapter(store.address, fingerprint, PagedKVCache.for_model(model.config, 1, BLOCK_TOKENS).block_shape, torch.float32)
    try:
        # The bundled engine computes a prefix and publishes it, as its prefill worker does.
        written = prompt(FROM_BUNDLED, 0)
        _, cache = bundled(written, keep=True)
        keys = adapter.block_keys(written)
        with adapter.session() as client:
            adapter.upload(client, keys, cache.gather_blocks(cache.block_table("s")[: len(keys)]))

        # vLLM (canonical layout): stores its own prefix, then answers a prompt on the bundled engine's.
        vllm_reader = prompt(FROM_BUNDLED, 1)
        report = run_vllm(tmp_path, "canonical", checkpoint=str(checkpoint), store=store.address, extra={"layout": "canonical"},
                          batches=[[job(prompt(FROM_VLLM, 0), NEW_TOKENS)], [job(vllm_reader, NEW_TOKENS)]])
        cold = run_vllm(tmp_path, "cold", checkpoint=str(checkpoint), store=None, batches=[[job(vllm_reader, NEW_TOKENS)]])

        # The bundled engine answers a prompt on vLLM's prefix from vLLM's blocks.
        bundled_reader = prompt(FROM_VLLM, 1)
        with adapter.session() as client:
            from_vllm = adapter.download(client, adapter.block_keys(bundled_reader))
        reused, _ = bundled(bundled_reader, cached=from_vllm)
        recomputed, own = bundled(bundled_reader, keep=True)
        own_blocks = own.gather_blocks(own.block_table("s")[:2])
    finally:
        adapter.close()
        store.stop()

    assert Fingerprint.from_canonical(report["sessions"][0]["fingerprint"].encode()) == fingerprint  # one namespace
    assert stats(report)["blocks_saved"] == 2 and stats(report)["blocks_loaded"] == 2
    loaded = requests(report)[1]
    assert loaded["num_cached_tokens"] == len(FROM_BUNDLED)  # vLLM computed only the tail...
    assert loaded["tokens"] == requests(cold)[0]["tokens"]  # ...and answered as it does alone
    torch.testing.assert_close(from_vllm, own_blocks, rtol=0, atol=1e-4)  # vLLM's K and V, converted, are the bundled engine's
    assert reused == recomputed  # and the bundled engine answers from them as from its own
