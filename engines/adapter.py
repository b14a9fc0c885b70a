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
is DMA straight out of the pool, with no host staging. Another engine
(vLLM's KV connector, SGLang's hierarchical cache) plugs in through the same
calls; docs/engine-adapter.md states the contract.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from engines.block_checksum import paged_kernel, supports
from engines.config import dtype_name
from engines.layerwise import CacheGeometry, plan_layer_copies, run_on_cuda
from engines.paged_cache import KV_LAYOUT, PagedKVCache
from kvclient.client import KVClient
from kvclient.errors import BlockNotFoundError
from kvwire.keys import BlockKey, Fingerprint, block_keys
from kvclient.transports.base import TransferStats
from kvclient.transports.pooled import SlotRef, check_block, checksum_error
from kvwire.types import BlockState, LeaseOutcome, PutOutcome


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


# A block group is copied, then checked by one thread while later groups are still in flight.
# xxh3 reads DRAM at only ~6 GB/s a core on the H100 host, so matching its ~50 GB/s DMA takes many threads.
COPY_GROUP_BYTES = 4 << 20
CHECK_THREADS = min(16, os.cpu_count() or 1)


def plan_copies(slots: Sequence[SlotRef], block_bytes: int, group_bytes: int = COPY_GROUP_BYTES
                ) -> list[tuple[list[tuple[int, int, int]], list[SlotRef]]]:
    """Groups of about group_bytes, each as (copies, slots): (dest offset, pool offset, length) copies,
    merged where consecutive blocks sit back to back in the pool, as a fresh slab hands them out."""
    groups: list[tuple[list[tuple[int, int, int]], list[SlotRef]]] = []
    copies: list[tuple[int, int, int]] = []
    members: list[SlotRef] = []
    for s in slots:
        if members and (len(members) + 1) * block_bytes > group_bytes:
            groups.append((copies, members))
            copies, members = [], []
        dest = s.index * block_bytes
        if copies and copies[-1][0] + copies[-1][2] == dest and copies[-1][1] + copies[-1][2] == s.offset:
            copies[-1] = (copies[-1][0], copies[-1][1], copies[-1][2] + s.length)
        else:
            copies.append((dest, s.offset, s.length))
        members.append(s)
    if members:
        groups.append((copies, members))
    return groups


