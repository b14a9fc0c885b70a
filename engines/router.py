"""The router: an OpenAI-style HTTP front end that sends each request to one prefill and one decode worker.

It owns worker choice (routing_policy.py ranks, this module probes and calls:
each prefill worker's /health, and its /match, which says how much of the prompt
is warm in that worker and where its kvstore node has the rest, on its own tiers
or REMOTE at a peer node in cluster mode) and failure handling: a worker that
fails before the client has seen a token is replaced by the next in the ranking,
within the request's budget (attempts per stage and one deadline). Once a token has reached the client, a failure ends
the stream with an error event instead: restarting would repeat output the
client already has. It refuses to own KV bytes (workers move them through
kvstore) and the JSON shapes of the client API (completions.py).

    python -m engines.router --port 8000 --prefill http://127.0.0.1:8101 --decode http://127.0.0.1:8201
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import sys
import threading
import time
import urllib.error
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from engines.completions import BadRequest, CompletionRequest, CompletionResult, TextStream, error_body
from engines.http_server import Handler, Server
from kvwire.logs import setup_logging
from engines.protocol import (
    DecodeEvent, DecodeRequest, MatchRequest, MatchResponse, PrefillRequest, PrefillResponse, WorkerHealth,
    get_json, post_json, stream_ndjson,
)
from engines.routing_policy import PolicyConfig, RoutingPolicy, Score, WorkerProbe
from engines.tokenizer import ByteTokenizer

log = logging.getLogger("engines.router")

# What a dead, restarting or overloaded worker looks like from here; anything else is a bug, not a retry.
WORKER_FAILURES = (OSError, http.client.HTTPException, ValueError, TypeError)


@dataclass(frozen=True)
class RouterConfig:
    prefill_urls: tuple[str, ...]
    decode_urls: tuple[str, ...]
    max_attempts: int = 3          # per stage (prefill, decode)
    deadline_s: float = 120.0      # the whole request, retries included
    probe_timeout_s: float = 1.0   # /health and /match; a worker slower than this is ranked last
    model_name: str = "kvstore-bundled"
    policy: PolicyConfig = field(default_factory=PolicyConfig)


class RequestFailed(RuntimeError):
    """No worker could serve a stage within the budget; answered 503 (or an error event once streaming)."""


@dataclass
class Budget:
    max_attempts: int
    deadline: float  # time.monotonic()

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Trace:
    """Everything the per-request log line reports."""

    request_id: str
    prefill_scores: list[Score] = field(default_factory=list)
    decode_scores: list[Score] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)  # {"stage", "url", "error"}: every worker call, in order
    prefill_url: str | None = None
    decode_url: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    fetched_tokens: int = 0  # prompt tokens the decode worker loaded from kvstore rather than computing

    def fields(self, outcome: str, result: CompletionResult) -> dict:
        return {
            "request_id": self.request_id, "outcome": outcome,
            "prefill": self.prefill_url, "decode": self.decode_url,
            "prompt_tokens": len(result.request.prompt_ids), "cached_tokens": result.cached_tokens,
            "fetched_tokens": self.fetched_tokens,
            "completion_tokens": len(result.token_ids),
            "ttft_ms": None if self.first_token_s is None else round(1000 * self.first_token_s, 1),
            "total_ms": round(1000 * (time.monotonic() - self.started), 1),
            "prefill_scores": _compact([s.as_log() for s in self.prefill_scores]),
            "decode_scores": _compact([s.as_log() for s in self.decode_scores]),
            "attempts": _compact(self.attempts),
        }

    def attempt(self, stage: str, url: str, error: str | None = None) -> None:
        self.attempts.append({"stage": stage, "url": url, "error": error})

    def failures(self, stage: str) -> list[str]:
        return [f"{a['url']}: {a['error']}" for a in self.attempts if a["stage"] == stage and a["error"]]


def _compact(doc) -> str:
    """JSON without spaces, so a log line stays one key=value token per field."""
    return json.dumps(doc, separators=(",", ":"))


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.policy = RoutingPolicy(config.policy)
        self.tokenizer = ByteTokenizer()
        self._inflight: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2 * (len(config.prefill_urls) + len(config.decode_urls)) + 2)

    # ---- probing and ranking -------------------------------------------------------

    def _probe(self, url: str, prompt_ids: list[int] | None) -> WorkerProbe:
        timeout = self.config.probe_timeout_s
        health_f = self._pool.submit(get_json, f"{url}/health", WorkerHealth, timeout)
        match_f = self._pool.submit(post_json, f"{url}/match", MatchRequest(prompt_ids), MatchResponse, timeout) if prompt_ids else None
        health = match = None
        try:
            health = health_f.result()
            match = match_f.result() if match_f else None
        except WORKER_FAILURES as err:
            log.debug("probe failed", extra={"url": url, "error": repr(err)})
        with self._lock:
            inflight = self._inflight[url]
        return WorkerProbe(url, health, match, inflight)

    def rank(self, urls: tuple[str, ...], prompt_ids: list[int] | None) -> list[Score]:
        probes = list(self._pool.map(lambda u: self._probe(u, prompt_ids), urls))
        return self.policy.rank(probes, len(prompt_ids) if prompt_ids else 0)

    def _candidates(self, scores: list[Score], budget: Budget) -> Iterator[str]:
        """The ranking in order, wrapping around, until the attempts or the deadline run out."""
        for attempt in range(budget.max_attempts):
            if budget.remaining_s() <= 0:
                return
            yield scores[attempt % len(scores)].url

    def _tracked(self, url: str):
        router = self

        class _Inflight:
            def __enter__(self):
                with router._lock:
                    router._inflight[url] += 1

            def __exit__(self, *exc):
                with router._lock:
                    router._inflight[url] -= 1

        return _Inflight()

    # ---- the two stages ------------------------------------------------------------

    def prefill(self, request: CompletionRequest, budget: Budget, trace: Trace) -> PrefillResponse:
        trace.prefill_scores = self.rank(self.config.prefill_urls, request.prompt_ids)
        body = PrefillRequest(request.request_id, request.prompt_ids)
        for url in self._candidates(trace.prefill_scores, budget):
            try:
                with self._tracked(url):
                    response = post_json(f"{url}/prefill", body, PrefillResponse, timeout_s=budget.remaining_s())
            except urllib.error.HTTPError as err:
                if 400 <= err.code < 500:
                    raise BadRequest(f"prefill worker refused the request: {_http_error_text(err)}") from None
                trace.attempt("prefill", url, f"HTTP {err.code}")
                continue
            except WORKER_FAILURES as err:
                trace.attempt("prefill", url, repr(err))
                continue
            trace.attempt("prefill", url)
            trace.prefill_url = url
            return response
        raise RequestFailed(f"no prefill worker succeeded: {trace.failures('prefill')}")

    def decode(self, request: CompletionRequest, prefill: PrefillResponse, budget: Budget, trace: Trace) -> Iterator[DecodeEvent]:
        """Yield the decode worker's events; retry only while none has been yielded.

        Yielding hands a token to the caller, who may already have sent it to the
        client; from then on a failure is reported as a final error event.
        """
        trace.decode_scores = self.rank(self.config.decode_urls, None)
        body = DecodeRequest(
            request.request_id, request.prompt_ids, prefill.first_token, request.max_tokens,
            temperature=request.temperature, seed=request.seed,
        )
        for url in self._candidates(trace.decode_scores, budget):
            yielded = False
            try:
                with self._tracked(url):
                    for event in stream_ndjson(f"{url}/decode", body, timeout_s=budget.remaining_s()):
                        if event.finish_reason == "error" and not yielded:
                            raise RuntimeError(event.error or "decode worker reported an error")
                        if not yielded:
                            trace.decode_url = url
                        yielded = True
                        yield event
                        if event.done:
                            trace.attempt("decode", url)
                            return
                    raise http.client.IncompleteRead(b"", None)  # stream ended without a final event
            except urllib.error.HTTPError as err:
                if 400 <= err.code < 500:
                    raise BadRequest(f"decode worker refused the request: {_http_error_text(err)}") from None
                failure = f"HTTP {err.code}"
            except (*WORKER_FAILURES, RuntimeError) as err:
                failure = repr(err)
            trace.attempt("decode", url, failure)
            if yielded:
                yield DecodeEvent(done=True, finish_reason="error", error=f"decode worker {url} failed mid-stream: {failure}")
                return
        raise RequestFailed(f"no decode worker succeeded: {trace.failures('decode')}")

    # ---- one completion --------------------------------------------------------------

    def complete(self, request: CompletionRequest, emit: Callable[[str, CompletionResult], None]) -> CompletionResult:
        """Run one request; emit(delta_text, result) is called per token once the first token is known.

        Raises BadRequest / RequestFailed only before the first emit; after it,
        failures end up in result.finish_reason == "error".
        """
        budget = Budget(self.config.max_attempts, time.monotonic() + self.config.deadline_s)
        trace = Trace(request.request_id)
        result = CompletionResult(request, request.model or self.config.model_name)
        outcome = "error"
        try:
            if request.max_tokens == 0:
                result.finish_reason = "length"
                outcome = "ok"
                return result
            prefill = self.prefill(request, budget, trace)
            result.cached_tokens = prefill.num_cached_tokens
            text = TextStream()
            for event in self.decode(request, prefill, budget, trace):
                if event.token is not None:
                    if trace.first_token_s is None:
                        trace.first_token_s = time.monotonic() - trace.started
                    result.token_ids.append(event.token)
                    delta = text.push(event.token)
                    result.text += delta
                    emit(delta, result)
                if event.done:
                    trace.fetched_tokens = event.num_fetched_tokens
                    tail = text.finish()
                    result.text += tail
                    if tail:
                        emit(tail, result)
                    result.finish_reason = event.finish_reason or "length"
                    result.error = event.error
            outcome = "ok" if result.finish_reason != "error" else "failed_mid_stream"
            return result
        finally:
            log.info("routed", extra=trace.fields(outcome, result))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _http_error_text(err: urllib.error.HTTPError) -> str:
    try:
        return err.read().decode(errors="replace")[:500]
    except OSError:
        return str(err)


class RouterHandler(Handler):
    """POST /v1/completions, GET /health, GET /v1/models. One thread per connection."""

    server: "RouterServer"

    @property
    def router(self) -> Router:
        return self.server.router

    def do_GET(self) -> None:
        if self.route_path == "/health":
            cfg = self.router.config
            self.send_json(200, {"status": "ok", "prefill": list(cfg.prefill_urls), "decode": list(cfg.decode_urls)})
        elif self.route_path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": self.router.config.model_name, "object": "model"}]})
        else:
            self.send_json(404, error_body(f"no route {self.path}", "not_found"))

    def do_POST(self) -> None:
        if self.route_path != "/v1/completions":
            self.send_json(404, error_body(f"no route {self.path}", "not_found"))
            return
        try:
            request = CompletionRequest.parse(self.read_body(), self.router.tokenizer)
        except BadRequest as err:
            self.send_json(400, error_body(str(err), "invalid_request_error"))
            return
        (self._stream if request.stream else self._complete)(request)

    def _complete(self, request: CompletionRequest) -> None:
        try:
            result = self.router.complete(request, lambda delta, result: None)
        except BadRequest as err:
            self.send_json(400, error_body(str(err), "invalid_request_error"))
        except RequestFailed as err:
            self.send_json(503, error_body(str(err), "worker_unavailable"))
        else:
            if result.finish_reason == "error":
                self.send_json(502, error_body(result.error or "worker failed", "worker_error"))
            else:
                self.send_json(200, result.response())

    def _stream(self, request: CompletionRequest) -> None:
        """Server-sent events; the 200 goes out with the first token, so failures before it get a real status."""
        started = False

        def emit(delta: str, result: CompletionResult) -> None:
            nonlocal started
            first = not started
            if first:
                self.start_events()
                started = True
            if delta or first:  # a token that only starts a multi-byte character adds no text yet
                self.send_event(result.chunk(delta))

        self.close_connection = True  # the stream ends with the connection, and so does an answer before it
        try:
            result = self.router.complete(request, emit)
        except BadRequest as err:
            self.send_json(400, error_body(str(err), "invalid_request_error"))
            return
        except RequestFailed as err:
            self.send_json(503, error_body(str(err), "worker_unavailable"))
            return
        if not started:  # max_tokens=0, or the worker finished without a token
            emit("", result)
        if result.finish_reason == "error":
            self.send_event(error_body(result.error or "worker failed", "worker_error"))
        else:
            self.send_event(result.chunk("", result.finish_reason, with_usage=True))
            self.send_event("[DONE]")


class RouterServer(Server):
    """The router's HTTP server (http_server.Server: one thread per connection, stops on SIGTERM)."""

    def __init__(self, config: RouterConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.router = Router(config)
        super().__init__(host, port, RouterHandler)


def _urls(value: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in value.split(",") if u.strip())
    if not urls:
        raise argparse.ArgumentTypeError("give at least one URL")
    return tuple(u if "://" in u else f"http://{u}" for u in urls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.router", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", type=_urls, required=True, help="prefill worker URLs, comma-separated")
    parser.add_argument("--decode", type=_urls, required=True, help="decode worker URLs, comma-separated")
    parser.add_argument("--max-attempts", type=int, default=RouterConfig.max_attempts, help="tries per stage")
    parser.add_argument("--deadline-s", type=float, default=RouterConfig.deadline_s, help="budget per request")
    parser.add_argument("--probe-timeout-s", type=float, default=RouterConfig.probe_timeout_s)
    parser.add_argument("--model-name", default=RouterConfig.model_name)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    config = RouterConfig(args.prefill, args.decode, args.max_attempts, args.deadline_s, args.probe_timeout_s, args.model_name)
    server = RouterServer(config, args.host, args.port)
    host, port = server.server_address[:2]
    log.info("router ready", extra={"url": f"http://{host}:{port}", "prefill": ",".join(config.prefill_urls),
                                    "decode": ",".join(config.decode_urls)})
    try:
        server.serve_until_signal()
    finally:
        server.router.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
