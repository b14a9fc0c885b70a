"""The kvstore vLLM connector against real vLLM (CPU) processes and a real kvstore server.

Each vLLM instance is a separate process of the vLLM environment (vllmproc.py); the prompts are
token ids over a tiny random Llama. Every test compares greedy outputs with vLLM computing the
same prompts without the store, so a wrong block shows up as a wrong answer.
"""
from __future__ import annotations

import signal

import numpy as np
import pytest

from kvclient import KVClient
from kvwire.keys import Fingerprint, block_keys
from tests.connectors.vllmproc import BLOCK_TOKENS, VllmProc, make_checkpoint, requests, run_vllm, stats, tokens, vllm_missing
from tests.kvclient.transport_util import map_pool
from tests.serverproc import ServerProc

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(bool(vllm_missing()), reason=vllm_missing() or "vLLM present")]

TAIL = 40  # tokens after a shared prefix: less than a block, so only the prefix is ever stored
SHARED = tokens(3 * BLOCK_TOKENS, seed=1)  # the prefix process A computes and B reuses
CORRUPTED = tokens(2 * BLOCK_TOKENS, seed=2)  # the prefix whose stored bytes are damaged
CONCURRENT = tokens(4 * BLOCK_TOKENS, seed=3)  # the prefix four requests in two processes want at once
OUTAGE = tokens(2 * BLOCK_TOKENS, seed=4)
SERVED = tokens(4 * BLOCK_TOKENS, seed=5)  # shared by two vLLMs each running as `vllm serve` does


def prompt(prefix: list[int], seed: int) -> list[int]:
    return prefix + tokens(TAIL, seed=100 + seed)


# The prompts whose outputs are checked, with vLLM computing them without the store.
READERS = {
    "shared": prompt(SHARED, 1),
    "corrupted": prompt(CORRUPTED, 1),
    **{f"concurrent{i}": prompt(CONCURRENT, 10 + i) for i in range(4)},
    **{f"outage{i}": prompt(OUTAGE, 20 + i) for i in range(4)},
    "served": prompt(SERVED, 1),
}


def job(p: list[int], max_tokens: int = 8) -> dict:
    return {"prompt": p, "max_tokens": max_tokens}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    return str(make_checkpoint(workdir / "tiny-llama"))


