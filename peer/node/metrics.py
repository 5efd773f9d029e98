"""What a volunteer (and their Prometheus) sees of a running peer: metrics, a /metrics endpoint, a status line.

The training thread updates `Metrics` through typed methods; the event loop serves `GET /metrics`
in the Prometheus text exposition format 0.0.4, written here by hand (a dozen lines; no new
dependency). One lock guards the values, so a scrape never sees a half-applied update.

The HTTP server is deliberately tiny and defensive, because it listens on a port a stranger may
reach: one request per connection, the request head bounded in size and read under a deadline,
`GET /metrics` or 404, 405 for other methods, 400 for garbage; a bad client costs one task, never
the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import SetupError
from protocol.logs import get_logger
from protocol.ports import bind_error

log = get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
"""Request line plus headers; a scraper sends a few hundred bytes."""


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A consistent copy of every value, taken under the lock."""

    round: int = 0
    slice_index: int = -1
    num_slices: int = 0
    loss: float = math.nan
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    clipped: int = 0
    peers_live: int = 0
    peers_admitted: int = 0
    partners_reached: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


# name, type, help: the order they are rendered in
_FAMILIES = (
    ("murmur_round", "gauge", "Outer round this peer is in."),
    ("murmur_slice", "gauge", "Index of the parameter slice this peer trains."),
    ("murmur_loss", "gauge", "Mean inner loss of the last round (nats per token)."),
    ("murmur_tokens_total", "counter", "Tokens trained on since the process started."),
    ("murmur_bytes_sent_total", "counter", "Payload bytes sent to partners."),
    ("murmur_bytes_received_total", "counter", "Payload bytes received from partners."),
    ("murmur_rejected_updates_total", "counter", "Partner updates rejected, by reason."),
    ("murmur_peers_live", "gauge", "Live peers seen in the swarm."),
    ("murmur_peers_admitted", "gauge", "Live peers that answered at their endpoint or exchanged with this one."),
    ("murmur_partners_reached", "gauge", "Partners exchanged with in the last round."),
    ("murmur_clipped_updates_total", "counter",
     "Partner terms scaled down to the clipping bound (peer/core/robust.py)."),
)


class Metrics:
    """Thread-safe values of one peer. Counters only go up (a negative add raises ValueError)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._round = 0
        self._slice_index = -1
        self._num_slices = 0
        self._loss = math.nan
        self._tokens = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._rejected: dict[str, int] = {}
        self._clipped = 0
        self._peers_live = 0
        self._peers_admitted = 0
        self._partners_reached = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.read_timeout = 5.0
        """Seconds a client has to send its request head (and to take the answer)."""
        self.max_connections = 32
        """Connections served at once; more are closed at once (a scraper needs one)."""

    # -------------------------------------------------------------------------------- gauges
    def set_round(self, round_: int) -> None:
        with self._lock:
            self._round = int(round_)

    def set_slice(self, index: int, num_slices: int) -> None:
        with self._lock:
            self._slice_index, self._num_slices = int(index), int(num_slices)

    def set_loss(self, loss: float) -> None:
        with self._lock:
            self._loss = float(loss)

    def set_peers_live(self, count: int) -> None:
        with self._lock:
            self._peers_live = _non_negative("peers_live", count)

    def set_peers_admitted(self, count: int) -> None:
        with self._lock:
            self._peers_admitted = _non_negative("peers_admitted", count)

    def set_partners_reached(self, count: int) -> None:
        with self._lock:
            self._partners_reached = _non_negative("partners_reached", count)

    # ------------------------------------------------------------------------------ counters
    def add_tokens(self, count: int) -> None:
        with self._lock:
            self._tokens += _non_negative("tokens", count)

    def add_bytes_sent(self, count: int) -> None:
        with self._lock:
            self._bytes_sent += _non_negative("bytes_sent", count)

    def add_bytes_received(self, count: int) -> None:
        with self._lock:
            self._bytes_received += _non_negative("bytes_received", count)

    def reject(self, reason: str, count: int = 1) -> None:
        """Count a rejected partner update; `reason` becomes a label, so keep the set of reasons small."""
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + _non_negative("rejected", count)

    def add_clipped(self, count: int) -> None:
        """Count partner terms the outer step clipped (they were still mixed, shrunk below the bound)."""
        with self._lock:
            self._clipped += _non_negative("clipped", count)

    # ------------------------------------------------------------------------------- reading
    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                round=self._round,
                slice_index=self._slice_index,
                num_slices=self._num_slices,
                loss=self._loss,
                tokens=self._tokens,
                bytes_sent=self._bytes_sent,
                bytes_received=self._bytes_received,
                rejected=dict(self._rejected),
                clipped=self._clipped,
                peers_live=self._peers_live,
                peers_admitted=self._peers_admitted,
                partners_reached=self._partners_reached,
            )

    def render(self) -> str:
        """The Prometheus text exposition (0.0.4) of every metric, ending in a newline."""
        s = self.snapshot()
        samples: dict[str, list[tuple[str, float]]] = {
            "murmur_round": [("", s.round)],
            "murmur_slice": [("", s.slice_index)],
            "murmur_loss": [("", s.loss)],
            "murmur_tokens_total": [("", s.tokens)],
            "murmur_bytes_sent_total": [("", s.bytes_sent)],
            "murmur_bytes_received_total": [("", s.bytes_received)],
            "murmur_rejected_updates_total": [
                (f'{{reason="{escape_label(reason)}"}}', n) for reason, n in sorted(s.rejected.items())
            ],
            "murmur_peers_live": [("", s.peers_live)],
            "murmur_peers_admitted": [("", s.peers_admitted)],
            "murmur_partners_reached": [("", s.partners_reached)],
            "murmur_clipped_updates_total": [("", s.clipped)],
        }
        lines = []
        for name, kind, help_text in _FAMILIES:
            lines += [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {format_value(value)}" for labels, value in samples[name]]
        return "\n".join(lines) + "\n"

    # --------------------------------------------------------------------------------- serve
    async def serve(self, host: str, port: int) -> asyncio.Server:
        """Listen for scrapes on host:port (port 0 picks a free one: read it back with `port`)."""
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        try:
            self._server = await asyncio.start_server(self._accept, host, port, limit=MAX_REQUEST_BYTES)
        except OSError as exc:  # binding is all that fails here: a port in use, an address not ours
            raise SetupError(bind_error("metrics server", f"{host}:{port}", exc)) from exc
        log.info("metrics at http://%s:%d/metrics", host, self.port)
        return self._server

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("metrics server is not running")
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
                status, body = self._respond(head)
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

    def _respond(self, head: bytes) -> tuple[str, str]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", "bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return "405 Method Not Allowed", "only GET\n"
        if target != b"/metrics":
            return "404 Not Found", "see /metrics\n"
        return "200 OK", self.render()

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


def _non_negative(what: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{what} only goes up; got {value}")
    return int(value)


def escape_label(value: str) -> str:
    """Label values escape backslash, double quote and newline (exposition format 0.0.4)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escapes backslash and newline only."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


