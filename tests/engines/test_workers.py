"""Prefill and decode workers as real processes around a real kvstore: identity, reuse, single flight, isolation;
and in process, the HTTP they serve (worker_common.py over http_server.py)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engines.checkpoint import load_checkpoint
from engines.config import ModelConfig
from engines.fingerprint import checkpoint_fingerprint
from engines.generate import generate_greedy
from engines.http_server import HTTPError
from engines.protocol import (DecodeEvent, DecodeRequest, MatchRequest, MatchResponse, PrefillRequest,
                              PrefillResponse, WorkerHealth, get_json, post_json, stream_ndjson, to_json)
from engines.tokenizer import ByteTokenizer
from engines.worker_common import JsonHTTPServer, Route
from kvclient.client import KVClient
from tests.engines.procs import start_decode, start_prefill
from tests.engines.tiny import make_cache
from tests.serverproc import ServerProc

BLOCK = 16
NEW_TOKENS = 24
TEXT = ("Paged attention keeps each sequence's keys and values in fixed-size blocks, so a prefix computed "
        "once can be stored, fetched and scattered into free pages by any worker that shares the model. ")


def prompt(tag: str, num_tokens: int) -> list[int]:
    """A distinct prompt per test (tag first), so no test sees blocks another one stored."""
    return ByteTokenizer().encode(f"[{tag}] " + TEXT * 4)[:num_tokens]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("workers") / "data", flags={"host_memory": "256MiB"})
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def workers(store, tiny_checkpoint, tmp_path_factory):
    """Two float32 prefill workers, a float32 decode worker, and a bfloat16 pair: started in parallel."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    specs = {
        "prefill": (start_prefill, "float32"), "prefill2": (start_prefill, "float32"),
        "decode": (start_decode, "float32"),
        "prefill_bf16": (start_prefill, "bfloat16"), "decode_bf16": (start_decode, "bfloat16"),
    }
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(start, store.address, tiny_checkpoint, log_dir, dtype=dtype,
                                     block_tokens=BLOCK, threads=1, num_pages=256)
                   for name, (start, dtype) in specs.items()}
        procs = {name: f.result() for name, f in futures.items()}
    yield procs
    for proc in procs.values():  # signal all first: each takes a moment to exit
        proc.proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        proc.stop()


def prefill(worker, ids: list[int], request_id: str = "r") -> PrefillResponse:
    return post_json(worker.url + "/prefill", PrefillRequest(request_id, ids), PrefillResponse)


def decode(worker, ids: list[int], first_token: int, max_tokens: int = NEW_TOKENS, **kw) -> list[DecodeEvent]:
    return list(stream_ndjson(worker.url + "/decode", DecodeRequest("r", ids, first_token, max_tokens, **kw)))


def tokens(events: list[DecodeEvent]) -> list[int]:
    assert events[-1].done and all(not e.done for e in events[:-1])
    return [e.token for e in events[:-1]]


def computed_total(worker) -> int:
    return worker.health().computed_tokens_total


def reference(model, ids: list[int], max_tokens: int = NEW_TOKENS) -> list[int]:
    """The same model generating in one process, no kvstore."""
    return generate_greedy(model, make_cache(model, num_pages=64, block_tokens=BLOCK), ids, max_tokens)


def test_disaggregated_greedy_equals_one_process(workers, tiny_model):
    ids = prompt("identity", 301)  # 18 full blocks and a 13-token tail the decode worker computes
    cold = prefill(workers["prefill"], ids)
    assert (cold.num_cached_tokens, cold.num_computed_tokens, cold.num_published_blocks) == (0, 301, 18)

    events = decode(workers["decode"], ids, cold.first_token)
    assert tokens(events) == reference(tiny_model, ids)
    assert events[-1].finish_reason == "length" and events[-1].num_fetched_tokens == 18 * BLOCK
    assert "".join(e.text for e in events) == ByteTokenizer().decode(tokens(events))


def test_shared_prefix_computes_only_uncached_tokens(workers, tiny_model):
    first = prompt("prefix", 320)                      # 20 full blocks
    second = first[:18 * BLOCK] + prompt("other", 35)  # shares 18 of its 20 full blocks (90%)
    worker = workers["prefill"]
    prefill(worker, first)
    before = computed_total(worker)
    warm = prefill(worker, second)
    assert warm.num_cached_tokens == 18 * BLOCK
    assert warm.num_computed_tokens == len(second) - 18 * BLOCK == computed_total(worker) - before

    expected = reference(tiny_model, second)
    assert warm.first_token == expected[0]
    assert tokens(decode(workers["decode"], second, warm.first_token)) == expected


