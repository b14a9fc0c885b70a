"""Where a request should run: score workers by the work they would do for it, including the queue ahead.

A prefill worker's cost for a prompt is the tokens it must compute (those past
its warm prefix) plus the work already in front of it (active tokens and a fixed
price per queued request). Cached tokens are not free: fetching a block from
kvstore costs a fraction of computing it, so `fetch_token_cost` weighs them.
Lowest cost wins; ties go to the shorter queue, then to list order, so a test can
predict the choice. Decode workers have no warm prefix (they fetch everything
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
    fetch_token_cost: float = 0.1       # a cached token costs this fraction of a computed one
    queued_request_cost: float = 256.0  # tokens' worth of latency per request already queued


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

    def as_log(self) -> dict:
        return {
            "url": self.url, "cost": round(self.cost, 1), "load": round(self.load_tokens, 1),
            "compute": round(self.compute_tokens, 1), "matched_blocks": self.matched_blocks,
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

    def score(self, probe: WorkerProbe, num_prompt_tokens: int) -> Score:
        load, queue = self.load_tokens(probe)
        matched = probe.match.matched_blocks if probe.match else 0
        total = probe.match.total_blocks if probe.match else 0
        cached_tokens = num_prompt_tokens * matched / total if total else 0.0
        compute = num_prompt_tokens - cached_tokens + self.config.fetch_token_cost * cached_tokens
        cost = load + compute if probe.reachable else math.inf
        return Score(probe.url, cost, load, compute, matched, queue, probe.reachable)

    def rank(self, probes: list[WorkerProbe], num_prompt_tokens: int = 0) -> list[Score]:
        """Scores best first; num_prompt_tokens=0 ranks by load alone (decode workers)."""
        scores = [self.score(p, num_prompt_tokens) for p in probes]
        order = sorted(range(len(scores)), key=lambda i: (scores[i].cost, scores[i].queue_depth, i))
        return [scores[i] for i in order]
