"""The scoring policy alone: warm prefixes attract, then a prefix on the worker's own store node, then one a
peer node holds (REMOTE); load repels; the unreachable go last."""
import pytest

from engines.protocol import MatchResponse, WorkerHealth
from engines.routing_policy import RoutingPolicy, WorkerProbe

PROMPT_TOKENS = 1024


def probe(url: str, matched: int = 0, queue: int = 0, active: int = 0, inflight: int = 0, up: bool = True,
          local: int = 0, remote: int = 0) -> WorkerProbe:
    health = WorkerHealth(role="prefill", queue_depth=queue, active_tokens=active) if up else None
    return WorkerProbe(url, health, MatchResponse(matched, 64, local, remote), inflight)


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


def test_a_prefix_on_the_own_node_beats_one_a_peer_holds_which_beats_none():
    assert ranked(probe("cold"), probe("remote", remote=64), probe("local", local=64)) == ["local", "remote", "cold"]
    costs = {s.url: s.cost for s in RoutingPolicy().rank([probe("cold"), probe("remote", remote=64), probe("local", local=64)],
                                                          PROMPT_TOKENS)}
    assert costs == pytest.approx({"cold": PROMPT_TOKENS, "remote": PROMPT_TOKENS * 0.3, "local": PROMPT_TOKENS * 0.1})


def test_the_warm_engine_cache_beats_the_same_prefix_only_in_the_store():
    """One shared store (no cluster): every worker sees the same local run; the warm one still wins."""
    assert ranked(probe("store-only", local=64), probe("warm", matched=64, local=64)) == ["warm", "store-only"]


def test_a_longer_remote_run_beats_a_short_local_one():
    assert ranked(probe("short-local", local=8), probe("long-remote", remote=64)) == ["long-remote", "short-local"]


def test_locality_is_worth_less_than_a_queue():
    assert ranked(probe("local-busy", local=64, queue=2), probe("remote-idle", remote=64)) == ["remote-idle", "local-busy"]


def test_a_mixed_run_is_charged_by_its_parts():
    """A run of 32 local then 32 REMOTE blocks (half the prompt each), past a warm prefix of 16."""
    score = RoutingPolicy().score(probe("mixed", matched=16, local=32, remote=32), PROMPT_TOKENS)
    per_block = PROMPT_TOKENS / 64
    warm, local, remote = 16 * per_block * 0.05, 24 * per_block * 0.1, 24 * per_block * 0.3
    assert score.compute_tokens == pytest.approx(warm + local + remote)
    assert (score.matched_blocks, score.local_blocks, score.remote_blocks) == (16, 32, 32)
