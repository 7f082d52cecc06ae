"""A real HTTP file server on 127.0.0.1 for download tests, with the misbehaviours downloads meet.

Each served path can refuse Range requests, cut the connection after some bytes for its first
N responses, or answer an error status. Every request is logged (path, Range header, status,
body bytes sent), so tests can assert that a cached second call made no request at all and that
a resume asked for, and got, only the missing bytes.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    payload: bytes
    ranges: bool = True          # honour "Range: bytes=N-" with 206
    cut_after: int = 0           # bytes sent before the connection is cut...
    cuts: int = 0                # ...for this many responses
    status: int = 200            # anything else: answer this status with a short body
    etag: str | None = '"v1"'


@dataclass
class Hit:
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class FileServer:
    """Context manager: `with FileServer() as server: url = server.serve("/a.zip", data)`."""

    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)

    def serve(self, path: str, payload: bytes, **options) -> str:
        self.routes[path] = Route(payload, **options)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def __enter__(self) -> FileServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                owner._answer(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        route = self.routes.get(handler.path)
        wanted = handler.headers.get("Range")
        if route is None or route.status != 200:
            status = 404 if route is None else route.status
            body = b"no such file\n"
            handler.send_response(status)
            handler.send_header("Content-Length", str(len(body)))
            self.hits.append(Hit(handler.path, wanted, status, len(body)))  # before the client can see the answer
            handler.end_headers()
            handler.wfile.write(body)
            return
        data, start = route.payload, 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if_range = handler.headers.get("If-Range")
        if route.ranges and match and (if_range is None or if_range == route.etag):
            start = int(match.group(1))
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                self.hits.append(Hit(handler.path, wanted, 416, 0))
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        body = data[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/zip")
        if route.ranges:
            handler.send_header("Accept-Ranges", "bytes")
        if route.etag:
            handler.send_header("ETag", route.etag)
        handler.end_headers()
        status = 206 if start else 200
        if route.cuts > 0:
            route.cuts -= 1
            body = body[: route.cut_after]
            handler.close_connection = True
        self.hits.append(Hit(handler.path, wanted, status, len(body)))  # recorded before the client sees the end
        handler.wfile.write(body)
        handler.wfile.flush()
