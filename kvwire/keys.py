"""The block namespace: fingerprints, tenant salts and chained block keys.

This module owns the exact byte format of every key kvstore stores; client and
server both import it, and tests/kvclient/test_keys.py pins golden outputs so the
format cannot drift. It does not know about transports, tiers or gRPC.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import xxhash

from kvwire.native import native

KEY_BYTES = 16
FINGERPRINT_ID_BYTES = 16
KEY_FORMAT_VERSION = 1


class PackedKeys(Sequence[bytes]):
    """A request's keys, all `width` bytes long, in the one bytes object the wire carried them in, key after key.

    The native Pin decoder (pin_codec.decode_request) answers a Pin's keys so: 512 bytes objects (and the cache
    lines they take) cost ~25 us of the server's answer with cold caches, and the server's checks and prefix walk
    read `packed` whole (native_keys). Reads as any sequence of bytes, a key made when one is asked for."""

    __slots__ = ("packed", "width")

    def __init__(self, packed: bytes, width: int) -> None:
        if width <= 0 or len(packed) % width:
            raise ValueError(f"{len(packed)} bytes are not keys of {width} bytes")
        self.packed, self.width = packed, width

    def __len__(self) -> int:
        return len(self.packed) // self.width

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("key index out of range")
        w = self.width
        return self.packed[i * w : (i + 1) * w]

    def __iter__(self):
        packed, w = self.packed, self.width
        return (packed[at : at + w] for at in range(0, len(packed), w))

    def __eq__(self, other) -> bool:
        if isinstance(other, PackedKeys):
            return len(self) == len(other) and self.packed == other.packed
        return isinstance(other, Sequence) and not isinstance(other, (bytes, str)) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PackedKeys({len(self)} keys of {self.width} bytes)"


def key_list(keys: Sequence[bytes]) -> list[bytes]:
    """keys as a list (itself when it is one): what the server's per-key lookups take, PackedKeys included."""
    return keys if type(keys) is list else list(keys)


def native_keys(keys: Sequence[bytes]) -> bytes | list[bytes]:
    """keys as the server's native checks and walks take them: PackedKeys of KEY_BYTES keys as their one bytes object,
    anything else as a list."""
    if type(keys) is PackedKeys and keys.width == KEY_BYTES:
        return keys.packed
    return key_list(keys)


