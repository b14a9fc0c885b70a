"""What the workers share above HTTP: POST routes that parse engines.protocol dataclasses, /health, load and totals.

It owns routing, request parsing, which exception answers which status, and the
in-flight and counter bookkeeping /health reports. HTTP itself (framing, NDJSON,
shutdown on SIGTERM) is http_server.py's, shared with the router. It refuses to know
about models, caches or kvstore, so anything speaking the wire contract can reuse it
without importing torch.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Type

from engines.http_server import Handler, HTTPError, Server
from engines.protocol import from_json, to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """POST handler: the body is parsed into request_cls; a dataclass answers as JSON, an iterator as NDJSON."""

    request_cls: Type
    handle: Callable[[Any], Any]


class JsonHTTPServer(Server):
    """A worker's server: GET /health and its POST routes."""

    def __init__(self, host: str, port: int, health: Callable[[], Any], routes: dict[str, Route]) -> None:
        self.health = health
        self.routes = routes
        super().__init__(host, port, _RouteHandler)


class _RouteHandler(Handler):
    server: JsonHTTPServer

    def do_GET(self) -> None:
        if self.route_path != "/health":
            return self._send_error(404, f"no route GET {self.path}")
        self._answer(self.server.health)

    def do_POST(self) -> None:
        body = self.read_body()
        route = self.server.routes.get(self.route_path)
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
            return self.send_json(200, to_json(result))
        self.send_ndjson(result, to_json)

    def _send_error(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})


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
