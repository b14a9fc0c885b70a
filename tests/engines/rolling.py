"""Engine load through a deployment's router, and the remote-hit ratio it sees, for rolling-restart tests and benchmarks.

LoadLoop runs client threads that send completions of fresh prompts (no two share a block) to the
router until stopped, and records each one's outcome. The router's log line of each request names
the prefill and decode workers and how many prompt tokens the decode worker fetched from kvstore.

The remote-hit ratio is defined on completions whose decode worker sits on another node than their
prefill worker: the prefill worker computed the prompt and published its full blocks on its own node,
so every full-block token the decode worker loaded instead of computing crossed from one node to the
other (its node's remote tier fetched it). ratio = fetched tokens / full-block prompt tokens, summed
over those completions. A node being restarted drops it: its workers compute instead of publishing
or fetching, and the blocks it held are not found meanwhile.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from engines.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
_FIELD = re.compile(r"(\w+)=(\[.*?\](?= \w+=|$)|\S+)")


@dataclass
class Completion:
    started: float            # time.monotonic()
    ended: float
    request_id: str = ""
    error: str = ""           # "" when the completion came back whole
    full_tokens: int = 0      # the prompt's full-block tokens
    prefill: str = ""         # worker URLs, from the router's log
    decode: str = ""
    fetched_tokens: int = 0


def routed(router_log: Path) -> dict[str, dict[str, str]]:
    """Every request's `routed` log line as {request_id: {field: value}}."""
    lines = {}
    for line in router_log.read_text(errors="replace").splitlines():
        if " routed " in line:
            fields = dict(_FIELD.findall(line.split(" routed ", 1)[1]))
            lines[fields.get("request_id", "")] = fields
    return lines


def whole(finish_reason: str, tokens: int, max_tokens: int) -> bool:
    """A completion that came back whole: max_tokens of them, or up to max_tokens ending in the model's EOS ("stop").
    The tiny random model ends about one in 20,000 of these prompts that way within 4 tokens (greedy, on CPU), and a
    rolling restart's load sends ~1,000: once, in CI, a whole answer was counted as a failure for it."""
    return (finish_reason == "length" and tokens == max_tokens) or (finish_reason == "stop" and 0 < tokens <= max_tokens)


class LoadLoop:
    def __init__(self, router_url: str, clients: int = 3, prompt_blocks: int = 4, block_tokens: int = 16,
                 max_tokens: int = 4, timeout_s: float = 120) -> None:
        self.router_url = router_url
        self.clients = clients
        self.prompt_blocks = prompt_blocks
        self.block_tokens = block_tokens
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.completions: list[Completion] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def prompt(self, client: int, n: int) -> list[int]:
        """prompt_blocks full blocks and half a block more, unique to (client, n) from its first block on."""
        head = TOKENIZER.encode(f"<{client}:{n}:{time.monotonic_ns()}> ")
        body = [(7 * i + 3 * client + n) % 200 + 32 for i in range((self.prompt_blocks + 1) * self.block_tokens)]
        return (head + body)[: self.prompt_blocks * self.block_tokens + self.block_tokens // 2]

    def _run(self, client: int) -> None:
        n = 0
        while not self._stop.is_set():
            ids = self.prompt(client, n)
            n += 1
            done = Completion(time.monotonic(), 0.0, full_tokens=len(ids) // self.block_tokens * self.block_tokens)
            try:
                body = json.dumps({"prompt": ids, "max_tokens": self.max_tokens}).encode()
                request = urllib.request.Request(self.router_url + "/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
                done.request_id = answer["id"]
                choice = answer["choices"][0]
                if not whole(choice["finish_reason"], answer["usage"]["completion_tokens"], self.max_tokens):
                    done.error = f"finish_reason {choice['finish_reason']}, {answer['usage']['completion_tokens']} tokens"
            except Exception as err:  # every failure is a finding, whatever its type
                done.error = f"{type(err).__name__}: {err}"
            done.ended = time.monotonic()
            with self._lock:
                self.completions.append(done)

    def start(self) -> "LoadLoop":
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Completion]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)
        return self.completions

    def snapshot(self) -> list[Completion]:
        with self._lock:
            return list(self.completions)


def annotate(completions: list[Completion], router_log: Path) -> list[Completion]:
    """Fill in each completion's workers and fetched tokens from the router's log."""
    lines = routed(router_log)
    for done in completions:
        fields = lines.get(done.request_id)
        if fields:
            done.prefill, done.decode = fields.get("prefill", ""), fields.get("decode", "")
            done.fetched_tokens = int(fields.get("fetched_tokens", 0))
    return completions


def cross_node(completions: list[Completion], node_of: dict[str, str]) -> list[Completion]:
    """Completions served whole whose prefill and decode workers are on different nodes."""
    return [c for c in completions if not c.error and c.prefill and c.decode
            and node_of.get(c.prefill) != node_of.get(c.decode)]


def hit_ratio(completions: list[Completion]) -> float | None:
    total = sum(c.full_tokens for c in completions)
    return sum(c.fetched_tokens for c in completions) / total if total else None


def curve(completions: list[Completion], start: float, end: float, bin_s: float) -> list[tuple[float, float | None, int]]:
    """(bin start relative to start, remote-hit ratio of cross-node completions that ended in the bin, how many)."""
    out, t = [], start
    while t < end:
        inside = [c for c in completions if t <= c.ended < t + bin_s]
        out.append((t - start, hit_ratio(inside), len(inside)))
        t += bin_s
    return out


def recovery_s(completions: list[Completion], since: float, until: float, target: float, bin_s: float = 2.0) -> float | None:
    """Seconds after `since` from which every bin up to `until` with completions has a ratio >= target; None if never."""
    bins = curve(completions, since, until, bin_s)
    for i, (offset, _, _) in enumerate(bins):
        if all(ratio is None or ratio >= target for _, ratio, _ in bins[i:]) and any(n for _, _, n in bins[i:]):
            return offset
    return None


def watch_recovery(loop: LoadLoop, router_log: Path, node_of: dict[str, str], since: float, target: float,
                   limit_s: float = 32.0, settle_s: float = 6.0, bin_s: float = 2.0) -> float | None:
    """While the loop runs: seconds after `since` until the remote-hit ratio is back to target and has stayed there
    for settle_s (None if not within limit_s). Reads the router's log as it goes."""
    while True:
        time.sleep(bin_s)
        now = time.monotonic()
        crossed = cross_node(annotate(loop.snapshot(), router_log), node_of)
        recovered = recovery_s(crossed, since, now - bin_s, target, bin_s)
        if recovered is not None and now - bin_s - (since + recovered) >= settle_s:
            return recovered
        if now - since > limit_s:
            return None
