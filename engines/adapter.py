"""StoreAdapter: the one bridge between an engine's paged KV cache and kvstore.

It owns four things: checking that a Fingerprint describes the cache's block
bytes, turning token ids into block keys, deciding per request which full
blocks to fetch, wait for or compute (write leases: a missing block is computed
once across all workers), and moving block payloads between host staging
tensors and the store. It refuses to own pages, model forwards or locking: the
engine gathers pages into a payload before `upload` and scatters the payload
`download` returns into its own pages, under its own lock. For a CUDA cache,
`download` lands the blocks in GPU memory itself: over the shm transport it
registers the client's mapping of the store's pool with CUDA once, so the copy
is DMA straight out of the pool, with no host staging (store_dma.py, which also
streams a pinned prefix into the pages layer by layer, copying the blocks the store
holds in its HBM tier device to device out of that pool). It talks to the store
through kvclient's public API alone: KVClient, its pin(), and the errors.
Another engine (vLLM's KV connector, SGLang's hierarchical cache) plugs in
through the same calls; docs/engine-adapter.md states the contract.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from engines.config import dtype_name
from engines.paged_cache import KV_LAYOUT, PagedKVCache
from engines.store_dma import (COPY_GROUP_BYTES, DmaWorkers, PrefixLoad, RegisteredPool, StreamedPrefixLoad, copy_from_pool,
                               plan_copies)
from kvclient.client import KVClient
from kvclient.errors import BlockNotFoundError, ChecksumMismatchError, TimeoutError_, TransferError, UnavailableError
from kvwire.keys import BlockKey, Fingerprint, block_keys
from kvwire.types import BlockState, LeaseOutcome, PutOutcome

__all__ = ["StoreAdapter", "ClaimPlan", "PrefixLoad", "StreamedPrefixLoad", "IncompatibleFingerprintError", "check_compatible",
           "leading_present", "loadable_blocks", "plan_copies", "COPY_GROUP_BYTES"]

log = logging.getLogger(__name__)

# What a client that lost its server (down, restarted, hung) raises; the store's own answers are other types.
BROKEN_CLIENT_ERRORS = (UnavailableError, TimeoutError_, TransferError, ChecksumMismatchError)


class IncompatibleFingerprintError(ValueError):
    """The fingerprint does not describe this cache's blocks; sharing would corrupt KV."""


def check_compatible(fingerprint: Fingerprint, cache: PagedKVCache) -> None:
    ours = (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.block_tokens, dtype_name(cache.dtype), KV_LAYOUT)
    theirs = (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim,
              fingerprint.block_tokens, fingerprint.dtype, fingerprint.kv_layout)
    if ours != theirs:
        raise IncompatibleFingerprintError(
            f"fingerprint (layers, kv heads, head_dim, block_tokens, dtype, layout) {theirs} != cache {ours}"
        )


@dataclass(frozen=True)
class ClaimPlan:
    """What one request does with a prompt's full blocks, decided by `claim`.

    Blocks [0, num_present) are in the store and may be fetched. Every block
    from num_present on is computed by this request; of those, `owned` (indices)
    are under this request's write leases and must be uploaded or released.
    """

    num_present: int
    owned: tuple[int, ...]
    waited: bool = False


def leading_present(states: Sequence[BlockState]) -> int:
    for i, state in enumerate(states):
        if state != BlockState.PRESENT:
            return i
    return len(states)


