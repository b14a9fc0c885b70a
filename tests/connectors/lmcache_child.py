"""LMCache's storage manager with the kvstore plugin, in one process of the LMCache environment.

    python tests/connectors/lmcache_child.py STORE_ADDRESS REPORT.json

Stores random chunks (a full one and a partial one) through StorageManager.batched_put, drops
LMCache's local CPU copies, reads them back (they can only come from kvstore now) and reports
whether every byte came back, with the plugin's counters. Runs from the LMCache environment's
installed copy of the project (tools/lmcache_env.sh says why), so it imports nothing from the tree.
"""
from __future__ import annotations

import json
import sys
import time

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.event_manager import EventManager
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.storage_manager import StorageManager

CHUNK_TOKENS = 256
KV_SHAPE = (4, 2, CHUNK_TOKENS, 2, 64)  # layers, K/V, tokens, kv heads, head dim: the tiny Llama's
REMOTE = "RemoteBackend-kvstore"


def main() -> None:
    address, report_path = sys.argv[1], sys.argv[2]
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK_TOKENS, local_cpu=True, max_local_cpu_size=0.5, remote_serde="naive",
        remote_storage_plugins=["kvstore"],
        extra_config={"remote_storage_plugin.kvstore.module_path": "connectors.lmcache",
                      "remote_storage_plugin.kvstore.class_name": "KVStoreRemoteConnector",
                      "remote_storage_plugin.kvstore.address": address})
    metadata = LMCacheMetadata(model_name="tiny-llama", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                               kv_dtype=torch.bfloat16, kv_shape=KV_SHAPE)
    manager = StorageManager(config, metadata, EventManager())
    try:
        report = round_trip(manager)
    finally:
        manager.close()
    with open(report_path, "w") as f:
        json.dump(report, f)


def round_trip(manager: StorageManager) -> dict:
    generator = torch.Generator().manual_seed(7)
    tokens = [CHUNK_TOKENS, CHUNK_TOKENS // 4]  # a full chunk and a prompt's partial last one
    keys = [CacheEngineKey("tiny-llama", 1, 0, 1000 + i, torch.bfloat16) for i in range(len(tokens))]
    originals = []
    for key, n in zip(keys, tokens):
        shape = torch.Size([2, KV_SHAPE[0], n, KV_SHAPE[3] * KV_SHAPE[4]])
        (obj,) = manager.batched_allocate(shape, torch.bfloat16, 1)
        obj.tensor.copy_(torch.randn(shape, generator=generator).to(torch.bfloat16))
        originals.append(obj.tensor.clone())
        manager.batched_put([key], [obj])
    deadline = time.monotonic() + 30
    while not all(manager.contains(k, [REMOTE]) for k in keys):  # puts to the remote tier are asynchronous
        if time.monotonic() > deadline:
            raise TimeoutError("chunks never reached kvstore")
        time.sleep(0.05)
    dropped = manager.clear(["LocalCPUBackend"])
    local_after_drop = [bool(manager.contains(k, ["LocalCPUBackend"])) for k in keys]
    back = [manager.get(k) for k in keys]
    remote = manager.storage_backends[REMOTE]
    stats = remote.connection._connector.session.stats.as_dict()  # under LMCache's instrumentation wrapper
    return {
        "dropped_tokens": dropped,
        "local_after_drop": local_after_drop,
        "found": [obj is not None for obj in back],
        "bit_exact": [obj is not None and obj.tensor.shape == want.shape and torch.equal(obj.tensor.view(torch.int16), want.view(torch.int16))
                      for obj, want in zip(back, originals)],
        "stats": stats,
    }


if __name__ == "__main__":
    main()
