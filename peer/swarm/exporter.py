"""The swarm as a whole, for Prometheus: every live peer's verified announcement as metric samples.

A run owner's Prometheus can scrape the peers it runs, not the volunteers' home machines; what every peer
does publish is its signed announcement in the DHT (round, slice, train loss, tokens/s, payload bytes, version),
re-signed every TTL/3. `murmur status --watch --metrics-port P` reads those and serves them here, so a
dashboard shows the whole swarm from one scrape target. Only verified announcements are shown (what `murmur
status` lists); a peer that stops announcing drops out at the next read.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from protocol.records import Announcement

disable_created_metrics()

PEER_LABELS = ("swarm", "run", "peer", "slice", "version")


class SwarmExporter:
    """Holds the last read of the swarm; `registry` serves it (with protocol/metrics_http.py)."""

    def __init__(self, swarm: str) -> None:
        self.swarm = swarm
        self._lock = threading.Lock()
        self._peers: list[Announcement] = []
        self._reads = 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def update(self, peers: Sequence[Announcement]) -> None:
        with self._lock:
            self._peers, self._reads = list(peers), self._reads + 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            peers, reads = list(self._peers), self._reads
        reads_family = CounterMetricFamily("murmur_swarm_reads", "Reads of the swarm's announcements from the DHT.",
                                           labels=("swarm",))  # fmt: skip
        reads_family.add_metric([self.swarm], reads)
        yield reads_family
        live = GaugeMetricFamily("murmur_swarm_live_peers", "Peers with a live, verified announcement, by run.",
                                 labels=("swarm", "run"))  # fmt: skip
        for run in sorted({p.run_id[:16] for p in peers}):
            live.add_metric([self.swarm, run], sum(1 for p in peers if p.run_id[:16] == run))
        yield live
        per_peer = (
            (GaugeMetricFamily, "murmur_swarm_peer_round", "The outer round a peer announced.", "round"),
            (GaugeMetricFamily, "murmur_swarm_peer_train_loss", "The train loss a peer announced (nats per token).",
             "loss"),
            (GaugeMetricFamily, "murmur_swarm_peer_tokens_per_second", "The training rate a peer announced.",
             "tokens_per_second"),
            (CounterMetricFamily, "murmur_swarm_peer_sent_bytes", "Update payload bytes a peer announced it sent.",
             "bytes_sent"),
            (CounterMetricFamily, "murmur_swarm_peer_received_bytes",
             "Update payload bytes a peer announced it received.", "bytes_received"),
        )  # fmt: skip
        for kind, name, help_text, attribute in per_peer:
            family = kind(name, help_text, labels=PEER_LABELS)
            for p in peers:
                value = float(getattr(p, attribute))
                if math.isfinite(value):
                    family.add_metric([self.swarm, p.run_id[:16], p.peer_id[:16], str(p.slice), p.software_version],
                                      value)  # fmt: skip
            yield family
