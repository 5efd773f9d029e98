"""What a volunteer (and their Prometheus) sees of a running peer: metrics, a /metrics endpoint, a status line.

The training thread updates `Metrics` through typed methods under one lock; a scrape reads one consistent
snapshot of them through a `prometheus_client` collector, beside the library's histograms (round and exchange
durations) and its process, platform and garbage-collector metrics, all in the peer's own registry (so several
peers in one test process never share a series). Names follow Prometheus' conventions: base units in the
name (`_seconds`, `_bytes`), `_total` on counters after the unit, and every murmur series carries the `swarm`
and `run` labels; `murmur_peer_info` carries the rest (peer id, slice, version, device). The endpoint itself
is protocol/metrics_http.py.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector

from protocol.logs import get_logger
from protocol.metrics_http import MetricsServer

log = get_logger(__name__)
disable_created_metrics()  # the `_created` twin of every counter and histogram is noise to a dashboard

ROUND_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Seconds per outer round: under a second on `micro`, tens of minutes on a large preset at home."""
EXCHANGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds per push-pull with one partner: milliseconds on loopback, minutes for a large slice on a home uplink."""
LABELS = ("swarm", "run")
"""On every murmur series, so one Prometheus can scrape the peers of several runs and tell them apart."""


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A consistent copy of every value, taken under the lock."""

    round: int = 0
    slice_index: int = -1
    num_slices: int = 0
    loss: float = math.nan
    validation_loss: float = math.nan
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


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerInfo:
    """Who this peer is, for the `murmur_peer_info` series and the labels of every other one."""

    swarm: str = ""
    run: str = ""
    """The run id (hex), as in the manifest."""
    peer: str = ""
    version: str = ""
    device: str = ""


