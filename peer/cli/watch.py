"""What `murmur status` shows: the swarm as a table, once or live (`--watch`), and its loss over time (`--plot`).

A row is a peer's verified announcement, which each peer re-signs every TTL/3 with its round, loss, tokens/s
and the payload bytes it has sent and received: a row is at most that old, whatever `--every` says. Live, one
read-only DHT view is read every `every` seconds; on a terminal the table is redrawn in place, off one each read
is printed after a time line (a log a run owner can keep). The plot is rewritten after every read, in one step
(a viewer never opens half a PNG), so it can be left open while the swarm trains.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peer.node.metrics import human_bytes
from protocol.records import Announcement


def format_table(swarm: str, rows: Sequence[dict]) -> str:
    """A readable table of live peers (`Announcement.to_json` rows), one line each."""
    if not rows:
        return f"swarm {swarm}: no live peers"
    head = (f"{'peer':<16}  {'endpoint':<21}  {'slice':>5}  {'round':>6}  {'loss':>7}  {'tok/s':>9}  {'sent':>9}  "
            f"{'recv':>9}  version")  # fmt: skip
    lines = [f"swarm {swarm}: {len(rows)} live peer(s)", head]
    for r in sorted(rows, key=lambda r: (r["slice"], r["peer_id"])):
        loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
        endpoint = r["endpoint"] or "(client-only)"
        lines.append(f"{r['peer_id'][:16]}  {endpoint:<21}  {r['slice']:>5}  {r['round']:>6}  {loss:>7}  "
                     f"{r['tokens_per_s']:>9.1f}  {human_bytes(r['bytes_sent']):>9}  "
                     f"{human_bytes(r['bytes_received']):>9}  {r['version']}")  # fmt: skip
    return "\n".join(lines)


@dataclass
class LossHistory:
    """Each peer's announced loss over the watch, as (seconds since it began, round, loss)."""

    began: float = field(default_factory=time.monotonic)
    points: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)

    def add(self, peers: Sequence[Announcement], now: float | None = None) -> None:
        """Record each peer's loss once per announced round (a re-read of the same announcement adds nothing)."""
        at = (time.monotonic() if now is None else now) - self.began
        for peer in peers:
            seen = self.points.setdefault(peer.peer_id, [])
            if math.isfinite(peer.loss) and (not seen or seen[-1][1] != peer.round):
                seen.append((at, peer.round, peer.loss))

    def plot(self, path: Path, swarm: str) -> None:
        """Loss against minutes since the watch began, a line per peer; written to a temporary file, then renamed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for peer_id, seen in sorted(self.points.items()):
            if seen:
                ax.plot([t / 60 for t, _, _ in seen], [loss for _, _, loss in seen], marker=".", label=peer_id[:8])
        ax.set(xlabel="minutes since the watch began", ylabel="announced train loss (nats/token)",
               title=f"swarm {swarm}: {len(self.points)} peer(s) seen")  # fmt: skip
        if self.points:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        fig.savefig(partial, dpi=100, format="png")
        plt.close(fig)
        os.replace(partial, path)


@contextlib.contextmanager
def exported(swarm: str, host: str, port: int | None) -> Iterator[Callable[[list[Announcement]], None]]:
    """With a port, serve each read of the swarm as Prometheus metrics (peer/swarm/exporter.py) while inside;
    yields what to call with each read (nothing happens without a port)."""
    if port is None:
        yield lambda _peers: None
        return
    from peer.swarm.exporter import SwarmExporter
    from protocol.metrics_http import BackgroundMetricsServer

    exporter = SwarmExporter(swarm)
    server = BackgroundMetricsServer(exporter.registry)
    print(f"metrics at http://{host}:{server.start(host, port)}/metrics", flush=True)
    try:
        yield exporter.update
    finally:
        server.stop()


def watch(read: Callable[[], list[Announcement]], swarm: str, *, every: float, plot: Path | None,
          say: Callable[[str], None] = print,
          on_read: Callable[[list[Announcement]], None] = lambda _peers: None) -> LossHistory:  # fmt: skip
    """Read and show the swarm every `every` seconds until SIGTERM or Ctrl-C; the history it saw. Each read
    also goes to `on_read` (the metrics exporter)."""
    stop = threading.Event()
    # Ctrl-C as SIGTERM: a flag the loop reads after each read, not a KeyboardInterrupt raised wherever the main
    # thread is. In the docs test on a loaded machine, a watch went on reading for 240 s after Ctrl-C (which also
    # reaches the DHT process, whose hivemind catches BaseException around each request); the flag cannot be lost.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    history = LossHistory()
    redraw = sys.stdout.isatty()
    try:
        while not stop.is_set():
            peers = read()
            if stop.is_set():
                break
            history.add(peers)
            on_read(peers)
            table = format_table(swarm, [p.to_json() for p in peers])
            say(("\x1b[H\x1b[2J" if redraw else f"--- {time.strftime('%H:%M:%S')}\n") + table)
            if plot is not None:
                history.plot(plot, swarm)
            stop.wait(every)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return history