def loadable_blocks(num_present: int, num_tokens: int, block_tokens: int) -> int:
    """How many of a prompt's present leading blocks a prefill loads: those that end before its last token.

    The last token must run (its logits give the first new token) and writes its
    K/V into its block's page; a block loaded layer by layer is still landing and
    being checked there. So, as vLLM does, a fully cached prompt recomputes its
    last block instead of loading it.
    """
    return max(0, min(num_present, (num_tokens - 1) // block_tokens))


class StoreAdapter:
    def __init__(
        self,
        address: str,
        fingerprint: Fingerprint,
        block_shape: Sequence[int],
        dtype: torch.dtype,
        tenant: str | None = None,
        token: str | None = None,
        transport: str = "auto",
        lease_ttl_s: float = 30.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.address = address
        self.device = torch.device(device)
        self.fingerprint = fingerprint
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.tenant = tenant
        self.lease_ttl_s = lease_ttl_s
        self._client_args = dict(fingerprint=fingerprint, tenant=tenant, token=token, transport=transport)
        self._idle: list[KVClient] = []
        self._all: list[KVClient] = []
        self._lock = threading.Lock()
        self._registered: dict[int, RegisteredPool] = {}  # id(client) -> its pool mapping, CUDA-registered
        self._dma = DmaWorkers()

    @classmethod
    def for_cache(cls, address: str, fingerprint: Fingerprint, cache: PagedKVCache, **kwargs) -> "StoreAdapter":
        check_compatible(fingerprint, cache)
        return cls(address, fingerprint, cache.block_shape, cache.dtype, device=cache.device, **kwargs)

    # ---- namespace -------------------------------------------------------------------

    def block_keys(self, token_ids: Sequence[int]) -> list[BlockKey]:
        """Keys of every full block of token_ids; a trailing partial block has none and is never stored."""
        return block_keys(self.fingerprint, token_ids, self.tenant)

    @contextmanager
    def session(self) -> Iterator[KVClient]:
        """A client for one request. The store tells lease owners apart by client id, so two
        concurrent requests of one worker must not share a client, or both would be granted
        the same lease and both would compute the block.

        A client that a connection or integrity error escapes from is closed, not pooled again:
        after a store restart its shared-memory mapping is the old server's pool (its reads fail
        their checksums, its writes fail the server's), so the next request connects anew. Errors
        the store answered with (a miss, a lease) leave the client pooled. Raises UnavailableError
        while the store cannot be reached; callers then compute without it.
        """
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = self._connect()
        try:
            yield client
        except BROKEN_CLIENT_ERRORS:
            self._discard(client)
            raise
        except BaseException:
            self._give_back(client)
            raise
        self._give_back(client)

    def _connect(self) -> KVClient:
        client = KVClient(self.address, **self._client_args)
        # A client made while the store was down could not learn its data plane and would stay on gRPC for life.
        unreachable = [f for f in client.transport_choice.fallbacks if f.startswith("dataplane:")]
        if unreachable:
            client.close()
            raise UnavailableError(f"store {self.address} did not answer: {unreachable[0]}")
        self._register_pool(client)
        with self._lock:
            self._all.append(client)
        return client

    def _give_back(self, client: KVClient) -> None:
        with self._lock:
            self._idle.append(client)

    def _discard(self, client: KVClient) -> None:
        with self._lock:
            if client in self._all:
                self._all.remove(client)
            registered = self._registered.pop(id(client), None)
        if registered is not None:
            registered.close()
        try:
            client.close()
        except Exception as err:  # closing a connection to a dead store may fail; nothing is lost
            log.debug("closing a failed store client: %r", err)

    def no_load(self) -> PrefixLoad:
        """An empty prefix load: what a request computes from when the store cannot be reached."""
        return PrefixLoad(torch.empty((0, *self.block_shape), dtype=self.dtype, device=self.device))

    def close(self) -> None:
        with self._lock:
            clients, self._all, self._idle = self._all, [], []
            registered, self._registered = self._registered, {}
        self._dma.close_starter()
        for pool in registered.values():  # before the clients unmap the pool
            pool.close()
        self._dma.close_checkers()
        for client in clients:
            client.close()

    def _register_pool(self, client: KVClient) -> None:
        """Page-lock a new shm client's mapping of the pool for CUDA, once per client (it costs a
        pass over the pool's pages). Without it, downloads to the GPU stage through pinned host memory.
        Also map the store's HBM pool, if it has one on this host (once per process, whichever client asks)."""
        pool = client.transport.pool_view()  # a declared capability: the shm transport's mapping, else None
        if self.device.type != "cuda" or pool is None:
            return
        client.hbm_pool()
        try:
            registered = RegisteredPool(pool)
        except RuntimeError:
            return
        with self._lock:
            self._registered[id(client)] = registered

    # ---- deciding what to fetch, wait for and compute --------------------------------

    def claim(self, client: KVClient, keys: Sequence[BlockKey], wait_timeout_s: float) -> ClaimPlan:
        """Lease the missing blocks; wait for leading blocks another request is computing.

        Only blocks before our first lease are waited for: from that block on
        we compute everything anyway (the chain), so waiting there would only
        add latency. It also rules out wait cycles: a request waits only on
        blocks before its own first lease. When a holder vanishes (its wait
        ends MISSING: released or expired) we acquire again, so exactly one of
        the waiters takes over and the rest keep waiting for it. Blocks still
        PENDING when wait_timeout_s runs out are computed by us, unpublished.
        """
        deadline = time.monotonic() + wait_timeout_s
        present: set[int] = set()
        granted: set[int] = set()
        waited = False
        while True:
            ask = [i for i in range(len(keys)) if i not in present and i not in granted]
            for i, info in zip(ask, client.acquire([keys[i] for i in ask], ttl_s=self.lease_ttl_s) if ask else []):
                if info.outcome == LeaseOutcome.ALREADY_PRESENT:
                    present.add(i)
                elif info.outcome == LeaseOutcome.GRANTED:
                    granted.add(i)
            head = min(granted, default=len(keys))
            pending = [i for i in range(head) if i not in present]
            remaining_s = deadline - time.monotonic()
            if not pending or remaining_s <= 0:
                break
            waited = True
            states = client.wait([keys[i] for i in pending], remaining_s)
            present.update(i for i, state in zip(pending, states) if state == BlockState.PRESENT)
            if BlockState.PENDING in states:  # timed out: compute them ourselves
                break
        num_present = leading_present([BlockState.PRESENT if i in present else BlockState.MISSING for i in range(len(keys))])
        return ClaimPlan(num_present, tuple(sorted(granted)), waited)

    def available_prefix(self, client: KVClient, keys: Sequence[BlockKey], wait_timeout_s: float) -> int:
        """Leading blocks present in the store, after waiting out any still being written."""
        if not keys:
            return 0
        return leading_present(client.wait(keys, wait_timeout_s))

    # ---- payloads --------------------------------------------------------------------

    def prepare_load(self, client: KVClient, keys: Sequence[BlockKey]) -> PrefixLoad:
        """The first half of loading a cached prefix: pin it (GPU cache over shm) or fetch it whole.

        A block that vanished since it was seen makes an empty load: the caller computes instead.
        """
        registered = self._registered.get(id(client))
        if not keys or registered is None or self.device.type != "cuda":
            payload = self.fetch(client, keys)
            return PrefixLoad(payload, client.last_transfer if len(payload) else None)
        try:
            pinned = client.pin(keys)
        except BlockNotFoundError:
            return PrefixLoad(self.download(client, []))
        return StreamedPrefixLoad(self._dma, registered, pinned)

    def prepare_prefix_load(self, client: KVClient, keys: Sequence[BlockKey], num_tokens: int) -> PrefixLoad:
        """Find and prepare the longest cached prefix of a num_tokens prompt whose block keys are keys.

        Loads what loadable_blocks allows (a fully cached prompt still computes its
        last block); load.num_blocks says how many that was. With a pinnable pool
        (GPU cache over shm) finding and pinning are one round trip: the server pins
        the leading present run itself (client.pin(keys, prefix=True)). Otherwise a
        prefix Lookup, then a fetch.
        """
        registered = self._registered.get(id(client))
        if not keys or registered is None or self.device.type != "cuda":
            num_load = loadable_blocks(client.lookup(keys), num_tokens, self.fingerprint.block_tokens) if keys else 0
            return self.prepare_load(client, keys[:num_load])
        pinned = client.pin(keys, prefix=True)
        num_load = loadable_blocks(len(pinned), num_tokens, self.fingerprint.block_tokens)
        if num_load == 0:
            pinned.release()  # the pin covers the surplus; released with the rest otherwise
        return StreamedPrefixLoad(self._dma, registered, pinned, num_load,
                                  compute_tokens=num_tokens - num_load * self.fingerprint.block_tokens)

    def download(self, client: KVClient, keys: Sequence[BlockKey]) -> torch.Tensor:
        """Blocks as one tensor [n, *block_shape] on the adapter's device (the cache's, for for_cache).

        On the host they are received in place (no copy after the transport).
        On a GPU: over shm, DMA out of the CUDA-registered pool, each block
        checked against its checksum in the pool after its copy has landed (a
        late writer's bytes would still be there, so nothing unchecked is
        returned); over a transport that moves device memory, straight in;
        otherwise through a pinned host buffer and one copy. Raises
        BlockNotFoundError if any block vanished since it was seen; the caller
        then computes instead.
        """
        out = torch.empty((len(keys), *self.block_shape), dtype=self.dtype, device=self.device)
        if not keys:
            return out
        if self.device.type != "cuda" or client.transport.moves_device_memory:
            client.get(keys, out=list(out.unbind(0)))
            return out
        registered = self._registered.get(id(client))
        if registered is not None:
            copy_from_pool(client, registered, [k.digest for k in keys], out, self._dma.checkers())
            return out
        staging = torch.empty(out.shape, dtype=self.dtype, pin_memory=True)
        client.get(keys, out=list(staging.unbind(0)))
        out.copy_(staging, non_blocking=True)
        return out

    def fetch(self, client: KVClient, keys: Sequence[BlockKey]) -> torch.Tensor:
        """download, or no blocks at all if one was evicted meanwhile: the caller computes them instead."""
        try:
            return self.download(client, keys)
        except BlockNotFoundError:
            return self.download(client, [])

    def upload(self, client: KVClient, keys: Sequence[BlockKey], payload: torch.Tensor) -> list[PutOutcome]:
        """Store payload [n, *block_shape] (on any device, as gather_blocks returns) under keys."""
        if tuple(payload.shape) != (len(keys), *self.block_shape) or payload.dtype != self.dtype:
            raise ValueError(f"payload {tuple(payload.shape)} {payload.dtype} does not match {len(keys)} blocks "
                             f"of {self.block_shape} {self.dtype}")
        if not keys:
            return []
        return client.put(keys, list(payload.cpu().contiguous().unbind(0)))
