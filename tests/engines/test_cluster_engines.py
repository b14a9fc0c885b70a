"""The bundled engines across a kvstore cluster: prefill on node A, decode on node B, and the router's locality score.

Real processes throughout: one etcd, two `kvstore serve` nodes joined through it (tests/clusterproc.py;
distinct host ids, so each worker is co-located with its own node only), a plain server with cluster
mode off, prefill and decode workers on the tiny checkpoint, and the router. A worker talks only to
its own node; blocks another node holds reach it through that node's remote tier.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engines.protocol import DecodeRequest, PrefillRequest, PrefillResponse, post_json, stream_ndjson
from engines.tokenizer import ByteTokenizer
from tests.clusterproc import TENANT_TOKENS, ClusterProcs, write_token_files
from tests.engines.procs import WorkerProc, start_decode, start_prefill
from tests.engines.test_router import RouterProc, expected_tokens, prompt_text
from tests.etcdproc import EtcdCluster, need_etcd
from tests.serverproc import ServerProc

pytestmark = pytest.mark.etcd

BLOCK = 16
TOKENIZER = ByteTokenizer()
COLD_HOST = "test-host-cold"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> ClusterProcs:
    need_etcd()
    base = tmp_path_factory.mktemp("engines-cluster")
    with EtcdCluster(base / "etcd", members=1) as etcd:
        with ClusterProcs(base / "nodes", etcd, "engines", size=2, flags={"host_memory": "128MiB"}) as nodes:
            yield nodes


@pytest.fixture(scope="module")
def cold_store(tmp_path_factory) -> ServerProc:
    """A store outside the cluster (cluster mode off): its workers see no prefix but their own."""
    base = tmp_path_factory.mktemp("cold-store")
    tokens, _ = write_token_files(base / "auth")
    server = ServerProc(base / "data", flags={"insecure_no_auth": False, "tokens_file": tokens, "ucx": False},
                        env={"KVSTORE_HOST_ID": COLD_HOST}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster-engine-logs")


@pytest.fixture(scope="module")
def workers(cluster, cold_store, tiny_checkpoint, log_dir) -> dict[str, WorkerProc]:
    """Each worker on its store's host (KVSTORE_HOST_ID), with a tenant token: shm and the local socket to its
    own node, and nothing of any other node's. seed_a prefills on node A for the routing test, outside the router."""
    plan = {  # name: (role, store address, host id)
        "prefill_a": ("prefill", cluster.nodes[0].address, cluster.host_id(0)),
        "seed_a": ("prefill", cluster.nodes[0].address, cluster.host_id(0)),
        "prefill_b": ("prefill", cluster.nodes[1].address, cluster.host_id(1)),
        "decode_b": ("decode", cluster.nodes[1].address, cluster.host_id(1)),
        "prefill_cold": ("prefill", cold_store.address, COLD_HOST),
    }
    starters = {"prefill": start_prefill, "decode": start_decode}
    with ThreadPoolExecutor(len(plan)) as pool:
        futures = {name: pool.submit(starters[role], address, tiny_checkpoint, log_dir,
                                     env={"KVSTORE_HOST_ID": host, "KVSTORE_TOKEN": TENANT_TOKENS["alpha"]},
                                     dtype="float32", block_tokens=BLOCK, threads=1, num_pages=128, lease_ttl_s=2)
                   for name, (role, address, host) in plan.items()}
        procs = {name: f.result() for name, f in futures.items()}
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture
def make_router(log_dir):
    started: list[RouterProc] = []

    def start(prefill: list[WorkerProc], decode: list[WorkerProc]) -> RouterProc:
        router = RouterProc(log_dir=log_dir, prefill=[w.url for w in prefill], decode=[w.url for w in decode]).start(20)
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


