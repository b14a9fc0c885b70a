"""The wire contract between router, prefill workers and decode workers: JSON over HTTP/1.1.

Kept in one module so both sides import the same shapes. KV bytes never travel
here: the prefill worker publishes blocks to kvstore and the decode worker fetches
them by key; these messages carry only token ids and bookkeeping.

Endpoints
---------
prefill worker
    POST /prefill   PrefillRequest  -> PrefillResponse
    POST /match     MatchRequest    -> MatchResponse   (leading blocks warm in this worker, and where its store has them)
    GET  /health                    -> WorkerHealth
decode worker
    POST /decode    DecodeRequest   -> stream of NDJSON lines, each a DecodeEvent
    GET  /health                    -> WorkerHealth
"""
from __future__ import annotations

import dataclasses
import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator, Type, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_ids: list[int]


@dataclass(frozen=True)
class PrefillResponse:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int      # tokens whose KV came from kvstore
    num_computed_tokens: int    # tokens this worker ran through the model
    first_token: int            # greedy/sampled token after the prompt
    num_published_blocks: int   # full blocks now in kvstore for this prompt


@dataclass(frozen=True)
class MatchRequest:
    prompt_ids: list[int]


@dataclass(frozen=True)
class MatchResponse:
    """How much of a prompt's leading run this worker would not compute, and what loading it would cost.

    matched_blocks counts the worker's own warm prefix (its engine cache). local_blocks and
    remote_blocks split the leading run the worker's kvstore node reports present (Lookup's
    KeyStatus tier): on that node's own tiers, or REMOTE, held by a peer node of the cluster,
    so a load first copies it across the network. A worker whose store is not in cluster mode
    reports no REMOTE blocks; an older worker reports neither count (both 0).
    """

    matched_blocks: int
    total_blocks: int
    local_blocks: int = 0
    remote_blocks: int = 0


@dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_ids: list[int]
    first_token: int
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    stop_at_eos: bool = True


@dataclass(frozen=True)
class DecodeEvent:
    """One streamed line: a token, or the final summary (done=True)."""

    token: int | None = None
    text: str = ""
    done: bool = False
    finish_reason: str | None = None      # "length" | "stop" | "error"
    num_fetched_tokens: int = 0           # in the final event: prompt tokens whose KV came from kvstore
    error: str | None = None


@dataclass(frozen=True)
class WorkerHealth:
    role: str                  # "prefill" | "decode"
    status: str = "ok"
    queue_depth: int = 0       # requests waiting or running
    active_tokens: int = 0     # tokens in flight (prompt + generated) across running requests
    computed_tokens_total: int = 0
    extra: dict = field(default_factory=dict)


def to_json(obj: Any) -> bytes:
    return json.dumps(dataclasses.asdict(obj)).encode()


def from_json(cls: Type[T], data: bytes | str | dict) -> T:
    doc = data if isinstance(data, dict) else json.loads(data)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in doc.items() if k in names})


def post_json(url: str, body: Any, response_cls: Type[T], timeout_s: float = 300) -> T:
    req = urllib.request.Request(url, data=to_json(body), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return from_json(response_cls, resp.read())


def get_json(url: str, response_cls: Type[T], timeout_s: float = 5) -> T:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return from_json(response_cls, resp.read())


def stream_ndjson(url: str, body: Any, timeout_s: float = 300) -> Iterator[DecodeEvent]:
    """POST body and yield DecodeEvents as the worker writes them (one JSON object per line)."""
    req = urllib.request.Request(url, data=to_json(body), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for line in resp:
            if line.strip():
                yield from_json(DecodeEvent, line)
