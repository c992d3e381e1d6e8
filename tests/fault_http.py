"""A fault-injecting loopback HTTP server for the remote-fault tests (issue 21).

Built on ``range_http.RangeHandler`` (Range requests, ETag): a seeded share ``rate`` of
requests gets a fault instead of its answer, the kinds taken in turn so every kind occurs:
``reset`` (connection closed with RST, no answer), ``http_503`` / ``http_429`` (slow down),
``stall`` (no answer for ``stall_s``, longer than the client's timeout, then closed),
``truncated`` (headers with the full Content-Length, half the body, then closed: the HTTP client
itself rejects it), ``short`` (a valid 206 answer for the first half of the range asked: only
hgkd's length checks catch it) and ``corrupt`` (a cache shard's bytes with one bit flipped:
only its crc32c catches it; ranged GETs of ``.zarr`` shard files only).
``server.faults`` counts injected faults by kind and ``server.bodies`` logs every body sent
(for ``benchmarks/results/faults.json``: a truncated body never followed by a complete one of the
same file covering the same bytes may have been used unchecked, :func:`unrepaired_truncations`);
``server.kill_after(n, ".tar")`` makes every request after the n-th ranged GET of a matching
path a reset (a server that died mid-run); ``server.forbidden`` paths answer 403.
"""
from __future__ import annotations

import random
import re
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

KINDS = ("reset", "http_503", "http_429", "stall", "truncated", "short", "corrupt")
_CLOSED_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")


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

    def decide(self, method: str, path: str, ranged: str) -> str | None:
        """The fault for this request (``ranged``: its Range header), or None; counted."""
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
            allowed = [k for k in self.kinds if _applies(k, method, path, ranged)]
            if not allowed:
                return None
            kind = allowed[sum(self.faults[k] for k in self.kinds) % len(allowed)]
            self.faults[kind] += 1
            return kind

    def handle_error(self, request, client_address) -> None:  # resets and stalls break pipes: expected
        pass


class FaultHandler(RangeHandler):
    def send_head(self):
        self._truncate = self._corrupt = False
        fault = self.server.decide(self.command, self.path.split("?")[0], self.headers.get("Range", ""))
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
        asked = None
        if fault == "short":  # answer a valid 206 for the first half of the range asked
            first, last = map(int, _CLOSED_RANGE.match(self.headers["Range"]).groups())
            asked = (first, last)
            del self.headers["Range"]
            self.headers["Range"] = f"bytes={first}-{first + (last - first + 1) // 2 - 1}"
        f = super().send_head()
        self._truncate = fault == "truncated" and self._left is not None
        self._corrupt = fault == "corrupt" and self._left is not None
        self._span = (f.tell(), f.tell() + self._left - 1) if f is not None and self._left is not None else (0, -1)
        self._whole = asked is None  # a short answer is logged as an incomplete body of the range asked
        if asked is not None:
            self._span = asked
        return f

    def copyfile(self, source, outputfile) -> None:
        path = self.path.split("?")[0]
        if self._corrupt:
            body = bytearray(source.read(self._left))
            body[len(body) // 2] ^= 0x10
            outputfile.write(bytes(body))
            self._log(path, len(body), False)
            return
        if not self._truncate:
            super().copyfile(source, outputfile)
            self._log(path, self._left or 0, self._whole)
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


def _applies(kind: str, method: str, path: str, ranged: str) -> bool:
    """Whether fault ``kind`` can answer this request (a body to cut, a range to shorten, a shard to flip)."""
    if kind == "truncated":
        return method == "GET"
    if kind == "short":
        match = _CLOSED_RANGE.match(ranged)
        return method == "GET" and match is not None and int(match.group(2)) > int(match.group(1))
    if kind == "corrupt":
        return method == "GET" and bool(ranged) and ".zarr/" in path and not path.endswith("zarr.json")
    return True


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
    """(faulty bodies - truncated, short or corrupted - and their bytes) that no later correct,
    complete body of the same file covering the same bytes followed: bytes a client could only
    have used without its check (0 when every one was read again)."""
    with server.lock:
        bodies = list(server.bodies)
    count = sent_bytes = 0
    for i, (path, (first, last), sent, complete) in enumerate(bodies):
        if not complete and not any(p == path and ok and a <= first and last <= b
                                    for p, (a, b), _, ok in bodies[i + 1:]):
            count, sent_bytes = count + 1, sent_bytes + sent
    return count, sent_bytes
