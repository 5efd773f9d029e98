"""The /metrics endpoint a peer or a bootstrap node serves to Prometheus, from a `prometheus_client` registry.

The text is `prometheus_client`'s (`generate_latest`, exposition format 0.0.4, which every Prometheus reads);
the HTTP server around it is ours rather than the library's threaded one, because it listens on a port a
stranger may reach and must stay on the event loop: one request per connection, the request head bounded in
size and read under a deadline, `GET /metrics` or 404, 405 for other methods, 400 for garbage, a cap on open
connections; a bad client costs one task, never the server. Collecting runs in a thread, so a slow collector
never stalls the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

from protocol.errors import SetupError
from protocol.logs import get_logger
from protocol.ports import bind_error

log = get_logger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MAX_REQUEST_BYTES = 8192
"""Request line plus headers; a scraper sends a few hundred bytes."""


class MetricsServer:
    """Serves one registry at http://HOST:PORT/metrics until `close()`."""

    def __init__(self, registry: CollectorRegistry, *, what: str = "metrics server") -> None:
        self.registry = registry
        self.what = what
        """How a bind error names this server ("metrics server")."""
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.read_timeout = 5.0
        """Seconds a client has to send its request head (and to take the answer)."""
        self.max_connections = 32
        """Connections served at once; more are closed at once (a scraper needs one)."""

    def render(self) -> str:
        """The exposition text of every collector in the registry."""
        return generate_latest(self.registry).decode("utf-8")

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """Listen for scrapes on host:port (port 0 picks a free one: read it back with `port`)."""
        if self._server is not None:
            raise RuntimeError(f"{self.what} already running")
        try:
            self._server = await asyncio.start_server(self._accept, host, port, limit=MAX_REQUEST_BYTES)
        except OSError as exc:  # binding is all that fails here: a port in use, an address not ours
            raise SetupError(bind_error(self.what, f"{host}:{port}", exc)) from exc
        log.info("metrics at http://%s:%d/metrics", host, self.port)
        return self._server

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{self.what} is not running")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end connections still open; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections:
            log.debug("metrics: %d connections open, refusing one", len(self._connections))
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
                status, body = self._route(head)
                if body is None:
                    body = await asyncio.to_thread(self.render)
            except asyncio.LimitOverrunError:
                status, body = "431 Request Header Fields Too Large", "request too large\n"
            except asyncio.IncompleteReadError:
                return  # the client hung up before finishing its request
            except asyncio.TimeoutError:
                status, body = "408 Request Timeout", "request timeout\n"
            await asyncio.wait_for(self._write(writer, status, body), self.read_timeout)
        except (ConnectionError, asyncio.TimeoutError) as err:
            log.debug("metrics client %s dropped: %r", peer, err)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    @staticmethod
    def _route(head: bytes) -> tuple[str, str | None]:
        """The status and body for a request head; a None body means "the metrics"."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", "bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return "405 Method Not Allowed", "only GET\n"
        if target != b"/metrics":
            return "404 Not Found", "see /metrics\n"
        return "200 OK", None

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, status: str, body: str) -> None:
        data = body.encode("utf-8")
        content_type = CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
        allow = "Allow: GET\r\n" if status.startswith("405") else ""
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            f"{allow}Connection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + data)
        await writer.drain()


class BackgroundMetricsServer:
    """A `MetricsServer` on its own event loop in a daemon thread, for a synchronous program (`murmur status
    --watch`): the same defences, without making the program async."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.server = MetricsServer(registry)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="metrics", daemon=True)

    def start(self, host: str, port: int, timeout_s: float = 10.0) -> int:
        """Listen on host:port (0: any free port) and return the port; raises SetupError if it cannot."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.serve(host, port), self._loop).result(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.server.port

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the server and end the thread; safe to call twice."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._loop.close()
