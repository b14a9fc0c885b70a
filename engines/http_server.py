"""HTTP for every engine server (the workers and the router): a threaded server that stops on a signal, and
the three ways they answer: one JSON document, a chunked NDJSON stream, or server-sent events.

It owns status lines, headers, framing and shutdown. It refuses routes and JSON shapes
(worker_common.py, router.py, protocol.py, completions.py), models, caches and kvstore,
so the router can use it without importing torch.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """Raised by a route to answer with this status (e.g. 503 when out of pages)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    """A request handler with the response helpers; subclasses add do_GET / do_POST."""

    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # the servers log requests their own way, if at all
        log.debug("%s %s", self.address_string(), fmt % args)

    @property
    def route_path(self) -> str:
        """The path without its query string."""
        return self.path.split("?", 1)[0]

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_json(self, status: int, body: bytes | dict) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def send_ndjson(self, items: Iterable, encode: Callable[[object], bytes]) -> None:
        """Chunked NDJSON, flushed per line; the iterator is closed (its finally runs) even if the client left."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for item in items:
                line = encode(item) + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def start_events(self) -> None:
        """The 200 of a server-sent event stream; it ends when the connection closes."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def send_event(self, doc: dict | str) -> None:
        self.wfile.write(sse(doc))
        self.wfile.flush()


def sse(doc: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or a literal such as [DONE]) and a blank line."""
    payload = doc if isinstance(doc, str) else json.dumps(doc)
    return f"data: {payload}\n\n".encode()


class Server(ThreadingHTTPServer):
    """One thread per connection, so a slow stream never blocks /health or other requests."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__((host, port), handler)

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