def test_prefill_on_node_a_decode_on_node_b_is_token_identical_to_one_process(cluster, workers, tiny_model, make_router):
    text = prompt_text("pd-across-nodes", repeat=3)
    ids = TOKENIZER.encode(text)
    full_blocks = len(ids) // BLOCK
    expected = expected_tokens(tiny_model, text, 24)
    fetched_before = cluster.counters(1).get("remote_fetch_blocks", 0)
    served_before = cluster.counters(0).get("peer_served_blocks", 0)

    prefilled = post_json(workers["prefill_a"].url + "/prefill", PrefillRequest("pd-1", ids), PrefillResponse)
    assert (prefilled.num_cached_tokens, prefilled.num_published_blocks) == (0, full_blocks)
    events = list(stream_ndjson(workers["decode_b"].url + "/decode", DecodeRequest("pd-1", ids, prefilled.first_token, 24)))
    assert [e.token for e in events if e.token is not None] == expected
    # Node B had none of the prompt: every full block crossed from A, and the decode computed only the partial tail.
    assert events[-1].finish_reason in ("length", "stop") and events[-1].num_fetched_tokens == full_blocks * BLOCK
    assert cluster.counters(1)["remote_fetch_blocks"] - fetched_before == full_blocks
    assert cluster.counters(0)["peer_served_blocks"] - served_before == full_blocks

    # The same split through the router, on a prompt neither node has seen.
    router = make_router([workers["prefill_a"]], [workers["decode_b"]])
    text = prompt_text("pd-through-router", repeat=3)
    done = router.complete(prompt=text, max_tokens=24)
    assert done["choices"][0]["text"] == TOKENIZER.decode(expected_tokens(tiny_model, text, 24))
    line = router.routed(done["id"])
    assert (line["prefill"], line["decode"]) == (workers["prefill_a"].url, workers["decode_b"].url)


def test_router_locality_prefers_the_holding_node_then_remote_then_cold(cluster, workers, make_router):
    """The prefix is on node A only, put there by a worker the router does not know (so no engine is warm):
    A's prefill worker sees it on its own node, B's sees it REMOTE through the cluster directory, the cold
    store's sees nothing. Listed coldest first, so only the scores can put A first."""
    a, b, cold = workers["prefill_a"], workers["prefill_b"], workers["prefill_cold"]
    text = prompt_text("locality", repeat=3)
    seeded = post_json(workers["seed_a"].url + "/prefill", PrefillRequest("seed", TOKENIZER.encode(text)), PrefillResponse)
    full_blocks = seeded.num_published_blocks
    assert full_blocks == len(TOKENIZER.encode(text)) // BLOCK
    router = make_router([cold, b, a], [workers["decode_b"]])

    done = router.complete(prompt=text + "and then a question?", max_tokens=2)
    line = router.routed(done["id"])
    assert line["prefill"] == a.url, line
    scores = json.loads(line["prefill_scores"])
    assert [s["url"] for s in scores] == [a.url, b.url, cold.url], scores
    by_url = {s["url"]: s for s in scores}
    assert [(by_url[w.url]["matched_blocks"], by_url[w.url]["local_blocks"], by_url[w.url]["remote_blocks"]) for w in (a, b, cold)] == [
        (0, full_blocks, 0), (0, 0, full_blocks), (0, 0, 0)]
    assert by_url[a.url]["cost"] < by_url[b.url]["cost"] < by_url[cold.url]["cost"]
    assert done["usage"]["prompt_tokens_details"]["cached_tokens"] == full_blocks * BLOCK


def test_the_same_prompt_on_two_nodes_at_once_is_computed_once(cluster, workers):
    """C22 with engines: prefill workers on nodes A and B get the same prompt at the same moment. The prompt's
    first block is claimed cluster-wide at its directory home, so one worker computes the prefix and publishes
    it; the other waits for it (its Wait long-polls that home), fetches it through the remote tier and computes
    only the partial tail."""
    ids = TOKENIZER.encode(prompt_text("same-prompt-two-nodes", repeat=3))
    full_blocks = len(ids) // BLOCK
    assert len(ids) % BLOCK  # a partial last block: a fully fetched prefix leaves only it to compute
    before = [cluster.counters(i) for i in range(2)]

    def prefill(name: str) -> PrefillResponse:
        return post_json(workers[name].url + "/prefill", PrefillRequest(f"same-{name}", ids), PrefillResponse)

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(prefill, ["prefill_a", "prefill_b"]))
    assert done[0].first_token == done[1].first_token
    assert sorted(d.num_cached_tokens for d in done) == [0, full_blocks * BLOCK], done
    assert sum(d.num_computed_tokens for d in done) == len(ids) + len(ids) - full_blocks * BLOCK
    after = [cluster.counters(i) for i in range(2)]
    delta = {name: sum(after[i].get(name, 0) - before[i].get(name, 0) for i in range(2))
             for name in ("cluster_claims_granted", "cluster_claims_pending", "cluster_claims_local")}
    assert delta == {"cluster_claims_granted": full_blocks, "cluster_claims_pending": full_blocks, "cluster_claims_local": 0}
