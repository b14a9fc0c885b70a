"""The OpenAI `/v1/completions` subset the router speaks: request parsing, response and stream chunk shapes.

Owns only the client-facing JSON (SSE framing is http_server.py's); it refuses to
know about workers or routing (router.py). Supported: prompt as text (ByteTokenizer)
or a list of token ids, max_tokens, temperature, seed, stream. Anything else a client
sends is ignored, except n > 1 and a batch of prompts, which are refused rather than
half-served.
"""
from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from engines.tokenizer import NUM_BYTES, ByteTokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class BadRequest(ValueError):
    """The client's request is malformed; answered with HTTP 400 and never retried."""


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int = 0
    stream: bool = False
    model: str = ""
    request_id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex[:24])

    @classmethod
    def parse(cls, body: bytes, tokenizer: ByteTokenizer) -> "CompletionRequest":
        try:
            doc = json.loads(body or b"{}")
        except ValueError as err:
            raise BadRequest(f"body is not JSON: {err}") from None
        if not isinstance(doc, dict):
            raise BadRequest("body must be a JSON object")
        if doc.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported")
        return cls(
            prompt_ids=_prompt_ids(doc.get("prompt"), tokenizer),
            max_tokens=_number(doc, "max_tokens", int, DEFAULT_MAX_TOKENS),
            temperature=_number(doc, "temperature", float, 0.0),
            seed=_number(doc, "seed", int, 0),
            stream=bool(doc.get("stream", False)),
            model=str(doc.get("model") or ""),
        )


def _prompt_ids(prompt: Any, tokenizer: ByteTokenizer) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise BadRequest(f"token ids must lie in [0, {tokenizer.vocab_size})")
        return list(prompt)
    raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids (one prompt only)")


def _number(doc: dict, name: str, kind: type, default: Any) -> Any:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}")
    if value < 0:
        raise BadRequest(f"{name} must not be negative")
    return kind(value)


class TextStream:
    """Turns byte-token ids into text deltas whose concatenation equals ByteTokenizer.decode(all ids).

    Decoding token by token would split multi-byte characters; an incremental
    UTF-8 decoder holds a partial character back until it completes. The one such
    decoder: the router's completions and the decode worker's events both use it.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(bytes([token]) if 0 <= token < NUM_BYTES else b"")

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


@dataclass
class CompletionResult:
    """What the router accumulated for one request: enough for either response shape."""

    request: CompletionRequest
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int = 0
    error: str | None = None

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _envelope(self, choice: dict) -> dict:
        return {"id": self.request.request_id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": [choice]}

    def usage(self) -> dict:
        prompt = len(self.request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": len(self.token_ids),
                "total_tokens": prompt + len(self.token_ids),
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def response(self) -> dict:
        return {**self._envelope(self._choice(self.text, self.finish_reason)), "usage": self.usage()}

    def chunk(self, text: str, finish_reason: str | None = None, with_usage: bool = False) -> dict:
        doc = self._envelope(self._choice(text, finish_reason))
        if with_usage:
            doc["usage"] = self.usage()
        return doc


def error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}
