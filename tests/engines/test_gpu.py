"""CUDA runs of the same model: they must agree with the CPU, and the store path must hold in bf16."""
import pytest
import torch

from engines.adapter import StoreAdapter, StreamedPrefixLoad
from engines.attention import SeqChunk
from engines.checkpoint import load_checkpoint
from engines.fingerprint import checkpoint_fingerprint
from engines.generate import generate_greedy
from kvclient.errors import ChecksumMismatchError
from tests.engines.tiny import BLOCK_TOKENS, TINY_CONFIG, gpu_only, make_cache

pytestmark = [pytest.mark.gpu, gpu_only]


def test_cuda_matches_cpu(tiny_model, tiny_checkpoint, prompt_ids):
    gpu_model = load_checkpoint(tiny_checkpoint, device="cuda")
    cpu_cache, gpu_cache = make_cache(tiny_model), make_cache(gpu_model)
    assert gpu_cache.device.type == "cuda"
    with torch.inference_mode():
        cpu = tiny_model(cpu_cache, [SeqChunk(prompt_ids, 0, cpu_cache.allocate("s", len(prompt_ids)))])
        gpu = gpu_model(gpu_cache, [SeqChunk(prompt_ids, 0, gpu_cache.allocate("s", len(prompt_ids)))])
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
    assert generate_greedy(gpu_model, gpu_cache, prompt_ids, 12, seq_id="g") == generate_greedy(
        tiny_model, cpu_cache, prompt_ids, 12, seq_id="g"
    )


def test_host_staged_blocks_reproduce_generation_on_cuda(tiny_checkpoint, prompt_ids):
    model = load_checkpoint(tiny_checkpoint, device="cuda")
    cache = make_cache(model)
    expected = generate_greedy(model, cache, prompt_ids, 10, seq_id="a", keep_cache=True)
    full_blocks = len(prompt_ids) // cache.block_tokens
    host_payload = cache.gather_blocks(cache.block_table("a")[:full_blocks]).cpu()
    cache.free("a")
    other = make_cache(model)
    other.allocate("pad", 7 * cache.block_tokens)  # so b lands on different page ids
    other.allocate("b", len(prompt_ids) + 10)
    other.scatter_blocks(other.block_table("b")[:full_blocks], host_payload)
    got = generate_greedy(model, other, prompt_ids, 10, seq_id="b", num_cached_tokens=full_blocks * cache.block_tokens)
    assert got == expected


def test_bf16_prefix_then_rest_close_to_whole(tiny_checkpoint, prompt_ids):
    model = load_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    split = 16
    with torch.inference_mode():
        cache = make_cache(model)
        assert cache.dtype == torch.bfloat16
        whole = model(cache, [SeqChunk(prompt_ids, 0, cache.allocate("w", len(prompt_ids)))])
        table = cache.allocate("s", len(prompt_ids))
        head = model(cache, [SeqChunk(prompt_ids[:split], 0, table)])
        rest = model(cache, [SeqChunk(prompt_ids[split:], split, table)])
    torch.testing.assert_close(torch.cat([head, rest]), whole, atol=0.05, rtol=0)


def cuda_prefix(server, checkpoint, prompt_ids, block_tokens: int, name: str, new_tokens: int):
    """A CUDA model, the prompt's greedy continuation, its full blocks' payload, and an shm adapter."""
    model = load_checkpoint(checkpoint, device="cuda")
    source = make_cache(model, block_tokens=block_tokens)
    expected = generate_greedy(model, source, prompt_ids, new_tokens, seq_id="s", keep_cache=True)
    full_blocks = len(prompt_ids) // block_tokens
    payload = source.gather_blocks(source.block_table("s")[:full_blocks])
    fp = checkpoint_fingerprint(checkpoint, TINY_CONFIG, torch.float32, block_tokens, model=name)
    return model, source, expected, payload, StoreAdapter.for_cache(server.address, fp, source, transport="shm")


@pytest.mark.parametrize("block_tokens", [4, 16])  # 2 KiB blocks in 4 KiB slots (one copy each); 8 KiB back to back
def test_download_to_cuda_dmas_from_the_registered_pool(server, tiny_checkpoint, prompt_ids, block_tokens, request):
    _, source, _, payload, adapter = cuda_prefix(server, tiny_checkpoint, prompt_ids, block_tokens, request.node.name, 1)
    full_blocks = len(payload)
    try:
        keys = adapter.block_keys(prompt_ids)
        with adapter.session() as client:
            adapter.upload(client, keys, payload)
            fetched = adapter.download(client, keys)
            assert adapter._registered and fetched.device == source.device
            assert torch.equal(fetched, payload)
            assert client.last_transfer.extra["copies"] <= (full_blocks if block_tokens == 4 else 1)
            with client.pin(keys[1:2]) as pinned:  # find block 1's slot, then flip a byte of it in the pool: the GPU path must refuse it
                offset = pinned.slots[0].offset
            client.transport.pool_view()[offset] ^= 0xFF
            with pytest.raises(ChecksumMismatchError):
                adapter.download(client, keys)
    finally:
        adapter.close()


