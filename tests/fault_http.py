"""A fault-injecting loopback HTTP server for the remote-fault tests (issue 21).

Built on ``range_http.RangeHandler`` (Range requests, ETag): a seeded share ``rate`` of
requests gets a fault instead of its answer, the kinds taken in turn so every kind occurs:
``reset`` (connection closed with RST, no answer), ``http_503`` / ``http_429`` (slow down),
``stall`` (no answer for ``stall_s``, longer than the client's timeout, then closed) and
``truncated`` (headers with the full Content-Length, half the body, then closed).
``server.faults`` counts injected faults by kind and ``server.bodies`` logs every body sent
(for ``benchmarks/results/faults.json``: a truncated body never followed by a complete one of the
same file covering the same bytes may have been used unchecked, :func:`unrepaired_truncations`);
``server.kill_after(n, ".tar")`` makes every request after the n-th ranged GET of a matching
path a reset (a server that died mid-run); ``server.forbidden`` paths answer 403.
"""
from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from contextlib import contextmanager
from functools import partial
from http.server import ThreadingHTTPServer
from typing import Iterator

from range_http import RangeHandler

KINDS = ("reset", "http_503", "http_429", "stall", "truncated")


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str, rate: float, seed: int, kinds: tuple[str, ...], stall_s: float) -> None:
        super().__init__(("127.0.0.1", 0), partial(FaultHandler, directory=root))
        self.rate, self.kinds, self.stall_s = rate, tuple(kinds), stall_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter = Counter()  # injected faults by kind
        self.requests = 0
        self.bodies: list[tuple[str, tuple[int, int], int, bool]] = []  # (path, (first, last byte), sent, complete)
        self.forbidden: set[str] = set()  # URL paths answered with 403
        self.dead = False
        self._kill: tuple[int, str] | None = None  # (ranged GETs left, path part)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def kill_after(self, ranged_gets: int, path_part: str = "") -> None:
        """Die (reset every request) after ``ranged_gets`` more ranged GETs of paths containing ``path_part``."""
        with self.lock:
            self._kill = (ranged_gets, path_part)

    def decide(self, method: str, path: str, ranged: bool) -> str | None:
        """The fault for this request, or None; counted."""
        with self.lock:
            self.requests += 1
            if self._kill is not None and ranged and method == "GET" and self._kill[1] in path:
                left = self._kill[0] - 1
                self._kill = (left, self._kill[1])
                if left < 0:
                    self.dead = True
            if self.dead:
                self.faults["dead"] += 1
                return "reset"
            if path in self.forbidden:
                return "http_403"
            if not self.rate or self.rng.random() >= self.rate:
                return None
            allowed = [k for k in self.kinds if k != "truncated" or method == "GET"]
            kind = allowed[sum(self.faults[k] for k in self.kinds) % len(allowed)]
            self.faults[kind] += 1
            return kind

    def handle_error(self, request, client_address) -> None:  # resets and stalls break pipes: expected
        pass


class FaultHandler(RangeHandler):
    def send_head(self):
        self._truncate = False
        fault = self.server.decide(self.command, self.path.split("?")[0], "Range" in self.headers)
        if fault in ("reset", "stall"):
            if fault == "stall":
                time.sleep(self.server.stall_s)
            self._reset()
            return None
        if fault in ("http_503", "http_429", "http_403"):
            self.send_response(int(fault[5:]))
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return None
        f = super().send_head()
        self._truncate = fault == "truncated" and self._left is not None
        self._span = (f.tell(), f.tell() + self._left - 1) if f is not None and self._left is not None else (0, -1)
        return f

    def copyfile(self, source, outputfile) -> None:
        path = self.path.split("?")[0]
        if not self._truncate:
            super().copyfile(source, outputfile)
            self._log(path, self._left or 0, True)
            return
        sent = max(0, self._left // 2)
        outputfile.write(source.read(sent))
        outputfile.flush()
        self._log(path, sent, False)
        self._reset()

    def _log(self, path: str, sent: int, complete: bool) -> None:
        with self.server.lock:
            self.server.bodies.append((path, self._span, sent, complete))

    def _reset(self) -> None:
        """Close the connection with RST (SO_LINGER 0), as a dropped connection looks."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@contextmanager
def serve_faults(root: str, rate: float = 0.05, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 stall_s: float = 1.5) -> Iterator[FaultServer]:
    """A :class:`FaultServer` serving ``root`` until the block ends (``server.url``, ``server.faults``)."""
    server = FaultServer(root, rate, seed, kinds, stall_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def faults_by_kind(server: FaultServer) -> dict[str, int]:
    """Faults injected per kind (what ``benchmarks/results/faults.json`` reports)."""
    with server.lock:
        return dict(server.faults)


def unrepaired_truncations(server: FaultServer) -> tuple[int, int]:
    """(truncated bodies, their bytes) that no later complete body of the same file covering the
    same bytes followed: bytes a client could only have used without its check (0 when every short
    read was read again in full)."""
    with server.lock:
        bodies = list(server.bodies)
    count = sent_bytes = 0
    for i, (path, (first, last), sent, complete) in enumerate(bodies):
        if not complete and not any(p == path and ok and a <= first and last <= b
                                    for p, (a, b), _, ok in bodies[i + 1:]):
            count, sent_bytes = count + 1, sent_bytes + sent
    return count, sent_bytes