# ----------------------------------------------------------------------------------- status line


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_rate(rate: float) -> str:
    """Tokens per second, compact: 950 -> '950', 12345 -> '12.3k'."""
    if rate >= 1e6:
        return f"{rate / 1e6:.1f}M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f}k"
    return f"{rate:.0f}"


class StatusLine:
    """One line a volunteer can read at a glance, from a `Metrics` snapshot.

    `update()` formats it, with tokens/s measured over the last `window_s` seconds of calls. Where it is
    not drawn on a terminal (logs to a file, Docker) it also becomes a plain INFO log line at most every
    `log_every_s` seconds, so logs stay readable; drawing it is `StatusReporter`'s (peer/node/status.py).
    Clock and logger are injectable for tests.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 30.0,
        log_every_s: float = 30.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.window_s = window_s
        self.log_every_s = log_every_s
        self.logger = logger or log
        self._samples: deque[tuple[float, int]] = deque()
        self._last_logged: float | None = None

    def tokens_per_second(self, now: float, tokens: int) -> float:
        """Record (now, tokens) and return the rate over the sliding window (0 until two samples)."""
        self._samples.append((now, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    @staticmethod
    def format(s: MetricsSnapshot, tokens_per_s: float) -> str:
        slice_text = f"{s.slice_index}/{s.num_slices}" if s.num_slices else "-"
        loss = "-" if math.isnan(s.loss) else f"{s.loss:.3f}"
        return (
            f"round {s.round} | slice {slice_text} | loss {loss} | {human_rate(tokens_per_s)} tok/s"
            f" | partners {s.partners_reached} | peers {s.peers_live}"
            f" | sent {human_bytes(s.bytes_sent)} recv {human_bytes(s.bytes_received)}"
            f" | rejected {s.rejected_total}"
        )

    def update(self, *, drawn: bool = False) -> str:
        """Take a snapshot and return the formatted line; unless it is `drawn` on a terminal, log it if due."""
        now = self.clock()
        snap = self.metrics.snapshot()
        line = self.format(snap, self.tokens_per_second(now, snap.tokens))
        if not drawn and (self._last_logged is None or now - self._last_logged >= self.log_every_s):
            self.logger.info("%s", line)
            self._last_logged = now
        return line
