"""What the scheduler half tells the worker half each step: which blocks to load into which pages, and which to save.

Plain data (keys, vLLM block ids, a pin reference, the leaseholder's client id), so it survives
vLLM's pickling to a worker process (its multiprocessing executor); a pin reference the worker
cannot resolve there just means it reads with get().
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvwire.keys import BlockKey


@dataclass
class LoadSpec:
    req_id: str
    keys: list[BlockKey]  # the blocks to load, in prompt order
    block_ids: list[int]  # vLLM's pages they go to, one per key
    pin_ref: int = 0  # the session's pin over the prompt's leading blocks (0: none)
    pin_offset: int = 0  # index of keys[0] within that pin


@dataclass
class SaveSpec:
    req_id: str
    keys: list[BlockKey]  # blocks computed by the end of this step, under this engine's write leases
    block_ids: list[int]
    lease_owner: str  # the scheduler's client id: the worker writes as it (it may be another process)


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
