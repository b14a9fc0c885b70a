"""The worker half: moves whole blocks between vLLM's paged KV cache and kvstore.

A stored block is one key's every layer, back to back: [num_layers, *one layer's block], each
layer's block being vLLM's own bytes for that page (on CPU: [kv_heads, block_tokens, 2*head_dim],
K transposed within the block, then V). Nothing is reinterpreted, so whatever vLLM's kernels
wrote is what the next reader of the same fingerprint gets. With the `canonical` layout the
block is converted to and from the bundled engines' layout instead (layout.py), so they share it. Loads happen in `start_load_kv`,
before the forward that reads them (the scheduler asks for synchronous loads); blocks pinned by
the scheduler are copied out of the store's pool and checked there, others are fetched with
get(), which checks them where they land. A block that fails (checksum, eviction, store down) is
reported to vLLM, which recomputes from it; one that failed its checksum in the store's pool is
also deleted there, so it is leased and written again rather than failing every reader. Saves happen in `wait_for_save`, after the forward
wrote the pages. It refuses to decide what to load or save: the scheduler half does.
"""
from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import torch

from connectors.vllm.fingerprint import UnsupportedConfigError, check_layer_caches
from connectors.vllm.layout import canonical_block_shape, canonical_to_cpu_pages, cpu_pages_to_canonical
from connectors.vllm.metadata import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from connectors.session import StoreSession
from kvclient.client import KVClient, PinnedBlocks
from kvclient.errors import ChecksumMismatchError, InvalidRequestError
from kvwire.types import PutOutcome

log = logging.getLogger(__name__)
FAILED = -1  # a load that raised (store down, block gone, wrong size): nothing read, nothing to blame on one block


class WorkerSide:
    def __init__(self, session: StoreSession, layer_names: Sequence[str], canonical: bool = False) -> None:
        self.session = session
        self.canonical = canonical  # store blocks in the bundled engines' layout, converting pages on the way
        self.layer_names = list(layer_names)
        self.layers: list[torch.Tensor] = []
        self.block_shape: tuple[int, ...] = ()
        self._failed_block_ids: set[int] = set()

    def register(self, kv_caches: Mapping[str, torch.Tensor], backends: Mapping[str, str]) -> None:
        self.block_shape = check_layer_caches(self.session.fingerprint, self.layer_names, kv_caches, backends)
        self.layers = [kv_caches[name] for name in self.layer_names]
        fp = self.session.fingerprint
        if self.canonical and self.block_shape != (fp.num_kv_heads, fp.block_tokens, 2 * fp.head_dim):
            raise UnsupportedConfigError(f"layout 'canonical' needs [kv_heads, block_tokens, 2 * head_dim] pages, got {self.block_shape}")

    @property
    def payload_shape(self) -> tuple[int, ...]:
        """One stored block: the layers' pages back to back, or the canonical block."""
        fp = self.session.fingerprint
        if self.canonical:
            return canonical_block_shape(len(self.layers), fp.num_kv_heads, fp.block_tokens, fp.head_dim)
        return (len(self.layers), *self.block_shape)

    # ---- loads ---------------------------------------------------------------------------

    def start_load(self, meta: KVStoreConnectorMetadata) -> None:
        t0 = time.perf_counter()
        for spec in meta.loads:
            self._load(spec)
        self.session.stats.load_s += time.perf_counter() - t0

    def _load(self, spec: LoadSpec) -> None:
        """Load spec's blocks into their pages; report the ones that could not be (from the first bad one on)."""
        pinned = self.session.take_pin(spec.pin_ref) if spec.pin_ref else None
        staging = torch.empty((len(spec.keys), *self.payload_shape), dtype=self.layers[0].dtype)

        def read(client: KVClient) -> int:
            if pinned is not None and pinned.pool_view is not None:
                return _copy_pinned(pinned, spec.pin_offset, staging)
            client.get(spec.keys, out=list(staging.unbind(0)))
            return len(spec.keys)

        good = self.session.call("load", read, FAILED)
        if pinned is not None:
            pinned.release(failed=good < len(spec.keys))
        if good < len(spec.keys):
            if good != FAILED:
                # Block `good` failed its checksum where it sits in the store: delete it, so the next
                # engine to miss it leases and writes it again instead of every reader failing on it.
                bad = spec.keys[good]
                self.session.call("delete", lambda c: c.delete([bad]), 0)
            good = max(good, 0)
            self._failed_block_ids.update(spec.block_ids[good:])
            self.session.stats.blocks_load_failed += len(spec.keys) - good
        if good == 0:
            return
        blocks = staging[:good]
        if self.canonical:
            blocks = canonical_to_cpu_pages(blocks)
        pages = torch.tensor(spec.block_ids[:good], dtype=torch.long, device=self.layers[0].device)
        for layer, cache in enumerate(self.layers):
            cache.index_copy_(0, pages, blocks[:, layer].to(cache.device))
        self.session.stats.blocks_loaded += good

    def failed_block_ids(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    # ---- saves ---------------------------------------------------------------------------

    def save(self, meta: KVStoreConnectorMetadata) -> None:
        t0 = time.perf_counter()
        for spec in meta.saves:
            self._save(spec)
        self.session.stats.save_s += time.perf_counter() - t0

    def _save(self, spec: SaveSpec) -> None:
        pages = torch.tensor(spec.block_ids, dtype=torch.long, device=self.layers[0].device)
        payload = torch.stack([cache.index_select(0, pages) for cache in self.layers], dim=1).cpu()
        if self.canonical:
            payload = cpu_pages_to_canonical(payload)
        self.session.adopt_client_id(spec.lease_owner)  # a no-op when the scheduler shares this process
        outcomes = self.session.call("save", lambda c: c.put(spec.keys, list(payload.unbind(0))), None)
        if outcomes is None:
            return
        stored = sum(1 for o in outcomes if o == PutOutcome.STORED)
        self.session.stats.blocks_saved += stored
        self.session.stats.blocks_save_skipped += len(outcomes) - stored


def _copy_pinned(pinned: PinnedBlocks, first: int, staging: torch.Tensor) -> int:
    """Copy pinned blocks [first, first + len(staging)) out of the store's pool, checking each in the pool;
    returns how many leading blocks copied and checked (all, or up to the first that failed its checksum).

    The pin keeps the slot from being rewritten, so a block that verifies while pinned is the
    committed block, and what was copied from it is too.
    """
    rows = staging.view(len(staging), -1).view(torch.uint8).numpy()
    if len(pinned) < first + len(rows):
        raise InvalidRequestError(f"pin holds {len(pinned)} blocks, load needs {first + len(rows)}")
    for j, row in enumerate(rows):
        block = pinned.block(first + j)
        if block.size != row.size:
            raise InvalidRequestError(f"stored block is {block.size} bytes, this cache's is {row.size}")
        row[:] = block
        try:
            pinned.verify(first + j)
        except ChecksumMismatchError as err:
            log.warning("kvstore block failed its checksum in the store's pool; vLLM recomputes from it: %s", err)
            return j
    return len(rows)
