"""A prepared dataset folder served over HTTP on loopback: what the demo and the tests hand peers as `--data URL`.

Why not `python -m http.server`: its handler ignores Range, and a peer resumes a cut download with one. This
one serves GET and HEAD of the folder's plain files (no listing, no subfolders, no `..`), answers a
`Range: bytes=N-` with 206 and the rest of the file, and runs in a daemon thread of the caller. Tests inject
faults through `DataServer.fault`, called before each GET with the file name: it may return a status to answer
instead (503: down for now), or a byte count after which the connection is cut.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Fault = Callable[[str], "int | tuple[str, int] | None"]
"""name -> None (serve it), an HTTP status to answer instead, or ("cut", n): send n bytes of the body, then close."""


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of one file of the served folder, honouring `Range: bytes=N-` and the server's fault hook."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # a peer's fetches are not the demo's output

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        name = self.path.lstrip("/").split("?", 1)[0]
        path = owner.folder / name
        if not (_NAME.fullmatch(name) and ".." not in name and path.is_file()):
            self._status(404)
            return
        if body:
            owner.requests.append((name, self.headers.get("Range")))
        fault = owner.fault(name) if (owner.fault is not None and body) else None
        if isinstance(fault, int):
            self._status(fault)
            return
        data = path.read_bytes()
        start = 0
        if (match := _RANGE.fullmatch(self.headers.get("Range", ""))) is not None:
            start = int(match[1])
            if start >= len(data):
                self._status(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body and isinstance(fault, tuple):  # ("cut", n): a transfer the network cut short
            self.wfile.write(data[start : start + fault[1]])
            self.close_connection = True
        elif body:
            self.wfile.write(data[start:])

    def _status(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: DataServer


class DataServer:
    """`folder`'s files at `url` until `close` (or the `served` context manager's end)."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = Path(folder)
        self.fault: Fault | None = None
        self.requests: list[tuple[str, str | None]] = []
        """(file name, Range header) of every GET, in order: what tests count."""
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="murmur-dataserver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@contextmanager
def served(folder: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[DataServer]:
    """`folder` served over HTTP for the block (see the module docstring)."""
    server = DataServer(folder, host, port)
    try:
        yield server
    finally:
        server.close()
