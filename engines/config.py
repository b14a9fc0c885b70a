"""ModelConfig: the Llama hyper-parameters, read from and written to Hugging Face `config.json`.

This module owns the mapping between a checkpoint's `config.json` and the numbers
the engine builds its modules and KV pages from. It refuses to own weights
(checkpoint.py) and runtime choices such as block size or cache dtype
(paged_cache.py): those are not properties of the model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; the spelling used in config.json and fingerprints."""
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a HF Llama `config.json` that change the computation.

    head_dim defaults to hidden_size // num_attention_heads, as in HF; newer
    configs state it explicitly because some models decouple the two.
    Unknown keys in config.json are ignored, but features this engine does not
    implement (rope scaling, attention or MLP biases) are refused rather than
    silently computed wrong.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size is not a multiple of num_attention_heads; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        dtype_from_name(self.torch_dtype)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "ModelConfig":
        if doc.get("rope_scaling"):
            raise NotImplementedError(f"rope_scaling {doc['rope_scaling']!r} is not supported")
        if doc.get("attention_bias") or doc.get("mlp_bias"):
            raise NotImplementedError("attention_bias / mlp_bias are not supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in doc.items() if k in known}
        # transformers >= 5 writes "dtype" where older versions wrote "torch_dtype".
        if "torch_dtype" not in kwargs and isinstance(doc.get("dtype"), str):
            kwargs["torch_dtype"] = doc["dtype"]
        # HF allows a list of eos ids (Llama 3 instruct); the first is the canonical one.
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["architectures"] = ["LlamaForCausalLM"]
        doc["model_type"] = "llama"
        doc["hidden_act"] = "silu"
        return doc

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json file, or the config.json inside a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))

    def to_json(self, path: str | Path) -> Path:
        """Write config.json (into path if it is a directory); returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path
