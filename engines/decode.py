"""Decode worker: pulls a prompt's KV from kvstore into its own pages and streams generated tokens.

Per request: wait for the prompt's full blocks and pin or fetch them, land them
in pages (on a GPU layer by layer, under the forward pass), recompute what the
store lacks (always the trailing partial block, which has no key), then feed
first_token (chosen by the prefill worker) and generate, one NDJSON
DecodeEvent per token. The stream carries first_token too, so it alone is the
whole completion. It refuses to own prefill and batching across requests
(steps of concurrent requests interleave under the engine lock).

    python -m engines.decode --store HOST:PORT --checkpoint DIR --port N [--dtype float32] [--device cpu]

Endpoints (engines/protocol.py): POST /decode (NDJSON stream), GET /health.
"""
from __future__ import annotations

import logging
from typing import Generator, Iterator, Sequence

import torch

from engines.adapter import PrefixLoad
from engines.attention import SeqChunk
from engines.completions import TextStream
from engines.generate import sample_next
from engines.http_server import HTTPError
from engines.protocol import DecodeEvent, DecodeRequest, WorkerHealth
from engines.worker_common import Counters, InFlight, Route
from engines.worker_engine import WorkerEngine, run_worker
from kvclient.errors import KVStoreError

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, engine: WorkerEngine) -> None:
        self.engine = engine
        self.in_flight = InFlight()
        self.counters = Counters("requests_total", "computed_tokens_total", "fetched_tokens_total", "generated_tokens_total",
                                 "store_failures_total")

    def routes(self) -> dict[str, Route]:
        return {"/decode": Route(DecodeRequest, self.decode)}

    def decode(self, req: DecodeRequest) -> Iterator[DecodeEvent]:
        """Validate and fetch before the stream starts, so bad requests get a 400, not a broken stream."""
        prompt = self.engine.check_prompt(req.prompt_ids, max(req.max_tokens - 1, 0))
        if not 0 <= req.first_token < self.engine.config.vocab_size:
            raise HTTPError(400, f"first_token {req.first_token} outside vocabulary")
        adapter = self.engine.adapter
        keys = adapter.block_keys(prompt)
        try:
            with adapter.session() as client:
                num_present = adapter.available_prefix(client, keys, self.engine.wait_timeout_s)
                # Pinned (GPU) or fetched (host) now; it lands in pages once the stream starts.
                load = adapter.prepare_load(client, keys[:num_present])
        except KVStoreError as err:  # the store is a cache: down or restarting, the prompt is computed instead
            log.warning("store unreachable for decode %s; computing the prompt: %s", req.request_id, err)
            self.counters.add(store_failures_total=1)
            load = adapter.no_load()
        return self._generate(req, prompt, load)

    def _generate(self, req: DecodeRequest, prompt: list[int], load: PrefixLoad) -> Iterator[DecodeEvent]:
        engine = self.engine
        fetched_tokens = load.num_blocks * engine.block_tokens
        budget = len(prompt) + max(req.max_tokens, 0)
        text = TextStream()
        self.in_flight.add(budget)
        try:
            finish_reason, fetched_tokens = yield from self._tokens(req, prompt, load, text)
            # The tail: a multi-byte character the last tokens left unfinished, as U+FFFD.
            yield DecodeEvent(text=text.finish(), done=True, finish_reason=finish_reason, num_fetched_tokens=fetched_tokens)
        except HTTPError as err:
            yield DecodeEvent(done=True, finish_reason="error", error=str(err), num_fetched_tokens=fetched_tokens)
        except Exception as err:
            log.exception("decode failed")
            yield DecodeEvent(done=True, finish_reason="error", error=f"{type(err).__name__}: {err}",
                              num_fetched_tokens=fetched_tokens)
        finally:
            load.abort()  # a stream never started or cut short still drops its pin
            self.in_flight.done(budget)

    @torch.inference_mode()
    def _tokens(self, req: DecodeRequest, prompt: list[int], load: PrefixLoad,
                text: TextStream) -> Generator[DecodeEvent, None, tuple[str, int]]:
        """Yields one event per token; returns the finish reason and how many prompt tokens came from the store."""
        engine = self.engine
        if req.max_tokens <= 0:
            return "length", 0
        generator = torch.Generator().manual_seed(req.seed) if req.temperature > 0 else None
        # The last generated token is returned but never fed back, so it needs no slot.
        with engine.pages(len(prompt) + req.max_tokens - 1) as (_, table):
            with engine.lock:
                _, fetched_tokens = engine.forward_after_prefix(prompt, table, load)
            self.counters.add(requests_total=1, fetched_tokens_total=fetched_tokens,
                              computed_tokens_total=len(prompt) - fetched_tokens)
            token, generated = req.first_token, 1
            while True:
                self.counters.add(generated_tokens_total=1)
                yield DecodeEvent(token=token, text=text.push(token))
                if req.stop_at_eos and token == engine.config.eos_token_id:
                    return "stop", fetched_tokens
                if generated == req.max_tokens:
                    return "length", fetched_tokens
                with engine.lock:
                    logits = engine.model(engine.cache, [SeqChunk([token], len(prompt) + generated - 1, table)],
                                          last_only=True)
                self.counters.add(computed_tokens_total=1)
                token, generated = int(sample_next(logits, req.temperature, generator)[0]), generated + 1

    def health(self) -> WorkerHealth:
        return self.engine.health("decode", self.in_flight, self.counters)


def main(argv: Sequence[str] | None = None) -> None:
    run_worker("decode", argv, lambda engine, args: DecodeWorker(engine))


if __name__ == "__main__":
    main()
