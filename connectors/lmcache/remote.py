"""KVStoreRemoteConnector: LMCache's remote storage tier, backed by kvstore.

LMCache loads it as a remote storage plugin:

    remote_storage_plugins: ["kvstore"]
    extra_config:
      remote_storage_plugin.kvstore.module_path: connectors.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreRemoteConnector
      remote_storage_plugin.kvstore.address: 127.0.0.1:7480      # and tenant, token, transport, revision

One LMCache chunk is one kvstore block: its key is the xxh3-128 of LMCache's own chunk key
(model, world size, worker, chunk hash, dtype), in the namespace of a Fingerprint built from
LMCache's metadata (model, KV shape and dtype, chunk size, memory format, worker / world size),
so LMCache keeps deciding what is the same chunk and kvstore adds tenants (from the token),
checksums where the bytes land, tiers and eviction. The payload is LMCache's own bytes, after
its RemoteMetadata header when LMCache saves chunk metadata, as its file-system connector
stores them. A failing store is a miss (get -> None, exists -> False) and a skipped put, for
retry_after_s, never an error in LMCache's path. It refuses to own LMCache's chunking and hashing.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, TypeVar

import numpy as np
import xxhash
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from connectors.session import StoreSession
from kvwire.defaults import DEFAULT_ADDRESS
from kvwire.keys import BlockKey, Fingerprint
from kvwire.types import PutOutcome

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_PLUGIN_NAME = "kvstore"


@dataclass(frozen=True)
class PluginSettings:
    address: str = DEFAULT_ADDRESS
    tenant: str | None = None
    token: str | None = None
    transport: str = "auto"
    timeout_s: float = 5.0
    retry_after_s: float = 5.0
    revision: str = "unpinned"  # LMCache keys chunks by model name; pin the weights' revision here to be stricter

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None, plugin_name: str) -> "PluginSettings":
        prefix = f"remote_storage_plugin.{plugin_name}."
        ours = {k[len(prefix):]: v for k, v in (extra or {}).items() if k.startswith(prefix)}
        ours.pop("module_path", None)
        ours.pop("class_name", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(ours) - known)
        if unknown:
            raise ValueError(f"kvstore LMCache plugin: unknown settings {[prefix + k for k in unknown]}")
        for name in ("timeout_s", "retry_after_s"):
            if name in ours:
                ours[name] = float(ours[name])
        return cls(**ours)


def plugin_name(extra: dict[str, Any] | None) -> str:
    """The name LMCache's config gives this plugin: the one whose class_name is ours (LMCache does not pass it)."""
    suffix = ".class_name"
    for key, value in (extra or {}).items():
        if key.startswith("remote_storage_plugin.") and key.endswith(suffix) and value == KVStoreRemoteConnector.__name__:
            return key[len("remote_storage_plugin."):-len(suffix)]
    return DEFAULT_PLUGIN_NAME


def lmcache_fingerprint(metadata, fmt_name: str, with_chunk_meta: bool, revision: str) -> Fingerprint:
    num_layers, _, chunk_size, num_kv_heads, head_dim = metadata.kv_shape
    return Fingerprint(
        model=metadata.model_name,
        revision=revision,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_tokens=chunk_size,
        dtype=str(metadata.kv_dtype).removeprefix("torch."),
        kv_layout=f"lmcache/{fmt_name}" + ("/with-meta" if with_chunk_meta else ""),
        tp_rank=metadata.worker_id,
        tp_size=metadata.world_size,
    )


def chunk_key(key: CacheEngineKey) -> BlockKey:
    return BlockKey(xxhash.xxh3_128_digest(b"lmcache\x00" + key.to_string().encode()))


class KVStoreRemoteConnector(RemoteConnector):
    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend, config) -> None:
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        config = config or local_cpu_backend.config
        name = plugin_name(config.extra_config)
        self.settings = PluginSettings.from_extra_config(config.extra_config, name)
        fingerprint = lmcache_fingerprint(local_cpu_backend.metadata, self.meta_fmt.name, self.save_chunk_meta, self.settings.revision)
        # Its own client: LMCache may build several remote backends, and concurrent writers of one
        # key must be different lease owners (one client id would be granted the lease twice).
        self.session = StoreSession(self.settings, fingerprint)
        log.info("kvstore LMCache plugin %r at %s, fingerprint %s", name, self.settings.address, fingerprint.id_hex)

    async def _run(self, what: str, fn: Callable[..., T], default: T) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, self.session.call, what, fn, default)

    # ---- presence ---------------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._run("exists", lambda c: c.contains([chunk_key(key)])[0], False)

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self.session.call("exists", lambda c: c.contains([chunk_key(key)])[0], False)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: List[CacheEngineKey]) -> int:
        """How many leading keys are stored (LMCache asks for a prefix of chunks)."""
        present = self.session.call("contains", lambda c: c.contains([chunk_key(k) for k in keys]), [])
        return next((i for i, p in enumerate(present) if not p), len(present))

    # ---- data -------------------------------------------------------------------------

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        data = np.frombuffer(memory_obj.byte_array, dtype=np.uint8)
        if self.save_chunk_meta:
            header = RemoteMetadata(len(data), memory_obj.get_shapes(), memory_obj.get_dtypes(), memory_obj.get_memory_format())
            data = np.concatenate([np.frombuffer(header.serialize(), dtype=np.uint8), data])
        outcomes = await self._run("put", lambda c: c.put([chunk_key(key)], [data]), None)
        if outcomes is not None:
            stats = self.session.stats
            stored = outcomes[0] == PutOutcome.STORED
            stats.blocks_saved += stored
            stats.blocks_save_skipped += not stored

    async def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        blocks = await self._run("get", lambda c: c.get([chunk_key(key)]), None)
        if blocks is None:
            return None
        memory_obj = self._unpack(blocks[0])
        if memory_obj is not None:
            self.session.stats.blocks_loaded += 1
        return memory_obj

    def _unpack(self, block: np.ndarray) -> Optional[MemoryObj]:
        """The stored bytes in a MemoryObj of LMCache's local CPU backend (None if it has no room)."""
        if self.save_chunk_meta:
            header = RemoteMetadata.deserialize(block[: self.remote_metadata_bytes].tobytes())
            memory_obj = self.local_cpu_backend.allocate(header.shapes, header.dtypes, header.fmt)
            payload = block[self.remote_metadata_bytes:]
        else:
            memory_obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
            payload = block
        if memory_obj is None:
            return None
        target = np.frombuffer(memory_obj.byte_array, dtype=np.uint8)
        if len(payload) > len(target):
            memory_obj.ref_count_down()
            log.warning("kvstore block of %d bytes does not fit LMCache's %d-byte chunk", len(payload), len(target))
            return None
        target[: len(payload)] = payload
        return memory_obj if self.save_chunk_meta else self.reshape_partial_chunk(memory_obj, len(payload))

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return bool(self.session.call("delete", lambda c: c.delete([chunk_key(key)]), 0))

    async def list(self) -> List[str]:
        return []  # kvstore lists keys only to its admin; LMCache uses this for debugging

    async def close(self) -> None:
        self.session.close()
