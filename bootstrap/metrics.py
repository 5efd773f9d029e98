"""What a bootstrap node tells Prometheus: who it is, what its DHT holds, whom it is connected to, what it served.

A bootstrap node trains nothing, so its health is its DHT: how many nodes its routing table holds, how many
records it stores, how many live, verified peer announcements of each run it keeps (the swarm as this node
sees it), how many libp2p peers are connected, and how many of murmur's own requests (reachability checks,
observed-address questions) it answered. The DHT lives in hivemind's own process, so its numbers are sampled
there on the node's timer (`dht_stats`, run through `DHT.run_coroutine`) and a scrape reads the last sample;
hivemind keeps no count of the DHT requests it serves, so those are not here (the routing table size and
connections show a node that nobody reaches). Process metrics are the library's, of the node's main process.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field

from hivemind.dht import DHT, DHTNode
from hivemind.dht.storage import DictionaryDHTValue
from prometheus_client import CollectorRegistry, Counter, PlatformCollector, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from protocol.errors import InvalidRecord
from protocol.metrics_http import MetricsServer
from protocol.records import verify_announcement

disable_created_metrics()


@dataclass(frozen=True, slots=True)
class DHTStats:
    """One sample of the DHT process's state."""

    routing_peers: int = 0
    records: int = 0
    announced: dict[str, int] = field(default_factory=dict)
    """Live, verified announcements stored here, per run id (first 16 hex digits)."""


async def dht_stats(_dht: DHT, node: DHTNode) -> DHTStats:
    """Inside the DHT process: the routing table's size, the records stored, and the announcements per run."""
    runs: Tally[str] = Tally()
    for _key, stored in node.protocol.storage.items():
        if not isinstance(stored.value, DictionaryDHTValue):
            continue
        for subkey, (value_bytes, _expiry) in stored.value.items():
            try:
                ann = verify_announcement(node.protocol.serializer.loads(value_bytes), subkey=subkey)
            except InvalidRecord:
                continue  # manifests, and anything stale or odd, are not peers
            runs[ann.run_id[:16]] += 1
    return DHTStats(routing_peers=len(node.protocol.routing_table.uid_to_peer_id),
                    records=len(node.protocol.storage), announced=dict(runs))  # fmt: skip


class BootstrapMetrics:
    """The registry a bootstrap node serves at /metrics; `update` is called with each new sample."""

    def __init__(self, *, peer_id: str = "", version: str = "") -> None:
        self.peer_id, self.version = peer_id, version
        self._lock = threading.Lock()
        self._stats = DHTStats()
        self._connections = 0
        self.registry = CollectorRegistry()
        self.registry.register(_BootstrapCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter("murmur_bootstrap_requests", "murmur requests this node answered, by handler.",
                                ("handler",), registry=self.registry)  # fmt: skip
        for handler in ("reachability", "observed_address"):  # shown at 0 from the start, so rate() works at once
            self.requests.labels(handler)
        self.http = MetricsServer(self.registry)

    def count_request(self, handler: str) -> None:
        self.requests.labels(handler).inc()

    def update(self, stats: DHTStats, connections: int) -> None:
        with self._lock:
            self._stats, self._connections = stats, int(connections)

    def sample(self) -> tuple[DHTStats, int]:
        with self._lock:
            return self._stats, self._connections


class _BootstrapCollector:
    def __init__(self, metrics: BootstrapMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats, connections = self.metrics.sample()
        yield InfoMetricFamily("murmur_bootstrap", "Who this bootstrap node is: libp2p peer id, murmur version.",
                               value={"peer": self.metrics.peer_id, "version": self.metrics.version})  # fmt: skip
        for name, help_text, value in (
            ("murmur_bootstrap_dht_routing_peers", "DHT nodes in this node's routing table.", stats.routing_peers),
            ("murmur_bootstrap_dht_records", "DHT keys stored on this node.", stats.records),
            ("murmur_bootstrap_p2p_connected_peers", "libp2p peers connected to this node now.", connections),
        ):
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        announced = GaugeMetricFamily("murmur_bootstrap_announced_peers",
                                      "Live, verified peer announcements stored on this node, by run.",
                                      labels=("run",))  # fmt: skip
        for run, count in sorted(stats.announced.items()):
            announced.add_metric([run], count)
        yield announced
