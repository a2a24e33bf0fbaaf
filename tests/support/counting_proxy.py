"""An HTTP proxy that counts how many generation requests are open at once.

Put in front of the real `llama_cpp.server`, it lets a test see what the
server sees: the number of `/completions` and `/chat/completions` requests
whose response has not finished streaming. It forwards bytes unchanged, so
the answers are the real model's.
"""
from __future__ import annotations

import http.client
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


class CountingProxy:
    """`with CountingProxy("http://127.0.0.1:8000/v1") as p: ... p.url ... p.max_open`"""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        self.open = 0
        self._live: dict[int, socket.socket] = {}  # counted requests still open: handler id -> client socket
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
        key = id(h)
        if counted:
            with self._lock:
                # A client that stops reading closes its connection, and on loopback its FIN is
                # in our socket before its next request can reach us: reap those first, so a
                # request counts as open exactly while its client holds it (relaying the next
                # chunk would notice only up to a token's time later).
                self._reap_locked()
                self._live[key] = h.connection
                self.open += 1
                self.total += 1
                self.max_open = max(self.max_open, self.open)
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
            if counted:
                with self._lock:
                    self._close_locked(key)

    def _close_locked(self, key: int) -> None:
        if self._live.pop(key, None) is not None:
            self.open -= 1

    def _reap_locked(self) -> None:
        """Stop counting the requests whose client has closed its connection (it sends nothing
        after its request, so a readable socket with nothing to read is a closed one)."""
        for key, sock in list(self._live.items()):
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                gone = bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                gone = True
            if gone:
                self._close_locked(key)
