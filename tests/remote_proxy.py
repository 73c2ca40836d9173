"""A fault-injecting HTTP proxy for the remote tests and the remote benchmark.

:class:`FaultProxy` listens on 127.0.0.1, forwards every request to one upstream
(moto's S3 endpoint or nginx) and can make the responses look like a real object store
on a bad day:

* ``latency``: seconds added before each response (the per-request cost of an object store);
* ``bandwidth``: bytes/s cap on all response bodies together (a token bucket shared by
  every connection);
* scheduled faults (:meth:`FaultProxy.inject`), applied to the next matching requests:
  ``"503"`` (Service Unavailable, not forwarded), ``"throttle"`` (S3's 503 SlowDown),
  ``"reset"`` (the connection is reset before any byte of the response), ``"truncate"``
  (headers promise the full body, half of it comes, then the connection closes),
  ``"stall"`` (nothing is sent for ``stall_s`` seconds: the client's timeout must fire),
  ``"hold"`` (nothing is sent until :meth:`FaultProxy.release` is called, or ``hold_s`` passes),
  ``"corrupt"`` (one byte of the body flipped: only checksums can tell).

Counters: ``requests`` (all requests seen), ``faults`` (faults applied), ``body_bytes``
(response body bytes sent), ``log`` (``(method, path, range)`` of each request).
"""
from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("503", "throttle", "reset", "truncate", "stall", "corrupt", "hold")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _Bucket:
    """A token bucket: ``take(n)`` sleeps until ``n`` more bytes fit under ``rate`` bytes/s."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``upstream`` with latency, a bandwidth cap and faults.

    Args:
        upstream: ``http://host:port`` of the real server.
        latency: seconds before each response.
        bandwidth: bytes/s for all response bodies together (None: no cap).
        stall_s: how long a ``"stall"`` fault holds the response.
        hold_s: the longest a ``"hold"`` fault waits for :meth:`release` (a safety net: a
            test that forgets to release does not leave a thread behind for ever).
    """

    def __init__(self, upstream: str, latency: float = 0.0, bandwidth: float | None = None,
                 stall_s: float = 30.0, hold_s: float = 120.0) -> None:
        u = urlsplit(upstream)
        self.host, self.uport = u.hostname or "127.0.0.1", u.port or 80
        self.latency = latency
        self.bucket = _Bucket(bandwidth)
        self.stall_s = stall_s
        self.hold_s = hold_s
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.plan: list[list] = []  # [kind, remaining count, match substring]
        self.requests = 0
        self.faults = 0
        self.body_bytes = 0
        self.upstream_s: list = []
        self.log: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in separate writes: with Nagle on, the body waited for the
            # client's delayed ACK, adding ~40 ms to every response (measured: 8 KiB ranged GETs
            # at latency=1 ms took 52 ms at the median, 9 ms with TCP_NODELAY)
            disable_nagle_algorithm = True

            def log_message(self, *a: object) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PROPFIND = _any

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # clients open many connections at once (the default 5 drops SYNs)
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fault-proxy")
        self.thread.start()

    # -- control -------------------------------------------------------------------------
    def inject(self, kind: str, count: int = 1, match: str = "") -> None:
        """Apply fault ``kind`` to the next ``count`` requests whose ``METHOD path range``
        contains ``match`` (GETs with a Range header only when ``match`` is empty)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULTS}")
        with self.lock:
            self.plan.append([kind, int(count), match])

    def clear(self) -> None:
        """Drop the scheduled faults and zero the counters."""
        with self.lock:
            self.plan.clear()
            self.requests = self.faults = self.body_bytes = 0
            self.log.clear()

    def release(self) -> None:
        """Let the responses held by ``"hold"`` faults (now and later) go."""
        self.released.set()

    def set_bandwidth(self, rate: float | None) -> None:
        """Change the bandwidth cap (bytes/s; None removes it)."""
        self.bucket = _Bucket(rate)

    def stop(self) -> None:
        """Stop listening (open connections end with their handler threads)."""
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def _take_fault(self, desc: str, ranged: bool) -> str | None:
        with self.lock:
            self.requests += 1
            self.log.append(tuple(desc.split(" ", 2)) + ("",) * (3 - len(desc.split(" ", 2))))  # type: ignore
            for entry in self.plan:
                kind, left, match = entry
                if left > 0 and ((match and match in desc) or (not match and ranged)):
                    entry[1] -= 1
                    self.faults += 1
                    return kind
        return None

    # -- one request -------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        rng = h.headers.get("Range") or ""
        fault = self._take_fault(f"{h.command} {h.path} {rng}", h.command == "GET" and bool(rng))
        if self.latency:
            time.sleep(self.latency)
        if fault in ("503", "throttle"):
            msg = (b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                   if fault == "throttle" else b"<Error><Code>ServiceUnavailable</Code></Error>")
            h.send_response(503)
            h.send_header("Content-Length", str(len(msg)))
            h.send_header("Content-Type", "application/xml")
            h.end_headers()
            h.wfile.write(msg)
            return
        if fault == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault == "stall":
            time.sleep(self.stall_s)
        if fault == "hold":
            self.released.wait(self.hold_s)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
        headers["Host"] = f"{self.host}:{self.uport}"
        conn = http.client.HTTPConnection(self.host, self.uport, timeout=60)
        t0 = time.monotonic()
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.upstream_s.append((round(time.monotonic() - t0, 3), h.path, rng))
        if fault == "corrupt" and data:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x5A
            data = bytes(data)
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                h.send_header(k, v)
        if h.command == "HEAD":  # no body: pass the object's length through
            h.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        send = data[: len(data) // 2] if fault == "truncate" else data
        step = 64 << 10
        for i in range(0, len(send), step):
            piece = send[i : i + step]
            self.bucket.take(len(piece))
            h.wfile.write(piece)
            with self.lock:
                self.body_bytes += len(piece)
        if fault == "truncate":
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)


__all__ = ["FaultProxy", "FAULTS"]
