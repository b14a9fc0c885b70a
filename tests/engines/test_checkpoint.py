import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from engines.checkpoint import (
    CheckpointError, load_checkpoint, random_state_dict, save_checkpoint, save_random_checkpoint, tensor_shapes,
)
from engines.config import ModelConfig
from engines.model import LlamaForCausalLM
from engines.attention import SeqChunk
from tests.engines.tiny import SEED, TINY_CONFIG, make_cache


def logits_of(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    cache = make_cache(model)
    table = cache.allocate("s", len(ids))
    with torch.inference_mode():
        return model(cache, [SeqChunk(ids, 0, table)])


def test_files_use_hf_names(tiny_checkpoint):
    names = set(load_file(str(tiny_checkpoint / "model.safetensors")))
    assert names == set(tensor_shapes(TINY_CONFIG))
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"} <= names
    assert ModelConfig.from_json(tiny_checkpoint) == TINY_CONFIG


def test_save_load_round_trip_gives_identical_logits(tiny_checkpoint, tmp_path, prompt_ids):
    in_memory = LlamaForCausalLM(TINY_CONFIG)
    in_memory.load_state_dict(random_state_dict(TINY_CONFIG, SEED))
    loaded = load_checkpoint(tiny_checkpoint)
    resaved = load_checkpoint(save_checkpoint(tmp_path / "again", TINY_CONFIG, loaded.state_dict()))
    expected = logits_of(in_memory, prompt_ids)
    assert torch.equal(logits_of(loaded, prompt_ids), expected)
    assert torch.equal(logits_of(resaved, prompt_ids), expected)


def test_random_init_is_seeded_and_non_degenerate(tiny_model, prompt_ids):
    a, b = random_state_dict(TINY_CONFIG, 7), random_state_dict(TINY_CONFIG, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], random_state_dict(TINY_CONFIG, 8)["lm_head.weight"])
    logits = logits_of(tiny_model, prompt_ids)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.05
    assert len(set(logits.argmax(-1).tolist())) > 3  # predictions vary with position


def test_tied_embeddings_and_dtype(tmp_path, prompt_ids):
    config = dataclasses.replace(TINY_CONFIG, tie_word_embeddings=True)
    path = save_random_checkpoint(tmp_path, config, seed=3, dtype=torch.bfloat16)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    model = load_checkpoint(path)
    assert model.dtype == torch.bfloat16 and model.config.torch_dtype == "bfloat16"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert load_checkpoint(path, dtype=torch.float32).dtype == torch.float32
    assert torch.isfinite(logits_of(model, prompt_ids)).all()


def test_missing_or_misshapen_tensors_are_reported(tmp_path):
    state = random_state_dict(TINY_CONFIG, 0)
    broken = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_checkpoint(save_checkpoint(tmp_path / "missing", TINY_CONFIG, broken))
    wrong = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(save_checkpoint(tmp_path / "shape", TINY_CONFIG, wrong))
