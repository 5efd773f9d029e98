"""A bootstrap node: a long-lived DHT node at a stable address that peers find their swarm through.

It trains nothing. It keeps a persistent libp2p identity (`--identity`, created on first start) so its
`/p2p/<id>` stays the same across restarts, prints its full multiaddrs (one per line, stdout, flushed)
and optionally writes them to a file, refreshes its routing table on a timer (re-dialling the other
bootstrap nodes it was given), logs the swarm activity it stores, dials peers' announced endpoints on
request (bootstrap/reachability.py), and on SIGTERM/SIGINT shuts the DHT (and its p2pd) down and
returns 0.

Only `protocol/` and hivemind are used here, so the bootstrap image needs no training code.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path

import uvloop
from hivemind.dht import DHT
from hivemind.p2p import P2P

from bootstrap.metrics import BootstrapMetrics, DHTStats, dht_stats
from bootstrap.reachability import serve_reachability
from protocol.dht import refresh_routing, start_dht
from protocol.files import atomic_write
from protocol.identity import Identity
from protocol.logs import configure_logging, get_logger

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class BootstrapConfig:
    """How a bootstrap node listens and whom it knows."""

    identity_path: Path
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/31337",)
    announce_maddrs: tuple[str, ...] = ()
    """Public addresses to advertise (e.g. /ip4/203.0.113.7/tcp/31337) when behind a port forward."""
    initial_peers: tuple[str, ...] = ()
    """Other bootstrap nodes; several nodes listing each other form one swarm entry point."""
    initial_peers_files: tuple[Path, ...] = ()
    """Other nodes' --addrs-file (e.g. on a shared volume): read at start if present, re-read at every
    refresh, so two nodes can list each other whichever starts first."""
    addrs_file: Path | None = None
    startup_timeout_s: float = 60.0
    refresh_every_s: float = 60.0
    activity_every_s: float = 30.0
    sample_every_s: float = 10.0
    """How often the DHT's numbers are read for /metrics."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    """Serve Prometheus metrics at http://metrics_host:metrics_port/metrics (0: any free port); None: don't."""
    version: str = ""


def read_addrs_files(paths: tuple[Path, ...]) -> list[str]:
    """Multiaddrs listed in the files that exist (one per line); missing files are not an error yet."""
    found = []
    for path in paths:
        try:
            found += [line.strip() for line in path.read_text().splitlines() if "/p2p/" in line]
        except FileNotFoundError:
            continue
    return found


class BootstrapNode:
    """One bootstrap node. `await run(stop)` serves until `stop` is set; always shuts down cleanly."""

    def __init__(self, config: BootstrapConfig) -> None:
        self.config = config
        self.dht: DHT | None = None
        self.maddrs: list[str] = []
        self.known: list[str] = []
        self.metrics = BootstrapMetrics(version=config.version)
        self.p2p: P2P | None = None

    def known_peers(self) -> list[str]:
        """The other bootstrap nodes: flags plus addrs files (re-read each call), without ourselves."""
        peers = [*self.config.initial_peers, *read_addrs_files(self.config.initial_peers_files)]
        own = {m.rsplit("/p2p/", 1)[-1] for m in self.maddrs}
        peers = [p for p in dict.fromkeys(peers) if p.rsplit("/p2p/", 1)[-1] not in own]
        for new in set(peers) - set(self.known):
            log.info("knows bootstrap node %s", new)
        self.known = peers
        return peers

    async def start(self) -> None:
        """Start the DHT (blocking work in a thread), publish addresses, serve reachability checks."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.dht = await loop.run_in_executor(
            None,
            lambda: start_dht(initial_peers=self.known_peers(), host_maddrs=cfg.host_maddrs,
                              announce_maddrs=cfg.announce_maddrs, identity_path=cfg.identity_path,
                              startup_timeout_s=cfg.startup_timeout_s),
        )  # fmt: skip
        self.maddrs = [str(m) for m in await loop.run_in_executor(None, self.dht.get_visible_maddrs)]
        if cfg.addrs_file is not None:  # before printing: whoever reads our stdout may read the file next
            atomic_write(cfg.addrs_file, "".join(f"{m}\n" for m in self.maddrs).encode())
        for maddr in self.maddrs:
            print(maddr, flush=True)
        self.p2p = p2p = await self.dht.replicate_p2p()
        self.metrics.peer_id = str(p2p.peer_id)
        await serve_reachability(p2p, Identity.generate(), on_request=self.metrics.count_request)
        if cfg.metrics_port is not None:
            await self.metrics.http.serve(cfg.metrics_host, cfg.metrics_port)
            print(f"metrics at http://{cfg.metrics_host}:{self.metrics.http.port}/metrics", flush=True)
        log.info("bootstrap node up: %s (peers join with --initial-peers %s)", self.maddrs[0], self.maddrs[0])

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh routing and log activity on timers until `stop` is set; then shut the DHT down."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
            next_refresh = next_activity = next_sample = loop.time()
            while not stop.is_set():
                now = loop.time()
                if now >= next_refresh:
                    next_refresh = now + self.config.refresh_every_s
                    size = await loop.run_in_executor(None, refresh_routing, self.dht, self.known_peers())
                    log.debug("routing table refreshed: %d nodes", size)
                if now >= next_sample:
                    next_sample = now + self.config.sample_every_s
                    stats = await self._sample()
                    if now >= next_activity:
                        next_activity = now + self.config.activity_every_s
                        self._log_activity(stats)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.shutdown()

    async def _sample(self) -> DHTStats:
        """Read the DHT process's numbers (and the connected peers) into the metrics."""
        assert self.dht is not None and self.p2p is not None
        stats = await self.dht.run_coroutine(dht_stats, return_future=True)
        self.metrics.update(stats, len(await self.p2p.list_peers()))
        return stats

    @staticmethod
    def _log_activity(stats: DHTStats) -> None:
        if stats.announced:
            summary = ", ".join(f"run {run}…: {n} peer(s)" for run, n in sorted(stats.announced.items()))
            log.info("swarm activity stored here: %s", summary)

    async def shutdown(self) -> None:
        """Stop the DHT and its p2pd (idempotent)."""
        await self.metrics.http.close()
        if self.dht is not None:
            dht, self.dht = self.dht, None
            await asyncio.get_running_loop().run_in_executor(None, dht.shutdown)
            log.info("bootstrap node stopped")


async def _main(config: BootstrapConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await BootstrapNode(config).run(stop)


def run_bootstrap(config: BootstrapConfig) -> None:
    """Run a bootstrap node under uvloop until SIGTERM/SIGINT. Raises DHTStartError if it cannot start."""
    configure_logging()  # idempotent: already done by `murmur`, needed when embedded
    uvloop.run(_main(config))
