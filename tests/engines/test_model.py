"""The paged model against a naive full-attention oracle, and against itself split in every useful way."""
import pytest
import torch
from safetensors.torch import load_file

from engines.attention import SeqChunk
from tests.engines.naive_llama import naive_logits
from tests.engines.tiny import TINY_CONFIG, make_cache

ATOL = 1e-4


def prefill(model, cache, seq_id, ids, start=0):
    table = cache.allocate(seq_id, start + len(ids))
    with torch.inference_mode():
        return model(cache, [SeqChunk(ids, start, table)])


def test_paged_forward_matches_naive_reference(tiny_model, tiny_checkpoint, prompt_ids):
    expected = naive_logits(load_file(str(tiny_checkpoint / "model.safetensors")), TINY_CONFIG, prompt_ids)
    got = prefill(tiny_model, make_cache(tiny_model), "s", prompt_ids)
    assert got.shape == (len(prompt_ids), TINY_CONFIG.vocab_size)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("split", [1, 4, 6, 16, 23])  # block-aligned and not (block_tokens = 4)
def test_prefix_then_rest_equals_whole_prompt(tiny_model, prompt_ids, split):
    whole = prefill(tiny_model, make_cache(tiny_model), "s", prompt_ids)
    cache = make_cache(tiny_model)
    head = prefill(tiny_model, cache, "s", prompt_ids[:split])
    rest = prefill(tiny_model, cache, "s", prompt_ids[split:], start=split)
    torch.testing.assert_close(torch.cat([head, rest]), whole, atol=ATOL, rtol=0)


def test_decode_steps_equal_prefill_logits(tiny_model, prompt_ids):
    whole = prefill(tiny_model, make_cache(tiny_model), "s", prompt_ids)
    cache = make_cache(tiny_model)
    prefill(tiny_model, cache, "s", prompt_ids[:10])
    for pos in range(10, 20):
        step = prefill(tiny_model, cache, "s", prompt_ids[pos : pos + 1], start=pos)
        torch.testing.assert_close(step[0], whole[pos], atol=ATOL, rtol=0)


def test_batched_chunks_equal_separate_passes(tiny_model, prompt_ids):
    """A pass mixing a fresh prefill, a continued prefill and decodes gives each sequence its own logits."""
    cache = make_cache(tiny_model)
    prompts = {"a": prompt_ids[:13], "b": prompt_ids[5:40], "c": prompt_ids[20:27], "d": prompt_ids[::2]}
    separate = {k: prefill(tiny_model, make_cache(tiny_model), k, v) for k, v in prompts.items()}
    prefill(tiny_model, cache, "b", prompts["b"][:8])
    prefill(tiny_model, cache, "c", prompts["c"][:6])
    prefill(tiny_model, cache, "d", prompts["d"][:-1])
    starts = {"a": 0, "b": 8, "c": 6, "d": len(prompts["d"]) - 1}
    chunks = []
    for k, start in starts.items():
        table = cache.allocate(k, len(prompts[k]))
        chunks.append(SeqChunk(prompts[k][start:], start, table))
    with torch.inference_mode():
        batched = tiny_model(cache, chunks)
        last = tiny_model(make_cache(tiny_model), [SeqChunk(prompts["a"], 0, list(range(4)))], last_only=True)
    got = torch.split(batched, [c.num_tokens for c in chunks])
    for (k, start), logits in zip(starts.items(), got):
        torch.testing.assert_close(logits, separate[k][start:], atol=ATOL, rtol=0)
    torch.testing.assert_close(last[0], separate["a"][-1], atol=ATOL, rtol=0)


def test_consecutive_pages_are_read_in_place_and_agree_with_scattered_ones(tiny_model, prompt_ids):
    from engines.attention import AttentionMetadata

    n_pages = -(-len(prompt_ids) // 4)
    consecutive, scattered = list(range(3, 3 + n_pages)), list(range(3 * n_pages, 0, -3))
    assert AttentionMetadata.build([SeqChunk(prompt_ids, 0, consecutive)], 4, torch.device("cpu")).page_run == 3
    assert AttentionMetadata.build([SeqChunk(prompt_ids, 0, scattered)], 4, torch.device("cpu")).page_run is None
    results = []
    for table in (consecutive, scattered):
        cache = make_cache(tiny_model)
        with torch.inference_mode():
            head = tiny_model(cache, [SeqChunk(prompt_ids[:18], 0, table)])
            rest = tiny_model(cache, [SeqChunk(prompt_ids[18:], 18, table)])
        results.append(torch.cat([head, rest]))
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)


def test_short_block_table_is_refused(tiny_model, prompt_ids):
    cache = make_cache(tiny_model)
    with pytest.raises(ValueError, match="block table"):
        tiny_model(cache, [SeqChunk(prompt_ids[:9], 0, [0, 1])])


def test_matches_hugging_face_llama(tiny_model, tiny_checkpoint, prompt_ids):
    """The real LlamaForCausalLM (transformers, a test dependency) on the same weights."""
    transformers = pytest.importorskip("transformers")
    doc = TINY_CONFIG.to_dict()
    doc["rope_parameters"] = {"rope_type": "default", "rope_theta": TINY_CONFIG.rope_theta}
    hf_config = transformers.LlamaConfig(**{k: v for k, v in doc.items() if k != "torch_dtype"})
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.load_state_dict(load_file(str(tiny_checkpoint / "model.safetensors")), strict=False)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([prompt_ids])).logits[0].float()
    got = prefill(tiny_model, make_cache(tiny_model), "s", prompt_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
