"""WorkerEngine: what prefill and decode workers share: model, paged cache, store adapter, one lock.

It owns the common command line (store, checkpoint, dtype, cache size, ...)
and building those objects from it. The lock serializes everything that
touches the model or the cache's pages (forward passes, allocation,
gather/scatter); store round trips and lease waits happen outside it, so one
request waiting for a block never stalls another's compute. It refuses to own
HTTP (worker_common.py) and request policy (prefill.py, decode.py).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from engines.adapter import PrefixLoad, StoreAdapter
from engines.attention import SeqChunk
from engines.checkpoint import load_checkpoint
from engines.cuda_graphs import DEFAULT_MAX_TOKENS
from engines.config import ModelConfig, dtype_from_name
from engines.fingerprint import checkpoint_fingerprint
from engines.model import LlamaForCausalLM
from engines.paged_cache import CacheFullError, PagedKVCache
from engines.protocol import WorkerHealth
from engines.http_server import HTTPError
from kvwire.logs import setup_logging
from engines.worker_common import Counters, InFlight, JsonHTTPServer
from kvclient.errors import ChecksumMismatchError

log = logging.getLogger(__name__)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="kvstore address HOST:PORT")
    parser.add_argument("--checkpoint", required=True, help="HF Llama checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16; default: the config's torch_dtype")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--cuda-graph-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="on CUDA, passes of up to this many tokens replay piecewise CUDA graphs; 0: off")
    parser.add_argument("--num-pages", type=int, default=2048, help="pages in this worker's KV cache")
    parser.add_argument("--tenant", default=None)
    parser.add_argument("--token", default=os.environ.get("KVSTORE_TOKEN"),
                        help="bearer token for kvstore (default $KVSTORE_TOKEN, which keeps it out of ps)")
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--model-name", default=None, help="fingerprint model name; default: checkpoint dir name")
    parser.add_argument("--revision", default=None, help="fingerprint revision; default: digest of config and weights")
    parser.add_argument("--wait-timeout-s", type=float, default=30.0, help="longest wait for a block another worker computes")
    parser.add_argument("--lease-ttl-s", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")


@dataclass
class WorkerEngine:
    model: LlamaForCausalLM
    cache: PagedKVCache
    adapter: StoreAdapter
    wait_timeout_s: float = 30.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _seq_ids: Iterator[int] = field(default_factory=itertools.count)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WorkerEngine":
        if args.threads:
            torch.set_num_threads(args.threads)
        config = ModelConfig.from_json(args.checkpoint)
        dtype = dtype_from_name(args.dtype or config.torch_dtype)
        model = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
        if torch.device(args.device).type == "cuda":
            model.use_cuda_graphs(args.cuda_graph_tokens)
        cache = PagedKVCache.for_model(config, args.num_pages, args.block_tokens, dtype=dtype, device=args.device)
        fingerprint = checkpoint_fingerprint(args.checkpoint, config, dtype, args.block_tokens, args.model_name, args.revision)
        adapter = StoreAdapter.for_cache(args.store, fingerprint, cache, tenant=args.tenant, token=args.token,
                                         transport=args.transport, lease_ttl_s=args.lease_ttl_s)
        return cls(model, cache, adapter, args.wait_timeout_s)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def block_tokens(self) -> int:
        return self.cache.block_tokens

    def check_prompt(self, prompt_ids: Sequence[int], extra_tokens: int = 0) -> list[int]:
        """Ids as ints, or a 400: empty, out of vocabulary, or longer than the model's positions."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise HTTPError(400, "empty prompt")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise HTTPError(400, f"token id outside vocabulary [0, {self.config.vocab_size})")
        if len(prompt) + extra_tokens > self.config.max_position_embeddings:
            raise HTTPError(400, f"{len(prompt)} + {extra_tokens} tokens exceed max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
        return prompt

    @contextmanager
    def pages(self, num_tokens: int) -> Iterator[tuple[object, list[int]]]:
        """A fresh sequence id and block table for num_tokens, freed on exit; 503 when the cache is full."""
        seq_id = next(self._seq_ids)
        with self.lock:
            try:
                table = self.cache.allocate(seq_id, num_tokens)
            except CacheFullError as err:
                raise HTTPError(503, str(err)) from None
        try:
            yield seq_id, table
        finally:
            with self.lock:
                self.cache.free(seq_id)

    def forward_after_prefix(self, prompt: list[int], table: list[int], load: PrefixLoad) -> tuple[torch.Tensor | None, int]:
        """Land load's cached prefix in table's pages and compute the rest of prompt (call under the lock).

        Returns the last prompt token's logits (None when the prefix covered the
        whole prompt) and how many tokens the prefix supplied. The prefix lands
        layer by layer under the forward pass; one that fails its check is thrown
        away and the whole prompt computed instead.
        """
        cached = load.num_blocks * self.block_tokens
        load.start(self.cache, table)
        logits = None
        if cached < len(prompt):
            logits = self.model(self.cache, [SeqChunk(prompt[cached:], cached, table)], last_only=True,
                                before_layer=load.wait_for_layer)
        try:
            load.finish()
        except ChecksumMismatchError:
            log.warning("cached prefix failed its checksum; recomputing the whole prompt")
            return self.model(self.cache, [SeqChunk(prompt, 0, table)], last_only=True), 0
        return logits, cached

    def health(self, role: str, in_flight: InFlight, counters: Counters) -> WorkerHealth:
        """/health: load for the router, counters for tests and dashboards, the fingerprint for operators."""
        totals = counters.snapshot()
        fp = self.adapter.fingerprint
        return WorkerHealth(
            role=role,
            queue_depth=in_flight.requests,
            active_tokens=in_flight.tokens,
            computed_tokens_total=totals.pop("computed_tokens_total", 0),
            extra={**totals, "fingerprint": fp.id_hex, "model": fp.model, "dtype": fp.dtype,
                   "block_tokens": fp.block_tokens, "free_pages": self.cache.num_free_pages},
        )

    def close(self) -> None:
        self.adapter.close()


def run_worker(role: str, argv: Sequence[str] | None, make_worker, add_args=None) -> None:
    """Parse the common flags (plus add_args'), build the engine and make_worker(engine, args), serve until SIGTERM.

    make_worker returns an object with health() and routes(); the start line
    names the URL and fingerprint so logs tell which workers can share blocks.
    """
    parser = argparse.ArgumentParser(prog=f"python -m engines.{role}")
    add_engine_args(parser)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    setup_logging("info")
    engine = WorkerEngine.from_args(args)
    worker = make_worker(engine, args)
    server = JsonHTTPServer(args.host, args.port, worker.health, worker.routes())
    fp = engine.adapter.fingerprint
    print(f"{role} worker listening on http://{args.host}:{server.port} store={args.store} "
          f"model={fp.model} dtype={fp.dtype} block_tokens={fp.block_tokens} fingerprint={fp.id_hex}", flush=True)
    try:
        server.serve_until_signal()
    finally:
        engine.close()
