"""The router as a real process in front of real workers and a real store: answers, routing, failover;
and in process, its HTTP answers (http_server.py): JSON, OpenAI error bodies, server-sent events."""
from __future__ import annotations

import http.client
import json
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engines.config import ModelConfig
from engines.fingerprint import checkpoint_fingerprint
from engines.generate import generate_greedy
from engines.protocol import PrefillRequest, PrefillResponse, post_json
from engines.router import RouterConfig, RouterServer
from engines.tokenizer import ByteTokenizer
from kvclient.client import KVClient
from tests.engines.procs import REPO_ROOT, WorkerProc, start_decode, start_prefill
from tests.engines.tiny import make_cache
from tests.serverproc import ServerProc, free_port

BLOCK = 16
TOKENIZER = ByteTokenizer()
TEXT = "A router sends each prompt where its prefix is warm, unless that worker is already busy. "


def prompt_text(tag: str, repeat: int = 2) -> str:
    """A distinct prompt per test (tag first), so no test sees blocks or warm prefixes of another."""
    return f"[{tag}] " + TEXT * repeat


@dataclass
class RouterProc(WorkerProc):
    """`python -m engines.router` in front of the given workers; started and stopped like a worker process."""

    role: str = "router"
    store_address: str = ""
    checkpoint_dir: Path = Path()
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        args = [sys.executable, "-m", "engines.router", "--port", str(self.port),
                "--prefill", ",".join(self.prefill), "--decode", ",".join(self.decode)]
        for k, v in self.flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        return args

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
            return json.loads(resp.read())

    def routed(self, request_id: str) -> dict[str, str]:
        """The structured log line of one request, as {field: value}."""
        for line in self.log().splitlines():
            if f"request_id={request_id}" in line and " routed " in line:
                # JSON values (scores, attempts) may hold spaces inside strings; they end at "] key=" or the line's end.
                return dict(re.findall(r"(\w+)=(\[.*?\](?= \w+=|$)|\S+)", line.split(" routed ", 1)[1]))
        raise AssertionError(f"no routed line for {request_id}:\n{self.log()}")

    def complete(self, **body) -> dict:
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def stream(self, **body) -> list[dict]:
        """Every SSE event's JSON, in order; the literal [DONE] becomes {"done": True}."""
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            for line in resp:
                if line.startswith(b"data: "):
                    payload = line[len(b"data: "):].strip()
                    events.append({"done": True} if payload == b"[DONE]" else json.loads(payload))
        return events


def expected_tokens(tiny_model, text: str, max_tokens: int) -> list[int]:
    return generate_greedy(tiny_model, make_cache(tiny_model, num_pages=128), TOKENIZER.encode(text), max_tokens,
                           eos_id=tiny_model.config.eos_token_id)


def start_workers(store: ServerProc, checkpoint: Path, log_dir: Path, roles: list[str]) -> list[WorkerProc]:
    """Short write leases: a killed worker's leases lapse in 2 s, not the default 30, so a retry need not wait long."""
    starters = {"prefill": start_prefill, "decode": start_decode}
    with ThreadPoolExecutor(len(roles)) as pool:
        futures = [pool.submit(starters[role], store.address, checkpoint, log_dir, dtype="float32",
                               block_tokens=BLOCK, threads=1, num_pages=128, lease_ttl_s=2) for role in roles]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("router-logs")


@pytest.fixture(scope="module")
def workers(server, tiny_checkpoint, log_dir):
    """prefill_a, prefill_b, decode (shared by every test), and a victim of each role that one test kills."""
    names = ["prefill_a", "prefill_b", "decode", "prefill_victim", "decode_victim"]
    procs = start_workers(server, tiny_checkpoint, log_dir, ["prefill", "prefill", "decode", "prefill", "decode"])
    yield dict(zip(names, procs))
    for proc in procs:
        proc.stop()


@pytest.fixture
def make_router(log_dir):
    started: list[RouterProc] = []

    def start(prefill: list[WorkerProc | str], decode: list[WorkerProc | str], **flags) -> RouterProc:
        urls = lambda ws: [w if isinstance(w, str) else w.url for w in ws]  # noqa: E731
        router = RouterProc(flags=flags, log_dir=log_dir, prefill=urls(prefill), decode=urls(decode)).start(20)
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