def test_fully_cached_aligned_prompt_recomputes_only_its_last_block(workers, tiny_model):
    ids = prompt("aligned", 256)  # exactly 16 blocks: nothing for decode to compute
    prefill(workers["prefill"], ids)
    again = prefill(workers["prefill2"], ids)
    # The last token must run for its logits and writes into the last block's page, so, as in vLLM,
    # that block is computed rather than loaded (adapter.loadable_blocks).
    assert (again.num_cached_tokens, again.num_computed_tokens) == (240, 16)
    events = decode(workers["decode"], ids, again.first_token)
    assert events[-1].num_fetched_tokens == 256
    assert tokens(events) == reference(tiny_model, ids)


def test_decode_frees_its_pages_when_the_client_leaves(workers):
    ids = prompt("disconnect", 90)
    worker = workers["decode"]
    free = worker.health().extra["free_pages"]
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=30)
    conn.request("POST", "/decode", body=to_json(DecodeRequest("r", ids, 65, 400)),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline()  # the first chunk's size line
    conn.close()
    deadline = time.monotonic() + 30
    while worker.health().extra["free_pages"] != free and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.health().extra["free_pages"] == free and worker.health().queue_depth == 0


@pytest.fixture
def lease_client(store, tiny_checkpoint):
    """A KVClient with the float32 workers' fingerprint, to hold leases the way another worker would."""
    fingerprint = checkpoint_fingerprint(tiny_checkpoint, ModelConfig.from_json(tiny_checkpoint), torch.float32, BLOCK)
    with KVClient(store.address, fingerprint) as client:
        yield client


@pytest.mark.parametrize("holder_first", [False, True], ids=["race", "all-waiting"])
def test_concurrent_identical_prompts_compute_the_prefix_once(workers, tiny_model, lease_client, holder_first):
    """4 requests over 2 workers. "all-waiting": a third party holds the leases until all 4 wait,
    then gives up, so the requests certainly overlap and one of them must take over."""
    ids = prompt(f"singleflight-{holder_first}", 299)  # 18 full blocks, 11-token tail
    tail = len(ids) % BLOCK
    targets = [workers["prefill"], workers["prefill"], workers["prefill2"], workers["prefill2"]]
    before = sum(computed_total(w) for w in targets[::2])
    keys = lease_client.block_keys(ids)
    if holder_first:
        lease_client.acquire(keys, ttl_s=30)
        waits_before = lease_client.stats()["counters"].get("lease_waits", 0)
    barrier = threading.Barrier(len(targets))

    def run(i):
        barrier.wait()
        return prefill(targets[i], ids, f"r{i}")

    with ThreadPoolExecutor(len(targets)) as pool:
        futures = [pool.submit(run, i) for i in range(len(targets))]
        if holder_first:
            deadline = time.monotonic() + 30
            while lease_client.stats()["counters"].get("lease_waits", 0) < waits_before + len(targets):
                assert time.monotonic() < deadline, "the requests never waited for the held leases"
                time.sleep(0.05)
            lease_client.release(keys)
        responses = [f.result(timeout=60) for f in futures]

    # One request computes the whole prompt; the other three fetch every full block and
    # compute only the trailing partial block, which has no key and is never shared.
    computed = sorted(r.num_computed_tokens for r in responses)
    assert computed == [tail, tail, tail, len(ids)]
    assert sum(computed) == sum(computed_total(w) for w in targets[::2]) - before
    assert lease_client.lookup(keys) == len(keys)
    assert {r.first_token for r in responses} == {reference(tiny_model, ids, 1)[0]}


def test_fingerprint_mismatch_gets_no_reuse_and_answers_correctly(workers, tiny_checkpoint):
    ids = prompt("dtype", 301)
    assert prefill(workers["prefill"], ids).num_published_blocks == 18
    fp32, bf16 = workers["prefill"].health().extra, workers["prefill_bf16"].health().extra
    assert fp32["fingerprint"] != bf16["fingerprint"] and bf16["dtype"] == "bfloat16"

    other = prefill(workers["prefill_bf16"], ids)
    assert (other.num_cached_tokens, other.num_computed_tokens) == (0, len(ids))
    expected = reference(load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16), ids)
    assert other.first_token == expected[0]
    assert tokens(decode(workers["decode_bf16"], ids, other.first_token)) == expected


def test_waiter_computes_when_the_lease_holder_gives_up(workers, lease_client, tiny_model):
    ids = prompt("vanished", 200)
    worker = workers["prefill"]
    waited_before = worker.health().extra["waited_requests_total"]
    keys = lease_client.block_keys(ids)
    lease_client.acquire(keys, ttl_s=30)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(prefill, worker, ids)
        time.sleep(0.5)
        assert not pending.done()  # waiting for our leases
        lease_client.release(keys)
        response = pending.result(timeout=30)
    assert lease_client.lookup(keys) == len(keys)  # the waiter took the leases over and published
    assert (response.num_cached_tokens, response.num_computed_tokens) == (0, len(ids))
    assert response.first_token == reference(tiny_model, ids, 1)[0]
    assert worker.health().extra["waited_requests_total"] == waited_before + 1