@pytest.mark.parametrize("graphs", [False, True])
def test_prefix_streams_layer_by_layer_into_pages_and_is_checked(server, tiny_checkpoint, prompt_ids, request, graphs):
    bt = BLOCK_TOKENS
    model, _, expected, payload, adapter = cuda_prefix(server, tiny_checkpoint, prompt_ids, bt, request.node.name, 6)
    model.use_cuda_graphs(64 if graphs else 0)
    full_blocks = len(payload)
    try:
        keys = adapter.block_keys(prompt_ids)
        with adapter.session() as client:
            adapter.upload(client, keys, payload)
            target = make_cache(model)
            target.allocate("pad", 5 * bt)  # other page ids than the source's
            table = target.allocate("b", len(prompt_ids) + 6)
            with torch.inference_mode(), adapter.prepare_prefix_load(client, keys, len(prompt_ids)) as load:
                assert isinstance(load, StreamedPrefixLoad) and load.num_blocks == full_blocks
                assert load.stats.control_rpcs == 1  # found and pinned in one round trip
                load.start(target, table)
                start = full_blocks * bt
                logits = model(target, [SeqChunk(prompt_ids[start:], start, table)], last_only=True,
                               before_layer=load.wait_for_layer)
                load.finish()
            assert torch.equal(target.gather_blocks(table[:full_blocks]), payload)
            assert int(logits.argmax(-1)[0]) == expected[0]
            if load.stats.extra["host_copy"] == "kernel":  # the gather kernel: a tiny model's layers in one launch
                assert load.stats.extra["copies"] == 1
            else:
                assert load.stats.extra["copies"] == 2 * TINY_CONFIG.num_hidden_layers  # one run: K and V per layer
            assert load.dma_ms() > 0
            assert load.stats.extra["checked_on"] == "gpu"  # the XXH3 kernel, in the pages
            target.free("b")
            assert generate_greedy(model, target, prompt_ids, 6, seq_id="c", num_cached_tokens=0) == expected

            pinned = client.pin(keys[1:2])
            pinned.release(failed=True)
            client.transport.pool_view()[pinned.slots[0].offset + 7] ^= 0xFF
            table = target.allocate("d", len(prompt_ids))
            with pytest.raises(ChecksumMismatchError), adapter.prepare_load(client, keys) as load:
                load.start(target, table)
                load.finish()
            assert client.stats()["pins_held"] == 0
    finally:
        adapter.close()


def test_cuda_graphs_replay_what_eager_computes(tiny_checkpoint, prompt_ids):
    """Whole prompts, a rest after a prefix, decode steps and a batch, in buckets with padding; passes
    longer than the largest bucket run eager; the before_layer hook still gates every layer."""
    eager = load_checkpoint(tiny_checkpoint, device="cuda")
    graphed = load_checkpoint(tiny_checkpoint, device="cuda").use_cuda_graphs(max_tokens=64)
    assert len(prompt_ids) > 64

    def passes(model):
        cache, out, hooked = make_cache(model), [], []
        with torch.inference_mode():
            table = cache.allocate("a", len(prompt_ids) + 3)
            out.append(model(cache, [SeqChunk(prompt_ids[:37], 0, table)], before_layer=hooked.append))
            out.append(model(cache, [SeqChunk(prompt_ids[37:], 37, table)]))  # 46 tokens: eager
            for pos in range(len(prompt_ids), len(prompt_ids) + 3):
                token = int(out[-1][-1].argmax())
                out.append(model(cache, [SeqChunk([token], pos, table)]))
            other = cache.allocate("b", 20)
            out.append(model(cache, [SeqChunk(prompt_ids[:20], 0, other), SeqChunk([7], len(prompt_ids) + 3, table)]))
            whole = model(make_cache(model), [SeqChunk(prompt_ids, 0, list(range(len(prompt_ids) // 4 + 1)))],
                          last_only=True)
        return out, whole, hooked

    (expected, whole, _), (got, whole_graphed, hooked) = passes(eager), passes(graphed)
    assert hooked == list(range(TINY_CONFIG.num_hidden_layers))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    torch.testing.assert_close(whole_graphed, whole, atol=1e-4, rtol=0)
    assert set(graphed._graphs._buckets) == {1, 32, 64}  # 37 -> 64; decode steps -> 1; the batch of 21 -> 32
