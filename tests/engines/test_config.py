import json

import pytest
import torch

from engines.config import ModelConfig, dtype_from_name, dtype_name
from tests.engines.tiny import TINY_CONFIG


def test_json_round_trip(tmp_path):
    path = TINY_CONFIG.to_json(tmp_path)
    assert path == tmp_path / "config.json"
    assert ModelConfig.from_json(tmp_path) == TINY_CONFIG
    doc = json.loads(path.read_text())
    assert doc["model_type"] == "llama" and doc["num_key_value_heads"] == 2


def test_defaults_follow_hf():
    config = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8)
    assert config.head_dim == 8
    assert config.num_key_value_heads == 8
    assert config.num_queries_per_kv == 1


def test_hf_config_extras_are_ignored_and_eos_list_taken():
    doc = {**TINY_CONFIG.to_dict(), "hidden_act": "silu", "initializer_range": 0.02, "eos_token_id": [257, 9]}
    assert ModelConfig.from_dict(doc).eos_token_id == 257
    doc.pop("torch_dtype")
    assert ModelConfig.from_dict({**doc, "dtype": "bfloat16"}).torch_dtype == "bfloat16"


@pytest.mark.parametrize("extra", [{"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, {"attention_bias": True}])
def test_unsupported_features_are_refused(extra):
    with pytest.raises(NotImplementedError):
        ModelConfig.from_dict({**TINY_CONFIG.to_dict(), **extra})


def test_gqa_heads_must_divide():
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=1, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=3)


def test_dtype_names():
    assert dtype_from_name("torch.bfloat16") is torch.bfloat16
    assert dtype_name(torch.float16) == "float16"
    with pytest.raises(ValueError):
        dtype_from_name("int8")
