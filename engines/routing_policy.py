"""Where a request should run: score workers by the work they would do for it, including the queue ahead.

A prefill worker's cost for a prompt is the tokens it must compute (those past
the prefix it can load) plus the work already in front of it (active tokens and
a fixed price per queued request). Loaded tokens are not free, and their price
depends on where they are, as the worker's /match reports it:

- warm in the worker's own engine cache (`matched_blocks`): `warm_token_cost`;
- on its kvstore node's own tiers (`local_blocks`, Lookup tier HBM/HOST/SSD):
  `fetch_token_cost`;
- REMOTE, on another node of the cluster (`remote_blocks`; the node's Lookup
  asked the cluster directory): `remote_fetch_token_cost`, since the worker's node
  copies it across the network before the worker can load it;
- nowhere: computed, cost 1 per token.

So at equal load a worker whose node holds the prefix beats one whose node sees it
only REMOTE, which beats one that would compute it (tests/engines/test_cluster_engines.py).
Lowest cost wins; ties go to the shorter queue, then to list order, so a test can
predict the choice. Decode workers have no prefix to offer (they fetch everything
from the store), so only their load counts.

This module only ranks; it refuses to talk HTTP (router.py does) and never
excludes a worker: an unreachable one is ranked last, to be tried only when
every other attempt has failed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engines.protocol import MatchResponse, WorkerHealth


@dataclass(frozen=True)
class PolicyConfig:
    warm_token_cost: float = 0.05          # a token warm in the worker's engine cache, as a fraction of a computed one
    fetch_token_cost: float = 0.1          # a token on the worker's own kvstore node
    remote_fetch_token_cost: float = 0.3   # a token a peer node holds (REMOTE): fetched over the network first
    queued_request_cost: float = 256.0     # tokens' worth of latency per request already queued


@dataclass(frozen=True)
class WorkerProbe:
    """What the router learned about one worker just before routing (None: no answer)."""

    url: str
    health: WorkerHealth | None = None
    match: MatchResponse | None = None
    inflight: int = 0                   # requests this router has in flight there right now

    @property
    def reachable(self) -> bool:
        return self.health is not None and self.health.status == "ok"


@dataclass(frozen=True)
class Score:
    url: str
    cost: float
    load_tokens: float
    compute_tokens: float
    matched_blocks: int
    queue_depth: int
    reachable: bool
    local_blocks: int = 0
    remote_blocks: int = 0

    def as_log(self) -> dict:
        return {
            "url": self.url, "cost": round(self.cost, 1), "load": round(self.load_tokens, 1),
            "compute": round(self.compute_tokens, 1), "matched_blocks": self.matched_blocks,
            "local_blocks": self.local_blocks, "remote_blocks": self.remote_blocks,
            "queue": self.queue_depth, "up": self.reachable,
        }


@dataclass
class RoutingPolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)

    def load_tokens(self, probe: WorkerProbe) -> tuple[float, int]:
        """Work ahead of a new request, in tokens, and the queue depth it was derived from.

        The router's own in-flight count can be fresher than the worker's last
        /health, so the larger of the two is believed.
        """
        health = probe.health or WorkerHealth(role="unknown")
        queue = max(health.queue_depth, probe.inflight)
        return health.active_tokens + self.config.queued_request_cost * queue, queue

    def loaded_blocks(self, match: MatchResponse) -> tuple[float, float, float]:
        """The prefix a worker would load, in blocks: (warm, local, remote).

        The worker loads the longer of its warm prefix and its store's leading run. Warm
        blocks are charged as warm; the store blocks past them are split between local and
        REMOTE in the store run's proportion (exact whenever the run is one kind, which is
        the common case: a prefix stays on the node that computed it).
        """
        store = match.local_blocks + match.remote_blocks
        beyond = max(0, store - match.matched_blocks)
        remote = beyond * match.remote_blocks / store if store else 0.0
        return float(match.matched_blocks), beyond - remote, remote

    def score(self, probe: WorkerProbe, num_prompt_tokens: int) -> Score:
        load, queue = self.load_tokens(probe)
        match = probe.match or MatchResponse(0, 0)
        compute = float(num_prompt_tokens)
        if match.total_blocks:
            per_block = num_prompt_tokens / match.total_blocks
            cfg = self.config
            for blocks, price in zip(self.loaded_blocks(match), (cfg.warm_token_cost, cfg.fetch_token_cost, cfg.remote_fetch_token_cost)):
                compute -= blocks * per_block * (1 - price)
        cost = load + compute if probe.reachable else math.inf
        return Score(probe.url, cost, load, compute, match.matched_blocks, queue, probe.reachable, match.local_blocks, match.remote_blocks)

    def rank(self, probes: list[WorkerProbe], num_prompt_tokens: int = 0) -> list[Score]:
        """Scores best first; num_prompt_tokens=0 ranks by load alone (decode workers)."""
        scores = [self.score(p, num_prompt_tokens) for p in probes]
        order = sorted(range(len(scores)), key=lambda i: (scores[i].cost, scores[i].queue_depth, i))
        return [scores[i] for i in order]