@pytest.fixture(scope="module")
def store(workdir):
    srv = ServerProc(workdir / "store", flags={"host_memory": "256MiB", "ssd_capacity": "1GiB"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cold(workdir, checkpoint) -> dict[str, dict]:
    """Every reader prompt computed by vLLM without the store (and without its own prefix cache)."""
    report = run_vllm(workdir, "cold", checkpoint=checkpoint, store=None, prefix_caching=False,
                      batches=[[job(p) for p in READERS.values()]])
    return dict(zip(READERS, requests(report)))


@pytest.fixture(scope="module")
def writer(workdir, checkpoint, store) -> dict:
    """Process A: computes and saves the SHARED and CORRUPTED prefixes (with tails other readers do not share)."""
    return run_vllm(workdir, "writer", checkpoint=checkpoint, store=store.address,
                    batches=[[job(prompt(SHARED, 0)), job(prompt(CORRUPTED, 0))]])


def assert_same_answer(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"]
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-4)


def test_second_process_computes_only_the_uncached_tokens(workdir, checkpoint, store, writer, cold):
    assert stats(writer)["blocks_saved"] == 5  # 3 + 2 prefix blocks; the tails are partial blocks
    report = run_vllm(workdir, "reader", checkpoint=checkpoint, store=store.address, batches=[[job(READERS["shared"])]])
    (result,) = requests(report)
    assert result["num_cached_tokens"] == len(SHARED)  # vLLM computed only the 40-token tail
    assert stats(report)["tokens_matched"] == len(SHARED)
    assert stats(report)["blocks_loaded"] == 3
    assert stats(report)["blocks_saved"] == 0
    assert_same_answer(result, cold["shared"])


def test_reuse_when_scheduler_and_worker_are_separate_processes(workdir, checkpoint, store, cold):
    """vLLM's default multiprocessing puts the engine core and the worker in two processes: the
    worker writes the blocks its scheduler leased (as the leaseholder's client id), and reads with get()."""
    mp = dict(checkpoint=checkpoint, store=store.address, multiprocessing=True)
    run_vllm(workdir, "served-writer", **mp, batches=[[job(prompt(SERVED, 0))]])
    (result,) = requests(run_vllm(workdir, "served-reader", **mp, batches=[[job(READERS["served"])]]))
    assert result["num_cached_tokens"] == len(SERVED)
    assert_same_answer(result, cold["served"])


def test_corrupted_block_is_detected_and_recomputed(workdir, checkpoint, store, writer, cold):
    fingerprint = Fingerprint.from_canonical(writer["sessions"][0]["fingerprint"].encode())
    keys = block_keys(fingerprint, CORRUPTED)
    with KVClient(store.address, fingerprint) as client:
        pin = client.control.pin(fingerprint.id, [keys[1].digest])
        client.control.unpin([pin.pin_id])
        pool = map_pool(client.control.data_plane().shm_name)
    pool[pin.offsets[0] + 1000] ^= 0xFF  # one byte of layer 0's K in the second block

    report = run_vllm(workdir, "corrupted", checkpoint=checkpoint, store=store.address, batches=[[job(READERS["corrupted"])]])
    (result,) = requests(report)
    assert stats(report)["blocks_loaded"] == 1  # the first block loaded...
    assert stats(report)["blocks_load_failed"] == 1  # ...the damaged one was refused...
    assert_same_answer(result, cold["corrupted"])  # ...and vLLM recomputed from it
    with KVClient(store.address, fingerprint) as client:
        assert client.contains(keys) == [True, False]  # and it is gone from the store, to be written again


def test_other_dtype_gets_no_reuse(workdir, checkpoint, store, writer):
    report = run_vllm(workdir, "bf16", checkpoint=checkpoint, store=store.address, dtype="bfloat16",
                      batches=[[job(READERS["shared"])]])
    fingerprint = Fingerprint.from_canonical(report["sessions"][0]["fingerprint"].encode())
    assert fingerprint.dtype == "bfloat16"
    (result,) = requests(report)
    assert result["num_cached_tokens"] == 0
    assert stats(report)["tokens_matched"] == 0 and stats(report)["blocks_loaded"] == 0
    assert stats(report)["blocks_saved"] == 3  # its own blocks, under its own fingerprint


def test_four_requests_in_two_processes_save_a_new_prefix_once(workdir, checkpoint, store, cold):
    names = list(READERS)[2:6]
    procs = [VllmProc(workdir, f"concurrent-{p}", dict(checkpoint=checkpoint, store=store.address, pause_before=[0],
                                                      batches=[[job(READERS[n]) for n in names[2 * p: 2 * p + 2]]])).start()
             for p in range(2)]
    try:
        for proc in procs:  # both loaded, then both released at once: the requests race for the prefix
            proc.wait_paused(0)
        for proc in procs:
            proc.go(0)
        reports = [proc.result() for proc in procs]
    finally:
        for proc in procs:
            proc.stop()
    counters = [stats(r) for r in reports]
    assert sum(c["blocks_leased"] for c in counters) == 4  # one lease per prefix block across both engines
    assert sum(c["blocks_saved"] for c in counters) == 4  # so each block was written once
    waiter = next(i for i, c in enumerate(counters) if c["blocks_saved"] == 0)
    assert counters[waiter]["requests_waited"] >= 1 and counters[waiter]["blocks_loaded"] >= 4  # the other engine waited, then loaded
    assert [r["num_cached_tokens"] for r in requests(reports[waiter])] == [len(CONCURRENT)] * 2  # and computed only the tails
    for name, result in zip(names, [r for report in reports for r in requests(report)]):
        assert_same_answer(result, cold[name])


def test_store_killed_mid_run_every_request_finishes(workdir, checkpoint, cold):
    srv = ServerProc(workdir / "outage-store", flags={"host_memory": "256MiB", "ssd_capacity": "1GiB"}).start()
    proc = VllmProc(workdir, "outage", dict(checkpoint=checkpoint, store=srv.address, pause_before=[1, 2],
                                            extra={"retry_after_s": 0.5, "timeout_s": 2},
                                            batches=[[job(READERS["outage0"])], [job(READERS["outage1"]), job(READERS["outage2"])],
                                                     [job(READERS["outage3"])]])).start()
    try:
        proc.wait_paused(1)
        srv.stop(signal.SIGKILL)  # the store dies between batches: the next batch must be served without it
        proc.go(1)
        proc.wait_paused(2)
        srv.start()  # back on the same port, empty host tier: the connector reconnects
        proc.go(2)
        report = proc.result()
    finally:
        proc.stop()
        srv.stop()
    results = requests(report)
    assert [r["finish_reason"] for r in results] == ["length"] * 4
    for name, result in zip(["outage0", "outage1", "outage2", "outage3"], results):
        assert_same_answer(result, cold[name])
    counters = stats(report)
    assert counters["store_errors"] >= 1
    assert counters["reconnects"] == 2
    assert counters["blocks_saved"] >= 2 + 2  # before the outage, and again after the restart

