"""Workers whose kvstore goes away keep serving by computing, and reuse blocks again once it is back.

Real processes: one `kvstore serve`, a prefill and a decode worker on its host (shm and the local socket).
The store is stopped (SIGTERM) and started again on the same address and data dir, as a rolling restart does.
"""
from __future__ import annotations

import pytest

from engines.adapter import loadable_blocks
from engines.protocol import (DecodeRequest, MatchRequest, MatchResponse, PrefillRequest, PrefillResponse, WorkerHealth,
                              get_json, post_json, stream_ndjson)
from engines.tokenizer import ByteTokenizer
from tests.engines.procs import start_decode, start_prefill
from tests.engines.test_router import expected_tokens
from tests.serverproc import ServerProc

BLOCK = 16
TOKENIZER = ByteTokenizer()


def text(tag: str) -> str:
    return f"[{tag}] A store that restarts is a cache that was briefly empty, never a failed request. " * 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("outage") / "data", flags={"host_memory": "64MiB", "shutdown_grace_s": 1})
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def workers(store, tiny_checkpoint, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("outage-logs")
    flags = dict(dtype="float32", block_tokens=BLOCK, threads=1, num_pages=128, lease_ttl_s=2, wait_timeout_s=2)
    procs = start_prefill(store.address, tiny_checkpoint, log_dir, **flags), start_decode(store.address, tiny_checkpoint, log_dir, **flags)
    yield procs
    for proc in procs:
        proc.stop()


def complete(prefill, decode, tag: str, max_tokens: int = 8) -> tuple[PrefillResponse, list, int]:
    """Prefill then decode one prompt; the prefill's answer, the tokens and how many prompt tokens decode fetched."""
    ids = TOKENIZER.encode(text(tag))
    pre = post_json(prefill.url + "/prefill", PrefillRequest(tag, ids), PrefillResponse)
    events = list(stream_ndjson(decode.url + "/decode", DecodeRequest(tag, ids, pre.first_token, max_tokens)))
    assert events[-1].done and events[-1].finish_reason == "length", events[-1]
    return pre, [e.token for e in events if e.token is not None], events[-1].num_fetched_tokens


def failures(worker) -> int:
    return get_json(worker.url + "/health", WorkerHealth).extra["store_failures_total"]


def test_workers_compute_while_their_store_is_down_and_reuse_again_after_it_restarts(store, workers, tiny_model):
    prefill, decode = workers
    full_tokens = len(TOKENIZER.encode(text("before"))) // BLOCK * BLOCK
    pre, out, fetched = complete(prefill, decode, "before")
    assert (pre.num_published_blocks, fetched) == (full_tokens // BLOCK, full_tokens)
    assert out == expected_tokens(tiny_model, text("before"), 8)

    store.stop()
    try:
        ids = TOKENIZER.encode(text("during"))
        match = post_json(prefill.url + "/match", MatchRequest(ids), MatchResponse)
        assert (match.local_blocks, match.remote_blocks) == (0, 0)
        pre, out, fetched = complete(prefill, decode, "during")
        assert (pre.num_cached_tokens, pre.num_published_blocks, fetched) == (0, 0, 0)
        assert out == expected_tokens(tiny_model, text("during"), 8)
        assert failures(prefill) >= 2 and failures(decode) >= 1  # /match and /prefill; /decode
    finally:
        store.start()

    # The store flushed its host tier on SIGTERM and reloaded it: the first prompt is reused again, through new
    # clients (the old ones mapped the old server's pool, and were dropped at their first error).
    ids = TOKENIZER.encode(text("before"))
    for attempt in range(2):
        pre, out, fetched = complete(prefill, decode, "before")
        if fetched:
            break
    cached = loadable_blocks(full_tokens // BLOCK, len(ids), BLOCK) * BLOCK
    assert (pre.num_cached_tokens, fetched) == (cached, full_tokens), attempt
    assert out == expected_tokens(tiny_model, text("before"), 8)
    pre, out, fetched = complete(prefill, decode, "after")
    assert (pre.num_published_blocks, fetched) == (full_tokens // BLOCK, full_tokens)