class Metrics:
    """Thread-safe values of one peer. Counters only go up (a negative add raises ValueError)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._round = 0
        self._slice_index = -1
        self._num_slices = 0
        self._loss = math.nan
        self._validation_loss = math.nan
        self._tokens = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._rejected: dict[str, int] = {}
        self._clipped = 0
        self._peers_live = 0
        self._peers_admitted = 0
        self._partners_reached = 0
        self.info = PeerInfo()
        self.registry = CollectorRegistry()
        self.registry.register(_PeerCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._round_seconds = Histogram(
            "murmur_round_duration_seconds", "Wall-clock seconds of one outer round (train, exchange, step).",
            LABELS, buckets=ROUND_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._exchange_seconds = Histogram(
            "murmur_exchange_duration_seconds", "Seconds of one push-pull exchange with a partner, by outcome.",
            (*LABELS, "outcome"), buckets=EXCHANGE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.http = MetricsServer(self.registry)
        """The /metrics endpoint (protocol/metrics_http.py), started by `serve`."""

    def identify(self, info: PeerInfo) -> None:
        """Name this peer (once its swarm, run and identity are known); the histograms show from then on, at 0."""
        with self._lock:
            self.info = info
        labels = (info.swarm, info.run)
        self._round_seconds.labels(*labels)
        for outcome in ("ok", "failed"):
            self._exchange_seconds.labels(*labels, outcome)

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

    def set_validation_loss(self, loss: float) -> None:
        with self._lock:
            self._validation_loss = float(loss)

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

    # ---------------------------------------------------------------------------- histograms
    def observe_round(self, seconds: float) -> None:
        self._round_seconds.labels(self.info.swarm, self.info.run).observe(seconds)

    def observe_exchange(self, seconds: float, *, ok: bool) -> None:
        self._exchange_seconds.labels(self.info.swarm, self.info.run, "ok" if ok else "failed").observe(seconds)

    async def timed_exchange(self, exchange: Awaitable[bool]) -> bool:
        """Await one exchange (True: the partner was reached) and observe how long it took, by outcome."""
        started = time.perf_counter()
        ok = await exchange
        self.observe_exchange(time.perf_counter() - started, ok=ok)
        return ok

    # ------------------------------------------------------------------------------- reading
    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                round=self._round,
                slice_index=self._slice_index,
                num_slices=self._num_slices,
                loss=self._loss,
                validation_loss=self._validation_loss,
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
        """The Prometheus text exposition (0.0.4) of every metric in this peer's registry."""
        return self.http.render()

    # --------------------------------------------------------------------------------- serve
    async def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port (0: any free port; read it back with `port`)."""
        await self.http.serve(host, port)

    @property
    def port(self) -> int:
        return self.http.port

    async def close(self) -> None:
        await self.http.close()


class _PeerCollector:
    """Turns one `Metrics` snapshot into metric families at each scrape (a consistent view of one moment)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s, info = self.metrics.snapshot(), self.metrics.info
        base = [info.swarm, info.run]
        slice_text = str(s.slice_index) if s.num_slices else ""
        yield InfoMetricFamily("murmur_peer", "Who this peer is: swarm, run, peer id, slice, version, device.", value={
            "swarm": info.swarm, "run": info.run, "peer": info.peer, "slice": slice_text,
            "slices": str(s.num_slices or ""), "version": info.version, "device": info.device,
        })  # fmt: skip
        gauges = (
            ("murmur_round", "Outer round this peer is in.", s.round),
            ("murmur_train_loss", "Mean inner loss of the last round (nats per token).", s.loss),
            ("murmur_validation_loss", "Loss of the outer weights on held-out data at the last evaluation "
             "(nats per token).", s.validation_loss),
            ("murmur_live_peers", "Live peers announced in the swarm, this one included.", s.peers_live),
            ("murmur_admitted_peers", "Live peers that answered at their endpoint or exchanged with this one.",
             s.peers_admitted),
            ("murmur_round_partners", "Partners exchanged with in the last round.", s.partners_reached),
        )  # fmt: skip
        for name, help_text, value in gauges:
            family = GaugeMetricFamily(name, help_text, labels=LABELS)
            family.add_metric(base, value)
            yield family
        counters = (
            ("murmur_trained_tokens", "Tokens trained on since the process started.", s.tokens),
            ("murmur_sent_bytes", "Update payload bytes sent to partners.", s.bytes_sent),
            ("murmur_received_bytes", "Update payload bytes received from partners.", s.bytes_received),
            ("murmur_clipped_updates", "Partner terms scaled down to the clipping bound (peer/core/robust.py).",
             s.clipped),
        )  # fmt: skip
        for name, help_text, value in counters:
            family = CounterMetricFamily(name, help_text, labels=LABELS)
            family.add_metric(base, value)
            yield family
        rejected = CounterMetricFamily("murmur_rejected_updates", "Partner updates rejected, by reason.",
                                       labels=(*LABELS, "reason"))  # fmt: skip
        for reason, count in sorted(s.rejected.items()):
            rejected.add_metric([*base, reason], count)
        yield rejected
        yield from _gpu_memory(info.device, base)


GPU_MEMORY_METRICS = {
    "murmur_gpu_memory_allocated_bytes": ("Bytes held by tensors on the GPU.", "memory_allocated"),
    "murmur_gpu_memory_reserved_bytes": ("Bytes the caching allocator holds on the GPU.", "memory_reserved"),
    "murmur_gpu_memory_peak_bytes": ("Most bytes held by tensors on the GPU since the start.", "max_memory_allocated"),
}
"""Name -> (help, the torch.cuda function that reads it): the series a CUDA peer adds."""


def _gpu_memory(device: str, base: list[str]) -> Iterator[Metric]:
    """The CUDA allocator's bytes on this peer's device (allocated, reserved, peak), when it trains on one."""
    if not device.startswith("cuda"):
        return
    import torch  # only a CUDA peer gets here, and it has imported torch long since

    if not torch.cuda.is_initialized():
        return
    index = torch.device(device).index or 0
    for name, (help_text, reader) in GPU_MEMORY_METRICS.items():
        family = GaugeMetricFamily(name, help_text, labels=LABELS)
        family.add_metric(base, float(getattr(torch.cuda, reader)(index)))
        yield family


def _non_negative(what: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{what} only goes up; got {value}")
    return int(value)


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
