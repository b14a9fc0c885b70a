"""The namespace: golden vectors pin the key format; any drift here breaks every stored block."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xxhash

from kvwire.keys import BlockKey, Fingerprint, block_keys, chain_seed, hash_block_tokens

FP = Fingerprint("llama-3-8b", "abc123", 32, 8, 128, 16, "bfloat16")


def test_golden_fingerprint_encoding_and_id():
    assert FP.canonical() == (
        b'{"block_tokens":16,"dtype":"bfloat16","extras":{},"head_dim":128,"kv_layout":"layer_kv_block_head_dim",'
        b'"model":"llama-3-8b","num_kv_heads":8,"num_layers":32,"revision":"abc123","tp_rank":0,"tp_size":1,"v":1}'
    )
    assert FP.id_hex == "d48613e0d2a202e28b9db37b36ecfadd"


def test_golden_block_keys():
    assert [k.hex() for k in block_keys(FP, list(range(40)))] == [
        "618cd59912ba4a8bb833aa1457a5386e",
        "6ff8ada09f0b4584c5d8ce3f2ed33d9b",
    ]
    assert [k.hex() for k in block_keys(FP, list(range(40)), tenant="acme")] == [
        "e8023ec51132bcbcd1b9c6e693cb003d",
        "4e388a377c241d4a9e9e1adc92aef2a7",
    ]


def test_chain_is_xxh3_128_of_parent_tokens_extras():
    seed = chain_seed(FP, None)
    tokens = np.arange(16, dtype="<i8")
    assert hash_block_tokens(seed, tokens) == xxhash.xxh3_128_digest(seed + tokens.tobytes())
    assert block_keys(FP, list(range(16)))[0].digest == hash_block_tokens(seed, tokens)


def test_only_full_blocks_get_keys_and_prefixes_share_keys():
    long = block_keys(FP, list(range(100)))
    assert len(long) == 6
    assert block_keys(FP, list(range(50))) == long[:3]
    assert block_keys(FP, list(range(15))) == []


def test_a_changed_token_changes_its_block_and_all_later_ones():
    base = list(range(64))
    changed = base.copy()
    changed[20] = 999
    a, b = block_keys(FP, base), block_keys(FP, changed)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:]))


@pytest.mark.parametrize(
    "field,value",
    [("dtype", "float16"), ("model", "other"), ("revision", "r2"), ("num_layers", 31), ("block_tokens", 32), ("tp_rank", 1), ("kv_layout", "other")],
)
def test_every_fingerprint_field_scopes_keys(field, value):
    other = dataclasses.replace(FP, **{field: value}, tp_size=2 if field == "tp_rank" else FP.tp_size)
    tokens = list(range(64))
    assert set(block_keys(FP, tokens)).isdisjoint(block_keys(other, tokens))


def test_tenants_and_extra_keys_scope_keys():
    tokens = list(range(32))
    assert set(block_keys(FP, tokens, tenant="a")).isdisjoint(block_keys(FP, tokens, tenant="b"))
    assert block_keys(FP, tokens, extra_keys=[b"lora-1", b"lora-1"]) != block_keys(FP, tokens)


def test_fingerprint_canonical_round_trip_and_extras_order():
    fp = Fingerprint("m", "r", 2, 2, 64, 16, "float16", extras={"b": "2", "a": "1"})
    assert fp == Fingerprint("m", "r", 2, 2, 64, 16, "float16", extras=[("a", "1"), ("b", "2")])
    assert Fingerprint.from_canonical(fp.canonical()) == fp


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError):
        BlockKey(b"short")
    with pytest.raises(ValueError):
        Fingerprint("m", "r", 2, 2, 64, 0, "float16")
    with pytest.raises(ValueError):
        Fingerprint("m", "r", 2, 2, 64, 16, "float16", tp_rank=2, tp_size=2)
