"""`murmur status` as a table, live (`--watch`) and as a plot of the swarm's loss (`--plot`): peer/cli/watch.py.
The command on a real swarm is in tests/test_daemon_swarm.py."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from peer.cli.main import main
from peer.cli.watch import LossHistory, format_table, watch
from protocol.records import Announcement

pytestmark = pytest.mark.timeout(60)


def announced(peer_id: str, slice_index: int, round: int, loss: float, sent: int = 0) -> Announcement:
    return Announcement(peer_id=peer_id, public_key=b"", run_id="r", endpoint="127.0.0.1:7000", tls_fingerprint="",
                        tls_certificate=b"", slice=slice_index, round=round, tokens_per_second=1234.5, loss=loss,
                        software_version="0.1.0", protocol_version="1.0", expires_unix=0.0, bytes_sent=sent,
                        bytes_received=sent // 2)  # fmt: skip


def test_the_table_has_a_row_per_peer_with_round_loss_throughput_and_bytes() -> None:
    rows = [announced("b" * 64, 1, 7, 2.5, sent=3 << 20).to_json(), announced("a" * 64, 0, 8, math.nan).to_json()]
    table = format_table("demo", rows).splitlines()
    assert table[0] == "swarm demo: 2 live peer(s)"
    assert table[1].split() == ["peer", "endpoint", "slice", "round", "loss", "tok/s", "sent", "recv", "version"]
    assert table[2].split()[:5] == ["a" * 16, "127.0.0.1:7000", "0", "8", "-"]  # by slice; no loss yet
    assert "3.0 MiB" in table[3] and "1.5 MiB" in table[3] and "2.500" in table[3]
    assert format_table("demo", []) == "swarm demo: no live peers"


def test_the_history_keeps_one_point_per_announced_round_and_plots_it(tmp_path: Path) -> None:
    history = LossHistory(began=0.0)
    first = [announced("a" * 64, 0, 1, 3.0), announced("b" * 64, 1, 1, math.nan)]
    history.add(first, now=5.0)
    history.add(first, now=10.0)  # the same announcements read again
    history.add([replace(first[0], round=2, loss=2.5), replace(first[1], round=2, loss=2.8)], now=15.0)
    assert history.points["a" * 64] == [(5.0, 1, 3.0), (15.0, 2, 2.5)]
    assert history.points["b" * 64] == [(15.0, 2, 2.8)]
    history.plot(tmp_path / "loss.png", "demo")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # the temporary file was renamed


def test_watch_reads_until_interrupted_and_rewrites_the_plot(tmp_path: Path) -> None:
    reads = iter([[announced("a" * 64, 0, r, 3.0 - r / 10)] for r in range(3)])
    shown: list[str] = []

    def read() -> list[Announcement]:
        try:
            return next(reads)
        except StopIteration:  # Ctrl-C during the fourth read: it ends the watch once the read is done
            os.kill(os.getpid(), signal.SIGINT)
            return [announced("a" * 64, 0, 3, 2.0)]

    before = signal.getsignal(signal.SIGINT)  # pytest's default handler; SIG_IGN in an xdist worker
    history = watch(read, "demo", every=0.01, plot=tmp_path / "w.png", say=shown.append)
    assert signal.getsignal(signal.SIGINT) == before  # put back
    assert len(shown) == 3 and all("swarm demo: 1 live peer(s)" in s for s in shown)
    assert [r for _, r, _ in history.points["a" * 64]] == [0, 1, 2]
    assert (tmp_path / "w.png").stat().st_size > 1000


def test_plot_goes_with_watch_and_json_does_not() -> None:
    base = ["status", "--swarm", "demo", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm"]
    alone = CliRunner().invoke(main, [*base, "--plot", "p.png"])
    assert alone.exit_code == 2 and "--watch" in alone.output
    both = CliRunner().invoke(main, [*base, "--watch", "--json"])
    assert both.exit_code == 2 and "--json" in both.output


def test_the_exporter_serves_each_read_of_the_swarm_as_prometheus_metrics() -> None:
    """`--watch --metrics-port`: one scrape target for the whole swarm, refreshed by each read; a peer that
    stops announcing drops out; a port in use is a one-line setup error."""
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from peer.swarm.exporter import SwarmExporter
    from protocol.errors import SetupError
    from protocol.metrics_http import BackgroundMetricsServer

    exporter = SwarmExporter("demo")
    server = BackgroundMetricsServer(exporter.registry)
    port = server.start("127.0.0.1", 0)
    try:

        def scrape() -> dict[tuple[str, str], float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return {(s.name, s.labels.get("peer", "")): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

        exporter.update([announced("a" * 64, 0, 7, 2.5, sent=1000), announced("b" * 64, 1, 8, math.nan)])
        seen = scrape()
        assert seen["murmur_swarm_live_peers", ""] == 2 and seen["murmur_swarm_reads_total", ""] == 1
        assert seen["murmur_swarm_peer_round", "a" * 16] == 7 and seen["murmur_swarm_peer_round", "b" * 16] == 8
        assert seen["murmur_swarm_peer_train_loss", "a" * 16] == 2.5
        assert ("murmur_swarm_peer_train_loss", "b" * 16) not in seen  # no loss announced yet: no sample
        assert seen["murmur_swarm_peer_sent_bytes_total", "a" * 16] == 1000
        exporter.update([announced("a" * 64, 0, 9, 2.4)])
        seen = scrape()
        assert seen["murmur_swarm_live_peers", ""] == 1 and ("murmur_swarm_peer_round", "b" * 16) not in seen
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(SetupError, match="metrics server: cannot listen on 127.0.0.1"):
                BackgroundMetricsServer(exporter.registry).start("127.0.0.1", taken.getsockname()[1])
    finally:
        server.stop()
        server.stop()


def test_metrics_port_goes_with_watch() -> None:
    result = CliRunner().invoke(main, ["status", "--swarm", "demo", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm",
                                       "--metrics-port", "0"])  # fmt: skip
    assert result.exit_code == 2 and "--metrics-port serves the swarm as it is read" in result.output
