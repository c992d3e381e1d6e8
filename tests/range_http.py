"""A loopback HTTP file server that answers Range requests (``SimpleHTTPRequestHandler``
does not), with ETag and Last-Modified, for the remote stage-two tests and the reader
benchmark. No network: it binds 127.0.0.1 on a free port.
"""
from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from email.utils import formatdate
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: fsspec's session reuses connections

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        self._left = None  # one handler serves a keep-alive connection's requests
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()  # directory listings (fsspec's ls parses the links)
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404, "File not found")
            return None
        st = os.fstat(f.fileno())
        size, start, end = st.st_size, 0, st.st_size - 1
        match = _RANGE.match(self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(0, size - int(match.group(2)))
            if start > end:
                f.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}-{st.st_ino:x}"')
        self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        self.end_headers()
        f.seek(start)
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:
        left = self._left
        if left is None:
            return super().copyfile(source, outputfile)
        while left > 0:
            chunk = source.read(min(left, 1 << 20))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)


@contextmanager
def serve(root: str) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` serving ``root`` until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=root))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_in_process(root: str) -> Iterator[str]:
    """As :func:`serve`, from a child process (no GIL shared with the client: benchmarks)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, __file__, root], stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    import sys
    import time

    with serve(sys.argv[1]) as url:
        print(url, flush=True)
        while True:
            time.sleep(3600)
