"""Prefill worker: computes a prompt's KV once across the fleet, publishes its full blocks, returns the first token.

Per request: lease the prompt's missing full blocks in kvstore, wait for any
leading blocks another worker is computing, load the cached prefix (on a GPU
layer by layer, under the forward pass), run only the rest through the model,
upload the blocks we leased. The trailing partial
block is computed but never stored (it has no key); the decode worker
recomputes it. It refuses to own decoding and routing.

    python -m engines.prefill --store HOST:PORT --checkpoint DIR --port N [--dtype float32] [--device cpu]

Endpoints (engines/protocol.py): POST /prefill, POST /match, GET /health.
"""
from __future__ import annotations

import argparse
import logging
import threading
from collections import OrderedDict
from typing import Sequence

import torch

from engines.adapter import ClaimPlan, PrefixLoad, loadable_blocks
from engines.generate import sample_next
from engines.protocol import MatchRequest, MatchResponse, PrefillRequest, PrefillResponse, WorkerHealth
from engines.worker_common import Counters, InFlight, Route
from engines.worker_engine import WorkerEngine, run_worker
from kvclient.errors import KVStoreError
from kvwire.keys import BlockKey
from kvwire.types import BlockState, KeyStatus, PutOutcome, Tier

log = logging.getLogger(__name__)


class RecentBlocks:
    """Bounded LRU of block keys this worker recently computed or fetched.

    A stand-in for an engine's local prefix cache (vLLM's block pool): the
    router asks /match to send a prompt where its prefix is already warm.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            for key in keys:
                self._keys[key.digest] = None
                self._keys.move_to_end(key.digest)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def leading(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            for i, key in enumerate(keys):
                if key.digest not in self._keys:
                    return i
            return len(keys)


def store_run(statuses: Sequence[KeyStatus]) -> tuple[int, int]:
    """Of the leading run of present keys: how many sit on the store node's own tiers, how many are REMOTE."""
    local = remote = 0
    for status in statuses:
        if status.state != BlockState.PRESENT:
            break
        if status.tier == Tier.REMOTE:
            remote += 1
        else:
            local += 1
    return local, remote


class PrefillWorker:
    def __init__(self, engine: WorkerEngine, recent_blocks: int = 65536) -> None:
        self.engine = engine
        self.recent = RecentBlocks(recent_blocks)
        self.in_flight = InFlight()
        self.counters = Counters("requests_total", "computed_tokens_total", "cached_tokens_total",
                                 "published_blocks_total", "waited_requests_total", "store_failures_total")

    def routes(self) -> dict[str, Route]:
        return {"/prefill": Route(PrefillRequest, self.prefill), "/match": Route(MatchRequest, self.match)}

    def match(self, req: MatchRequest) -> MatchResponse:
        """The warm prefix here, and the store's leading run by tier: the router's locality score.

        One Lookup on this worker's store node; in cluster mode that node asks the cluster directory
        for what it lacks, so a prefix another node holds comes back REMOTE. A store that cannot be
        reached has nothing to offer: its run is 0, and the worker still serves (by computing).
        """
        adapter = self.engine.adapter
        keys = adapter.block_keys(self.engine.check_prompt(req.prompt_ids))
        local = remote = 0
        if keys:
            try:
                with adapter.session() as client:
                    statuses, _ = client.status(keys)
                local, remote = store_run(statuses)
            except KVStoreError as err:
                log.warning("store unreachable for /match: %s", err)
                self.counters.add(store_failures_total=1)
        return MatchResponse(matched_blocks=self.recent.leading(keys), total_blocks=len(keys),
                             local_blocks=local, remote_blocks=remote)

    def prefill(self, req: PrefillRequest) -> PrefillResponse:
        prompt = self.engine.check_prompt(req.prompt_ids)
        self.in_flight.add(len(prompt))
        try:
            return self._prefill(req.request_id, prompt)
        finally:
            self.in_flight.done(len(prompt))

    @torch.inference_mode()
    def _prefill(self, request_id: str, prompt: list[int]) -> PrefillResponse:
        """Claim, load, compute, publish. The store is a cache: while it cannot be reached (down, restarting)
        the prompt is computed whole and nothing is published, so the request is served all the same."""
        engine, adapter = self.engine, self.engine.adapter
        keys = adapter.block_keys(prompt)
        plan, computed, outcomes = ClaimPlan(0, ()), None, []
        try:
            with adapter.session() as client:
                plan = adapter.claim(client, keys, engine.wait_timeout_s)
                owned_keys = [keys[i] for i in plan.owned]
                try:
                    num_load = loadable_blocks(plan.num_present, len(prompt), engine.block_tokens)
                    # Renewed while we compute, so a prompt slower than the lease TTL is still computed once.
                    with client.keep_leases(owned_keys, adapter.lease_ttl_s):
                        with adapter.prepare_load(client, keys[:num_load]) as load:
                            computed, publish = self._compute(prompt, load, plan.owned)
                        outcomes = adapter.upload(client, owned_keys, publish)
                finally:
                    client.release(owned_keys)  # whatever was not uploaded, so waiters take over at once
        except KVStoreError as err:
            log.warning("store unreachable during prefill %s; %s: %s", request_id,
                        "not published" if computed else "computing it whole", err)
            self.counters.add(store_failures_total=1)
            if computed is None:
                plan = ClaimPlan(0, ())
                computed, _ = self._compute(prompt, adapter.no_load(), ())
        logits, start = computed
        stored = sum(o in (PutOutcome.STORED, PutOutcome.ALREADY_PRESENT) for o in outcomes)
        self.recent.add(keys)
        self.counters.add(requests_total=1, computed_tokens_total=len(prompt) - start, cached_tokens_total=start,
                          published_blocks_total=stored, waited_requests_total=int(plan.waited))
        return PrefillResponse(
            request_id=request_id,
            num_prompt_tokens=len(prompt),
            num_cached_tokens=start,
            num_computed_tokens=len(prompt) - start,
            first_token=int(sample_next(logits)[0]),
            num_published_blocks=plan.num_present + stored,
        )

    def _compute(self, prompt: list[int], load: PrefixLoad, owned: Sequence[int]) -> tuple[tuple[torch.Tensor, int], torch.Tensor]:
        """(last logits, tokens loaded) and the owned blocks' payload to publish."""
        engine = self.engine
        with engine.pages(len(prompt)) as (_, table), engine.lock:
            logits, start = engine.forward_after_prefix(prompt, table, load)
            publish = engine.cache.gather_blocks([table[i] for i in owned])
        return (logits, start), publish

    def health(self) -> WorkerHealth:
        return self.engine.health("prefill", self.in_flight, self.counters)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recent-blocks", type=int, default=65536, help="capacity of the /match LRU, in blocks")


def main(argv: Sequence[str] | None = None) -> None:
    run_worker("prefill", argv, lambda engine, args: PrefillWorker(engine, args.recent_blocks), _add_args)


if __name__ == "__main__":
    main()
