"""An HTTP proxy that counts how many generation requests are open at once.

Put in front of the real `llama_cpp.server`, it lets a test see what the
server sees: the number of `/completions` and `/chat/completions` requests
whose response has not finished streaming. It forwards bytes unchanged, so
the answers are the real model's.
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


class CountingProxy:
    """`with CountingProxy("http://127.0.0.1:8000/v1") as p: ... p.url ... p.max_open`"""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        self.open = 0
        self.max_open = 0
        self.total = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes: no re-chunking

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self, counted=False)

            def do_POST(self) -> None:
                proxy._forward(self, counted=self.path.rstrip("/").endswith("completions"))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{parts.path}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    def __enter__(self) -> "CountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, h: BaseHTTPRequestHandler, counted: bool) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        done = threading.Event()  # set once the request stops counting as open

        def closed() -> None:
            if counted and not done.is_set():
                with self._lock:
                    if not done.is_set():
                        done.set()
                        self.open -= 1

        if counted:
            with self._lock:
                self.open += 1
                self.total += 1
                self.max_open = max(self.max_open, self.open)
            # A client that stops reading closes its connection: count it closed at that moment, not
            # when relaying the next chunk fails (which lags by up to a token's time, long enough
            # for the client's next request to look like one too many).
            threading.Thread(target=self._watch_client, args=(h, closed), daemon=True).start()
        conn = http.client.HTTPConnection(self._host, self._port, timeout=300)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                h.wfile.write(chunk)
                h.wfile.flush()
        except (ConnectionError, OSError):
            pass  # the client went away (a cancelled request): nothing left to relay
        finally:
            conn.close()  # also ends the upstream request when our client went away
            closed()

    @staticmethod
    def _watch_client(h: BaseHTTPRequestHandler, closed: "Callable[[], None]") -> None:
        """Block until the client closes its side (it sends nothing after its request)."""
        try:
            h.connection.recv(1)
        except OSError:
            pass
        closed()