class RegisteredPool:
    """A client's mapping of the store's shared-memory pool, page-locked for CUDA so copies out of it are DMA."""

    def __init__(self, pool: np.ndarray) -> None:
        self.array = pool
        self.host = torch.from_numpy(pool)  # uint8, aliases the mapping
        err = torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), self.host.numel(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the {self.host.numel()}-byte pool failed: {err}")

    def check(self, digests: Sequence[bytes], members: Sequence[SlotRef]) -> None:
        """Check pinned blocks where they sit in the pool (xxh3 releases the GIL: run it on worker threads)."""
        for s in members:
            check_block(digests[s.index], self.array[s.offset: s.offset + s.length], s.checksum)

    def close(self) -> None:
        torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
        self.array = self.host = None


class PrefixLoad:
    """A cached prefix on its way into cache pages; the engine's side of vLLM's KV-connector shape.

    prepare_load (outside the engine's lock: it talks to the store) -> start
    (under the lock, once the pages exist) -> wait_for_layer(i) before layer i
    reads the pages -> finish before anything computed from them is used:
    finish raises ChecksumMismatchError if a block failed its check, and the
    caller then recomputes. abort (or leaving the with-block unfinished) undoes
    a load at any step. This base class is the host path: the payload was
    fetched whole by prepare_load, start scatters it, and there is nothing to wait for.
    """

    def __init__(self, payload: torch.Tensor, stats: TransferStats | None = None) -> None:
        self.payload = payload
        self.stats = stats or TransferStats()

    @property
    def num_blocks(self) -> int:
        return len(self.payload)

    def start(self, cache: PagedKVCache, pages: Sequence[int]) -> "PrefixLoad":
        if self.num_blocks:
            cache.scatter_blocks(pages[: self.num_blocks], self.payload)
        return self

    def wait_for_layer(self, layer: int) -> None:
        pass

    def dma_ms(self) -> float:
        return 0.0

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def __enter__(self) -> "PrefixLoad":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


COPY_LOOKAHEAD = 2  # layers whose copies are enqueued ahead of the layer about to run its attention


class StreamedPrefixLoad(PrefixLoad):
    """Pinned blocks DMA'd from the CUDA-registered pool into the pages, layer by layer (layerwise.py).

    Each block is checked once every layer has landed, while the forward pass
    is still running: on the GPU, in the pages themselves, by the XXH3 kernel
    (block_checksum.py) queued behind the copies, so what is checked is what
    attention reads; without the kernel, in the pool on worker threads. The pin
    is dropped only after that.
    """

    def __init__(self, adapter: "StoreAdapter", client: KVClient, registered: RegisteredPool,
                 keys: Sequence[BlockKey], slots: list[SlotRef], stats: TransferStats) -> None:
        self._adapter, self._client, self._registered = adapter, client, registered
        self._digests = [k.digest for k in keys]
        self._slots = slots
        self.stats = stats
        self._landed: list[torch.cuda.Event] = []
        self._checked = None  # host checks: a future
        self._hashes: torch.Tensor | None = None  # GPU checks: the kernel's output, ready at _hashed
        self._hashed: torch.cuda.Event | None = None
        self._done = False

    @property
    def num_blocks(self) -> int:
        return len(self._slots)

    def start(self, cache: PagedKVCache, pages: Sequence[int]) -> "PrefixLoad":
        """Plan the copies and enqueue the first layer's; the rest, and the checksum kernel behind the
        last, COPY_LOOKAHEAD layers ahead of each wait_for_layer. Every enqueue is CPU time on the
        thread launching the pass: all sixteen layers' before layer 0's attention left the GPU idle
        ~0.5 ms (8k prompt, 1b model, H100 host), while a copy engine at ~30-50 GB/s stays ahead of
        the layers' compute with two layers of lead. (That lead once left a 2 ms checksum kernel
        behind the last layer; the warp-per-block kernel takes 0.26 ms.)"""
        if not self._slots:
            return self
        t0 = time.perf_counter()
        self._cache, self._pages = cache, pages[: len(self._slots)]
        self._geometry = CacheGeometry.of(cache.kv)
        self._plan = plan_layer_copies(self._geometry, self._pages, [s.offset for s in self._slots])
        self._stream = self._adapter.copy_stream(cache.device)
        self._stream.wait_stream(torch.cuda.current_stream(cache.device))  # earlier passes may still read these pages
        self._began = torch.cuda.Event(enable_timing=True)
        self._began.record(self._stream)
        self.stats.extra["copies"] = sum(len(c) for c in self._plan)
        self.stats.transfer_s += time.perf_counter() - t0
        self._enqueue_through(0)
        return self

    def _enqueue_through(self, layer: int) -> None:
        """Enqueue the copies of every layer up to `layer`; after the last, the checksum kernel."""
        last = len(self._plan) - 1
        if not self._slots or len(self._landed) > min(layer, last):
            return
        t0 = time.perf_counter()
        while len(self._landed) <= min(layer, last):
            run_on_cuda(self._plan[len(self._landed)], self._cache.kv.data_ptr(), self._registered.host.data_ptr(),
                        self._stream)
            self._landed.append(torch.cuda.Event(enable_timing=True))
            self._landed[-1].record(self._stream)
        if len(self._landed) == len(self._plan):
            self._hash_in_pages()
        self.stats.transfer_s += time.perf_counter() - t0  # enqueueing; the DMA itself is dma_ms()

    def _hash_in_pages(self) -> None:
        geometry, stream = self._geometry, self._stream
        kernel = paged_kernel() if supports(geometry.half_bytes, 2 * geometry.num_layers) else None
        if kernel is None:
            return
        with torch.cuda.stream(stream):
            offsets = torch.tensor([p * geometry.half_bytes for p in self._pages], dtype=torch.int64)
            offsets = offsets.to(self._cache.device, non_blocking=True)
            self._hashes = kernel.launch(self._cache.kv.data_ptr(), offsets, geometry.num_pages * geometry.half_bytes,
                                         geometry.half_bytes, 2 * geometry.num_layers, stream)
        self._hashed = torch.cuda.Event()
        self._hashed.record(stream)
        self.stats.extra["checked_on"] = "gpu"

    def _check_hashes(self) -> None:
        t0 = time.perf_counter()
        self._hashed.synchronize()
        got = self._hashes.cpu().numpy().view(np.uint64)
        expected = np.array([s.checksum for s in self._slots], dtype=np.uint64)
        self.stats.validate_s += time.perf_counter() - t0
        bad = np.flatnonzero(got != expected)
        if len(bad):
            raise checksum_error(self._digests[bad[0]], len(bad), len(got))

    def _start_checks(self) -> None:
        """Checks begin once the forward pass is (nearly) enqueued, not at start: sixteen threads taking
        the GIL back after every block starved the thread launching the kernels (TTFT doubled)."""
        if self._checked is None and self._landed and self._hashed is None:
            self._checked = self._adapter.check_starter().submit(self._check_when_landed)

    def _check_when_landed(self) -> None:
        self._landed[-1].synchronize()
        t0 = time.perf_counter()
        per_group = max(1, COPY_GROUP_BYTES // max(1, self._slots[0].length))
        groups = [self._slots[i: i + per_group] for i in range(0, len(self._slots), per_group)]
        checkers = self._adapter.checkers()
        errors = [f.exception() for f in [checkers.submit(self._registered.check, self._digests, g) for g in groups]]
        self.stats.validate_s += time.perf_counter() - t0
        for err in errors:
            if err is not None:
                raise err

    def wait_for_layer(self, layer: int) -> None:
        if self._landed:
            self._enqueue_through(layer + COPY_LOOKAHEAD)
            torch.cuda.current_stream(self._cache.device).wait_event(self._landed[layer])
            if layer == len(self._plan) - 1:
                self._start_checks()

    def dma_ms(self) -> float:
        """GPU time from the first copy to the last layer landing (call after finish)."""
        return self._began.elapsed_time(self._landed[-1]) if self._landed else 0.0

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._landed:
                self._enqueue_through(len(self._plan) - 1)  # a caller that skipped some layers' waits
            self._start_checks()
            if self._checked is not None:
                self._checked.result()
            if self._hashed is not None:
                self._check_hashes()
        except BaseException:
            self._client.transport.control.release(self._slots, failed=True)
            raise
        self._client.transport.control.release(self._slots)
        self._client.last_transfer = self.stats

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._landed:
            (self._hashed or self._landed[-1]).synchronize()  # no DMA or hash may outlive the pin
        if self._checked is not None:
            self._checked.exception()
        self._client.transport.control.release(self._slots, failed=True)


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
        self._checkers: ThreadPoolExecutor | None = None
        self._check_starter: ThreadPoolExecutor | None = None  # waits for a load to land, then fans out checks
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}

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
        the same lease and both would compute the block."""
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = KVClient(self.address, **self._client_args)
            self._register_pool(client)
            with self._lock:
                self._all.append(client)
        try:
            yield client
        finally:
            with self._lock:
                self._idle.append(client)

    def close(self) -> None:
        with self._lock:
            clients, self._all, self._idle = self._all, [], []
            registered, self._registered = self._registered, {}
            checkers, self._checkers = self._checkers, None
            starter, self._check_starter = self._check_starter, None
        if starter is not None:
            starter.shutdown()
        for pool in registered.values():  # before the clients unmap the pool
            pool.close()
        if checkers is not None:
            checkers.shutdown()
        for client in clients:
            client.close()

    def _register_pool(self, client: KVClient) -> None:
        """Page-lock a new shm client's mapping of the pool for CUDA, once per client (it costs a
        pass over the pool's pages). Without it, downloads to the GPU stage through pinned host memory."""
        pool = getattr(client.transport, "pool", None)
        if self.device.type != "cuda" or client.transport.name != "shm" or pool is None:
            return
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

    def checkers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._checkers is None:
                self._checkers = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="kv-check")
            return self._checkers

    def check_starter(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._check_starter is None:
                self._check_starter = ThreadPoolExecutor(4, thread_name_prefix="kv-check-start")
            return self._check_starter

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            if device not in self._copy_streams:
                self._copy_streams[device] = torch.cuda.Stream(device)
            return self._copy_streams[device]

    def prepare_load(self, client: KVClient, keys: Sequence[BlockKey]) -> PrefixLoad:
        """The first half of loading a cached prefix: pin it (GPU cache over shm) or fetch it whole.

        A block that vanished since it was seen makes an empty load: the caller computes instead.
        """
        registered = self._registered.get(id(client))
        if not keys or registered is None or self.device.type != "cuda":
            payload = self.fetch(client, keys)
            return PrefixLoad(payload, client.last_transfer if len(payload) else None)
        stats = TransferStats()
        try:
            slots = client.transport.control.pin([k.digest for k in keys], stats)
        except BlockNotFoundError:
            return PrefixLoad(self.download(client, []))
        return StreamedPrefixLoad(self, client, registered, keys, slots, stats)

    def prepare_prefix_load(self, client: KVClient, keys: Sequence[BlockKey], num_tokens: int) -> PrefixLoad:
        """Find and prepare the longest cached prefix of a num_tokens prompt whose block keys are keys.

        Loads what loadable_blocks allows (a fully cached prompt still computes its
        last block); load.num_blocks says how many that was. With a pinnable pool
        (GPU cache over shm) finding and pinning are one round trip: the server pins
        the leading present run itself (PinRequest.prefix_only). Otherwise a prefix
        Lookup, then a fetch.
        """
        registered = self._registered.get(id(client))
        if not keys or registered is None or self.device.type != "cuda":
            num_load = loadable_blocks(client.lookup(keys), num_tokens, self.fingerprint.block_tokens) if keys else 0
            return self.prepare_load(client, keys[:num_load])
        stats = TransferStats()
        slots = client.transport.control.pin([k.digest for k in keys], stats, prefix=True)
        num_load = loadable_blocks(len(slots), num_tokens, self.fingerprint.block_tokens)
        if num_load == 0:
            client.transport.control.release(slots)  # the pin covers the surplus; released with the rest otherwise
        return StreamedPrefixLoad(self, client, registered, keys[:num_load], slots[:num_load], stats)

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
        if self.device.type != "cuda" or getattr(client.transport, "moves_device_memory", False):
            client.get(keys, out=list(out.unbind(0)))
            return out
        registered = self._registered.get(id(client))
        if registered is not None:
            self._copy_from_pool(client, registered, keys, out)
            return out
        staging = torch.empty(out.shape, dtype=self.dtype, pin_memory=True)
        client.get(keys, out=list(staging.unbind(0)))
        out.copy_(staging, non_blocking=True)
        return out

    def _copy_from_pool(self, client: KVClient, registered: RegisteredPool, keys: Sequence[BlockKey],
                        out: torch.Tensor) -> None:
        """Pin the blocks, DMA them out of the registered pool in a few large copies, check them in the
        pool on worker threads as each group lands (xxh3 releases the GIL), unpin; all or nothing."""
        out_bytes = out.view(-1).view(torch.uint8)
        block_bytes = out_bytes.numel() // len(keys)
        digests = [k.digest for k in keys]
        stats = TransferStats()
        checkers = self.checkers()

        def drain(slots: list[SlotRef], _host_views) -> None:
            t0 = time.perf_counter()
            stream = torch.cuda.current_stream(out.device)
            groups = plan_copies(slots, block_bytes)
            landed = []
            for copies, _ in groups:
                for dest, offset, length in copies:
                    out_bytes[dest: dest + length].copy_(registered.host[offset: offset + length], non_blocking=True)
                landed.append(torch.cuda.Event())
                landed[-1].record(stream)
            checks = []
            for event, (_, members) in zip(landed, groups):
                event.synchronize()
                checks.append(checkers.submit(registered.check, digests, members))
            t1 = time.perf_counter()
            errors = [f.exception() for f in checks]
            stats.transfer_s += t1 - t0
            stats.validate_s += time.perf_counter() - t1
            stats.extra["copies"] = sum(len(copies) for copies, _ in groups)
            for err in errors:
                if err is not None:
                    raise err

        # PoolControl.get sizes a destination per block; these host views of one scratch
        # block pass its size check and are never written: drain writes `out`.
        scratch = np.empty(block_bytes, dtype=np.uint8)
        client.transport.control.get(digests, [scratch] * len(keys), stats, drain)
        client.last_transfer = stats

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