@dataclass(frozen=True)
class Fingerprint:
    """Everything that makes two KV blocks of the same tokens incompatible.

    Two engines share blocks only if every field is equal; anything that changes
    the bytes of K/V (weights, layout, precision, sharding) belongs here.
    """

    model: str
    revision: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str
    kv_layout: str = "layer_kv_block_head_dim"
    tp_rank: int = 0
    tp_size: int = 1
    extras: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        if isinstance(self.extras, Mapping):
            object.__setattr__(self, "extras", tuple(sorted((str(k), str(v)) for k, v in self.extras.items())))
        else:
            object.__setattr__(self, "extras", tuple(sorted((str(k), str(v)) for k, v in self.extras)))

    def canonical(self) -> bytes:
        """Stable encoding: sorted-key compact JSON, prefixed by the key format version."""
        doc = {
            "v": KEY_FORMAT_VERSION,
            "model": self.model,
            "revision": self.revision,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_tokens": self.block_tokens,
            "dtype": self.dtype,
            "kv_layout": self.kv_layout,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "extras": dict(self.extras),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @functools.cached_property  # the JSON encoding costs ~10 us, and every block_keys call needs the id
    def id(self) -> bytes:
        return xxhash.xxh3_128_digest(self.canonical())

    @property
    def id_hex(self) -> str:
        return self.id.hex()

    @classmethod
    def from_canonical(cls, data: bytes) -> "Fingerprint":
        doc = json.loads(data)
        doc.pop("v", None)
        doc["extras"] = tuple(sorted(doc.get("extras", {}).items()))
        return cls(**doc)


@dataclass(frozen=True, order=True, slots=True)
class BlockKey:
    """A 16-byte chained hash; its position in a sequence is implied by the chain. A slots class: an 8k-token
    prompt makes 512 of them, ~10 us less without an instance dict each."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != KEY_BYTES:
            raise ValueError(f"block key must be {KEY_BYTES} bytes, got {len(self.digest)}")

    def hex(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"BlockKey({self.digest.hex()[:16]}…)"


@functools.lru_cache(maxsize=4096)
def tenant_salt(tenant: str | None) -> bytes:
    """Per-tenant salt mixed into the chain seed, so equal prompts of two tenants never share keys."""
    return xxhash.xxh3_128_digest(b"kvstore-tenant\x00" + (tenant or "").encode())


def chain_seed(fingerprint: Fingerprint, tenant: str | None) -> bytes:
    return xxhash.xxh3_128_digest(fingerprint.id + tenant_salt(tenant))


def hash_block_tokens(parent: bytes, token_ids: Sequence[int] | np.ndarray, extra_keys: bytes = b"") -> bytes:
    """h_i = xxh3_128(h_{i-1} || int64-LE token ids || extra keys) — the one chaining function."""
    return _chain(parent, np.ascontiguousarray(token_ids, dtype="<i8").tobytes(), extra_keys)


def _chain(parent: bytes, token_bytes: bytes, extra_keys: bytes) -> bytes:
    return xxhash.xxh3_128_digest(parent + token_bytes + extra_keys)


def block_keys(
    fingerprint: Fingerprint,
    token_ids: Sequence[int] | np.ndarray,
    tenant: str | None = None,
    extra_keys: Iterable[bytes] | None = None,
) -> list[BlockKey]:
    """Keys for every *full* block of token_ids; a trailing partial block gets none.

    extra_keys, if given, has one entry per full block (e.g. a LoRA id or a
    multimodal input hash) and is folded into that block's hash.

    Computed by kvwire._native (csrc/kvnative/keys.c) where it is built: ~6x faster for a
    prompt of thousands of tokens; block_keys_reference is the definition, and the answer
    for any input the native code leaves to it.
    """
    extras = list(extra_keys) if extra_keys is not None else None
    if native is not None:
        tokens = np.asarray(token_ids, dtype="<i8") if isinstance(token_ids, np.ndarray) else token_ids
        keys = native.chain_keys(chain_seed(fingerprint, tenant), tokens, fingerprint.block_tokens, extras, BlockKey)
        if keys is not NotImplemented:
            return keys
    return block_keys_reference(fingerprint, token_ids, tenant, extras)


def block_keys_reference(
    fingerprint: Fingerprint,
    token_ids: Sequence[int] | np.ndarray,
    tenant: str | None = None,
    extra_keys: Iterable[bytes] | None = None,
) -> list[BlockKey]:
    """block_keys in Python: the definition the native code is tested against."""
    n = fingerprint.block_tokens
    tokens = np.asarray(token_ids, dtype="<i8")
    full = len(tokens) // n
    extras = list(extra_keys) if extra_keys is not None else [b""] * full
    if len(extras) < full:
        raise ValueError(f"extra_keys has {len(extras)} entries for {full} full blocks")
    parent = chain_seed(fingerprint, tenant)
    raw, step = tokens.tobytes(), n * 8  # one conversion for the whole prompt, not one per block
    keys: list[BlockKey] = []
    for i in range(full):
        parent = _chain(parent, raw[i * step : (i + 1) * step], extras[i])
        keys.append(_computed_key(parent))
    return keys


def _computed_key(digest: bytes) -> BlockKey:
    """A BlockKey for a digest xxh3_128 just produced (16 bytes by construction), without the
    dataclass __init__ and its length check: half the cost, for every block of every prompt."""
    key = object.__new__(BlockKey)
    object.__setattr__(key, "digest", digest)
    return key
