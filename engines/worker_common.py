"""HTTP plumbing shared by the workers (and the router): a threaded JSON server with /health.

It owns routing, request parsing into engines.protocol dataclasses, status
codes, NDJSON streaming and shutdown on SIGTERM. It refuses to know about
models, caches or kvstore, so anything speaking the wire contract can reuse it
without importing torch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Type

from engines.protocol import from_json, to_json

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """Raised by a route to answer with this status (e.g. 503 when out of pages)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Route:
    """POST handler: the body is parsed into request_cls; a dataclass answers as JSON, an iterator as NDJSON."""

    request_cls: Type
    handle: Callable[[Any], Any]


class JsonHTTPServer(ThreadingHTTPServer):
    """One thread per connection, so a slow stream never blocks /health or other requests."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, health: Callable[[], Any], routes: dict[str, Route]) -> None:
        self.health = health
        self.routes = routes
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def serve_until_signal(self) -> None:
        """serve_forever until SIGTERM or SIGINT; then stop accepting and close the socket."""
        def stop(signum, frame):  # shutdown() blocks until serve_forever returns, so not on this thread
            threading.Thread(target=self.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            self.serve_forever(poll_interval=0.2)
        finally:
            self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: JsonHTTPServer

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/health":
            return self._send_error(404, f"no route GET {self.path}")
        self._answer(self.server.health)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        route = self.server.routes.get(self.path.split("?")[0])
        if route is None:
            return self._send_error(404, f"no route POST {self.path}")

        def handle():
            try:
                request = from_json(route.request_cls, body)
            except (ValueError, TypeError) as err:
                raise HTTPError(400, f"bad {route.request_cls.__name__}: {err}") from None
            return route.handle(request)

        self._answer(handle)

    def _answer(self, produce: Callable[[], Any]) -> None:
        try:
            result = produce()
        except HTTPError as err:
            return self._send_error(err.status, str(err))
        except (ValueError, TypeError) as err:
            return self._send_error(400, str(err))
        except Exception as err:
            log.exception("request failed")
            return self._send_error(500, f"{type(err).__name__}: {err}")
        if dataclasses.is_dataclass(result):
            return self._send(200, to_json(result))
        self._stream(result)

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def _stream(self, items: Iterator[Any]) -> None:
        """Chunked NDJSON, flushed per line; the iterator is closed (its finally runs) even if the client left."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for item in items:
                line = to_json(item) + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


@dataclass
class InFlight:
    """Requests and tokens currently being served: the load a router balances on."""

    requests: int = 0
    tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tokens: int) -> None:
        with self._lock:
            self.requests += 1
            self.tokens += tokens

    def done(self, tokens: int) -> None:
        with self._lock:
            self.requests -= 1
            self.tokens -= tokens


class Counters:
    """Monotonic totals a worker reports in /health (tokens computed, blocks published, ...)."""

    def __init__(self, *names: str) -> None:
        self._values = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] = self._values.get(name, 0) + delta

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
