"""The scoring policy alone: warm prefixes attract, load repels, the unreachable go last."""
from engines.protocol import MatchResponse, WorkerHealth
from engines.routing_policy import RoutingPolicy, WorkerProbe

PROMPT_TOKENS = 1024


def probe(url: str, matched: int = 0, queue: int = 0, active: int = 0, inflight: int = 0, up: bool = True) -> WorkerProbe:
    health = WorkerHealth(role="prefill", queue_depth=queue, active_tokens=active) if up else None
    return WorkerProbe(url, health, MatchResponse(matched, 64), inflight)


def ranked(*probes: WorkerProbe) -> list[str]:
    return [s.url for s in RoutingPolicy().rank(list(probes), PROMPT_TOKENS)]


def test_equal_load_prefers_the_warm_prefix():
    assert ranked(probe("cold"), probe("warm", matched=48)) == ["warm", "cold"]


def test_a_heavily_loaded_warm_worker_loses_to_an_idle_cold_one():
    assert ranked(probe("warm", matched=64, queue=4, active=8000), probe("cold")) == ["cold", "warm"]


def test_a_lightly_loaded_warm_worker_still_wins():
    assert ranked(probe("warm", matched=64, queue=1, active=100), probe("cold")) == ["warm", "cold"]


def test_router_inflight_counts_when_health_is_stale():
    assert ranked(probe("a", inflight=3), probe("b")) == ["b", "a"]


def test_ties_keep_list_order_and_unreachable_go_last():
    assert ranked(probe("down", up=False), probe("a"), probe("b")) == ["a", "b", "down"]


def test_decode_ranking_is_load_only():
    scores = RoutingPolicy().rank([probe("busy", active=500), probe("idle")])
    assert [s.url for s in scores] == ["idle", "busy"] and scores[0].compute_tokens == 0