def test_match_counts_leading_blocks_warm_in_this_worker_and_in_its_store(workers):
    ids = prompt("match", 170)  # 10 full blocks
    prefill(workers["prefill"], ids)
    diverged = ids[:6 * BLOCK] + prompt("elsewhere", 70)

    def match(worker, query):
        return post_json(worker.url + "/match", MatchRequest(query), MatchResponse)

    assert match(workers["prefill"], ids) == MatchResponse(10, 10, local_blocks=10, remote_blocks=0)
    assert match(workers["prefill"], diverged) == MatchResponse(6, len(diverged) // BLOCK, local_blocks=6, remote_blocks=0)
    # Cold in the other worker's engine, but its store (the same one, on this host) has the whole run.
    assert match(workers["prefill2"], ids) == MatchResponse(0, 10, local_blocks=10, remote_blocks=0)


def test_sampling_is_seeded_and_eos_stops(workers):
    ids = prompt("sampling", 100)
    first = prefill(workers["prefill"], ids).first_token

    def sample(seed):
        return tokens(decode(workers["decode"], ids, first, 16, temperature=1.0, seed=seed))

    assert sample(3) == sample(3) != sample(4)
    eos = ByteTokenizer().eos_id
    events = decode(workers["decode"], ids, eos, 8)
    assert tokens(events) == [eos] and events[-1].finish_reason == "stop"


def test_bad_requests_get_400(workers):
    for body in (PrefillRequest("r", []), PrefillRequest("r", [1, 10**6])):
        with pytest.raises(urllib.error.HTTPError) as err:
            post_json(workers["prefill"].url + "/prefill", body, PrefillResponse)
        assert err.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as err:
        decode(workers["decode"], [1, 2, 3], first_token=-1)
    assert err.value.code == 400


# ---- in process: the HTTP a worker serves (worker_common over http_server) ------------------------

@pytest.fixture
def json_server():
    """A JsonHTTPServer with routes that answer JSON, stream NDJSON, refuse, fail or stream forever."""
    stream_closed = threading.Event()

    def count(req: MatchRequest):
        for token in req.prompt_ids:
            yield DecodeEvent(token=token)
        yield DecodeEvent(done=True, finish_reason="length")

    def forever(req: MatchRequest):
        try:
            while True:
                yield DecodeEvent(token=1, text="x" * 1024)
                time.sleep(0.005)
        finally:
            stream_closed.set()

    def busy(req: MatchRequest):
        raise HTTPError(503, "no free pages")

    routes = {
        "/match": Route(MatchRequest, lambda req: MatchResponse(len(req.prompt_ids), 7)),
        "/count": Route(MatchRequest, count), "/forever": Route(MatchRequest, forever),
        "/busy": Route(MatchRequest, busy), "/crash": Route(MatchRequest, lambda req: 1 // 0),
    }
    server = JsonHTTPServer("127.0.0.1", 0, lambda: WorkerHealth(role="test", queue_depth=2), routes)
    server.stream_closed = stream_closed
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_worker_http_answers_json_ndjson_and_errors_with_their_status(json_server):
    url = f"http://127.0.0.1:{json_server.port}"
    assert get_json(url + "/health?verbose=1", WorkerHealth) == WorkerHealth(role="test", queue_depth=2)
    assert post_json(url + "/match", MatchRequest([1, 2, 3]), MatchResponse) == MatchResponse(3, 7)
    events = list(stream_ndjson(url + "/count", MatchRequest([5, 6])))
    assert [e.token for e in events] == [5, 6, None] and events[-1].done
    conn = http.client.HTTPConnection("127.0.0.1", json_server.port, timeout=10)
    for method, path, body, status in [("GET", "/nowhere", None, 404), ("POST", "/nowhere", b"{}", 404),
                                       ("POST", "/match", b"not json", 400), ("POST", "/match", b"{}", 400),
                                       ("POST", "/busy", b'{"prompt_ids": []}', 503),
                                       ("POST", "/crash", b'{"prompt_ids": []}', 500)]:
        conn.request(method, path, body=body)  # one keep-alive connection: each answer is framed exactly
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Type")) == (status, "application/json"), path
        assert "error" in json.loads(response.read())
    conn.close()


def test_worker_http_closes_a_stream_the_client_left(json_server):
    conn = http.client.HTTPConnection("127.0.0.1", json_server.port, timeout=10)
    conn.request("POST", "/forever", body=b'{"prompt_ids": [1]}')
    response = conn.getresponse()
    assert response.getheader("Content-Type") == "application/x-ndjson" and response.readline()
    conn.close()
    assert json_server.stream_closed.wait(10)  # the route's finally ran: what it held is released


def test_worker_http_stops_on_sigterm():
    server = JsonHTTPServer("127.0.0.1", 0, lambda: WorkerHealth(role="test"), {})
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        server.serve_until_signal()  # returns once the signal stops it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)