@pytest.fixture
def lease_holder(server, tiny_checkpoint):
    """A client with the workers' fingerprint that can hold a prompt's first block, so a prefill waits on it."""
    fingerprint = checkpoint_fingerprint(tiny_checkpoint, ModelConfig.from_json(tiny_checkpoint), torch.float32, BLOCK)
    with KVClient(server.address, fingerprint) as client:
        yield client


def wait_until(predicate, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_completion_equals_in_process_generation_and_stream_equals_non_stream(workers, make_router, tiny_model):
    router = make_router([workers["prefill_a"], workers["prefill_b"]], [workers["decode"]])
    text = prompt_text("plain")
    expected = expected_tokens(tiny_model, text, 20)

    done = router.complete(prompt=text, max_tokens=20)
    assert done["object"] == "text_completion"
    assert done["choices"][0]["text"] == TOKENIZER.decode(expected)
    assert done["usage"]["prompt_tokens"] == len(TOKENIZER.encode(text))
    assert done["usage"]["completion_tokens"] == len(expected)

    events = router.stream(prompt=TOKENIZER.encode(text), max_tokens=20)
    assert events[-1] == {"done": True}
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == done["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == done["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected)
    # The same prompt again: its blocks are in the store now, and the router says so.
    assert router.complete(prompt=text, max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_bad_requests_get_400_and_no_workers_get_503(make_router):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    router = make_router(dead, dead, max_attempts=2, deadline_s=5)
    with pytest.raises(urllib.error.HTTPError) as bad:
        router.complete(prompt="", max_tokens=4)
    assert bad.value.code == 400
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as unavailable:
        router.stream(prompt="hello", max_tokens=4)
    assert unavailable.value.code == 503 and time.monotonic() - started < 5
    assert "no prefill worker succeeded" in json.loads(unavailable.value.read())["error"]["message"]


def test_routing_prefers_the_warm_prefix_when_loads_are_equal(workers, make_router):
    a, b = workers["prefill_a"], workers["prefill_b"]
    router = make_router([a, b], [workers["decode"]])
    text = prompt_text("warm-b")
    post_json(b.url + "/prefill", PrefillRequest("warm-b", TOKENIZER.encode(text)), PrefillResponse)

    done = router.complete(prompt=text + "and a new question?", max_tokens=2)
    line = router.routed(done["id"])
    assert line["prefill"] == b.url, line  # a is first in the list and as idle: only the warm prefix picks b
    scores = {s["url"]: s for s in json.loads(line["prefill_scores"])}
    assert scores[b.url]["matched_blocks"] > 0 and scores[a.url]["matched_blocks"] == 0


def test_routing_avoids_a_heavily_loaded_worker_even_if_warm(workers, make_router, lease_holder):
    a, b = workers["prefill_a"], workers["prefill_b"]
    router = make_router([a, b], [workers["decode"]])
    text = prompt_text("warm-busy-a")
    post_json(a.url + "/prefill", PrefillRequest("warm-a", TOKENIZER.encode(text)), PrefillResponse)

    # Load a with three long prefills stuck waiting on a block the test holds the write lease of.
    blocker = TOKENIZER.encode(prompt_text("blocker", repeat=4))
    lease_holder.acquire(lease_holder.block_keys(blocker)[:1], ttl_s=30)
    with ThreadPoolExecutor(3) as pool:
        stuck = [pool.submit(post_json, a.url + "/prefill", PrefillRequest(f"stuck-{i}", blocker), PrefillResponse)
                 for i in range(3)]
        try:
            wait_until(lambda: a.health().queue_depth == 3)
            done = router.complete(prompt=text + "and a new question?", max_tokens=2)
        finally:
            lease_holder.release(lease_holder.block_keys(blocker)[:1])
        for f in stuck:
            f.result()
    line = router.routed(done["id"])
    assert line["prefill"] == b.url, line
    scores = {s["url"]: s for s in json.loads(line["prefill_scores"])}
    assert scores[a.url]["matched_blocks"] > 0 and scores[a.url]["queue"] == 3


def test_prefill_worker_killed_mid_request_is_retried_and_the_answer_is_complete(
        workers, make_router, lease_holder, tiny_model):
    victim, survivor = workers["prefill_victim"], workers["prefill_b"]
    router = make_router([victim, survivor], [workers["decode"]])
    text = prompt_text("kill-prefill")
    expected = expected_tokens(tiny_model, text, 16)

    # The victim is first in the list and as idle as the survivor, so it gets the request; holding the
    # prompt's first block keeps that request in flight until the victim is dead.
    first_block = lease_holder.block_keys(TOKENIZER.encode(text))[:1]
    lease_holder.acquire(first_block, ttl_s=30)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(router.complete, prompt=text, max_tokens=16)
        try:
            wait_until(lambda: victim.health().queue_depth == 1)
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
        finally:
            lease_holder.release(first_block)
        done = pending.result(timeout=60)

    assert done["choices"][0]["text"] == TOKENIZER.decode(expected)
    assert done["usage"]["completion_tokens"] == len(expected)
    line = router.routed(done["id"])
    attempts = json.loads(line["attempts"])
    assert [(a["stage"], a["url"], a["error"] is None) for a in attempts] == [
        ("prefill", victim.url, False), ("prefill", survivor.url, True), ("decode", workers["decode"].url, True)]


def test_decode_failure_after_streamed_tokens_ends_with_an_error_event_not_a_restart(
        workers, make_router, tiny_model):
    victim = workers["decode_victim"]
    router = make_router([workers["prefill_a"]], [victim, workers["decode"]])
    text = prompt_text("kill-decode")
    max_tokens = 320
    expected = TOKENIZER.decode(expected_tokens(tiny_model, text, max_tokens))

    body = json.dumps({"prompt": text, "max_tokens": max_tokens, "stream": True}).encode()
    req = urllib.request.Request(router.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            events.append(json.loads(line[len(b"data: "):]) if b"[DONE]" not in line else {"done": True})
            if len(events) == 1:
                victim.proc.send_signal(signal.SIGKILL)
    assert "error" in events[-1] and {"done": True} not in events, events[-3:]
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed and expected.startswith(streamed) and len(streamed) < len(expected)
    attempts = json.loads(router.routed(events[0]["id"])["attempts"])
    assert [a["stage"] for a in attempts] == ["prefill", "decode"]  # no second decode: nothing restarted


# ---- in process: the router's HTTP (http_server.py) -----------------------------------------------

@pytest.fixture
def router_server():
    """A RouterServer in this process whose workers are all dead: everything that needs no worker."""
    dead = (f"http://127.0.0.1:{free_port()}",)
    config = RouterConfig(dead, dead, max_attempts=1, deadline_s=5, probe_timeout_s=0.2, model_name="m")
    server = RouterServer(config, port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
    server.router.close()


def call(server, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if isinstance(body, dict) else body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_router_http_answers_json_with_openai_error_bodies(router_server):
    status, headers, body = call(router_server, "GET", "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "prefill": list(router_server.router.config.prefill_urls),
                                "decode": list(router_server.router.config.decode_urls)}
    assert json.loads(call(router_server, "GET", "/v1/models")[2])["data"] == [{"id": "m", "object": "model"}]
    for method, path, request, status, kind in [
            ("GET", "/nowhere", None, 404, "not_found"), ("POST", "/v1/chat", {}, 404, "not_found"),
            ("POST", "/v1/completions", b"{", 400, "invalid_request_error"),
            ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, 503, "worker_unavailable"),
            ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}, 503, "worker_unavailable")]:
        got, headers, body = call(router_server, method, path, request)
        assert (got, headers["Content-Type"], json.loads(body)["error"]["type"]) == (status, "application/json", kind), path
    done = json.loads(call(router_server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0})[2])
    assert done["choices"][0]["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 0


def test_router_http_streams_server_sent_events(router_server):
    """max_tokens=0 needs no worker, yet streams the whole shape: a chunk, the final chunk with usage, [DONE]."""
    status, headers, body = call(router_server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream" and headers["Connection"] == "close"
    events = body.split(b"\n\n")
    assert events[-1] == b"" and all(e.startswith(b"data: ") for e in events[:-1])
    payloads = [e[len(b"data: "):] for e in events[:-1]]
    assert payloads[-1] == b"[DONE]"
    first, final = json.loads(payloads[0]), json.loads(payloads[-2])
    assert first["choices"][0]["text"] == "" and final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["prompt_tokens"] == len(TOKENIZER.encode("hi"))
