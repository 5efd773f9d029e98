"""peer/metrics: exact exposition text, a real loopback scrape, hostile clients, monotonic counters, status line."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import sys
import threading
import time

import pytest
from conftest_wire import until
from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

from peer.node.metrics import Metrics, PeerInfo, StatusLine, human_bytes

RUN = "ab" * 8
LABELS = f'run="{RUN}",swarm="demo"'
EXPECTED_MURMUR = f"""\
# HELP murmur_peer_info Who this peer is: swarm, run, peer id, slice, version, device.
# TYPE murmur_peer_info gauge
murmur_peer_info{{device="cpu",peer="{"cd" * 32}",run="{RUN}",slice="1",slices="4",swarm="demo",version="0.1.0"}} 1.0
# HELP murmur_round Outer round this peer is in.
# TYPE murmur_round gauge
murmur_round{{{LABELS}}} 12.0
# HELP murmur_train_loss Mean inner loss of the last round (nats per token).
# TYPE murmur_train_loss gauge
murmur_train_loss{{{LABELS}}} 3.25
# HELP murmur_validation_loss Loss of the outer weights on held-out data at the last evaluation (nats per token).
# TYPE murmur_validation_loss gauge
murmur_validation_loss{{{LABELS}}} 3.5
# HELP murmur_live_peers Live peers announced in the swarm, this one included.
# TYPE murmur_live_peers gauge
murmur_live_peers{{{LABELS}}} 7.0
# HELP murmur_admitted_peers Live peers that answered at their endpoint or exchanged with this one.
# TYPE murmur_admitted_peers gauge
murmur_admitted_peers{{{LABELS}}} 5.0
# HELP murmur_round_partners Partners exchanged with in the last round.
# TYPE murmur_round_partners gauge
murmur_round_partners{{{LABELS}}} 2.0
# HELP murmur_trained_tokens_total Tokens trained on since the process started.
# TYPE murmur_trained_tokens_total counter
murmur_trained_tokens_total{{{LABELS}}} 4096.0
# HELP murmur_sent_bytes_total Update payload bytes sent to partners.
# TYPE murmur_sent_bytes_total counter
murmur_sent_bytes_total{{{LABELS}}} 1536.0
# HELP murmur_received_bytes_total Update payload bytes received from partners.
# TYPE murmur_received_bytes_total counter
murmur_received_bytes_total{{{LABELS}}} 3.145728e+06
# HELP murmur_clipped_updates_total Partner terms scaled down to the clipping bound (peer/core/robust.py).
# TYPE murmur_clipped_updates_total counter
murmur_clipped_updates_total{{{LABELS}}} 3.0
# HELP murmur_rejected_updates_total Partner updates rejected, by reason.
# TYPE murmur_rejected_updates_total counter
murmur_rejected_updates_total{{reason="a\\\\b \\"q\\"\\nnl",{LABELS}}} 1.0
murmur_rejected_updates_total{{reason="nonfinite",{LABELS}}} 2.0
"""
"""The murmur families of `known_state()`, exactly: the order, the names, the labels, the escaping."""


def known_state() -> Metrics:
    m = Metrics()
    m.identify(PeerInfo(swarm="demo", run=RUN, peer="cd" * 32, version="0.1.0", device="cpu"))
    m.set_round(12)
    m.set_slice(1, 4)
    m.set_loss(3.25)
    m.set_validation_loss(3.5)
    m.add_tokens(4000)
    m.add_tokens(96)
    m.add_bytes_sent(1536)
    m.add_bytes_received(3 * 2**20)
    m.reject("nonfinite")
    m.reject("nonfinite")
    m.reject('a\\b "q"\nnl')
    m.add_clipped(3)
    m.set_peers_live(7)
    m.set_peers_admitted(5)
    m.set_partners_reached(2)
    return m


def murmur_part(text: str) -> str:
    """The lines of the custom murmur families (before the library's process metrics)."""
    return text[: text.index("# HELP process_")]


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.timeout(10)
def test_render_matches_the_exposition_format_exactly() -> None:
    assert murmur_part(known_state().render()) == EXPECTED_MURMUR


@pytest.mark.timeout(10)
def test_names_follow_prometheus_conventions_and_every_murmur_series_names_its_swarm_and_run() -> None:
    m = known_state()
    m.observe_round(1.2)
    asyncio.run(m.timed_exchange(asyncio.sleep(0, result=False)))
    parsed = families(m.render())
    for name, family in parsed.items():
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        assert not name.endswith(("_seconds_total", "_created")) and "_total_" not in name, name
        if name.startswith("murmur_"):
            assert all({"swarm", "run"} <= set(s.labels) for s in family.samples), name
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info", "python_gc_collections"} <= set(
        parsed
    )
    rounds = {s.name: s.value for s in parsed["murmur_round_duration_seconds"].samples if not s.labels.get("le")}
    assert rounds == {"murmur_round_duration_seconds_count": 1, "murmur_round_duration_seconds_sum": 1.2}
    exchanges = {
        s.labels["outcome"]: s.value
        for s in parsed["murmur_exchange_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert exchanges == {"ok": 0, "failed": 1}
    assert "murmur_gpu_memory_allocated_bytes" not in parsed  # a CPU peer has no GPU series


@pytest.mark.timeout(10)
def test_fresh_metrics_render_nan_losses_and_no_rejection_samples() -> None:
    parsed = families(Metrics().render())
    assert math.isnan(parsed["murmur_train_loss"].samples[0].value)
    assert math.isnan(parsed["murmur_validation_loss"].samples[0].value)
    assert parsed["murmur_rejected_updates"].samples == []
    assert parsed["murmur_peer_info"].samples[0].labels["slice"] == ""


@pytest.mark.timeout(10)
def test_two_peers_in_one_process_keep_their_own_series() -> None:
    a, b = known_state(), Metrics()
    b.set_round(99)
    assert "murmur_round{" + LABELS + "} 12.0" in a.render() and 'murmur_round{run="",swarm=""} 99.0' in b.render()


@pytest.mark.timeout(10)
def test_counters_only_go_up() -> None:
    m = known_state()
    for add in (m.add_tokens, m.add_bytes_sent, m.add_bytes_received, m.set_peers_live, m.set_peers_admitted):
        with pytest.raises(ValueError):
            add(-1)
    with pytest.raises(ValueError):
        m.reject("nonfinite", -1)
    assert murmur_part(m.render()) == EXPECTED_MURMUR


@pytest.mark.timeout(10)
def test_concurrent_updates_are_not_lost() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(2000):
            m.add_tokens(1)
            m.reject("stale")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap.tokens == 8000 and snap.rejected == {"stale": 8000}


async def request(port: int, raw: bytes, *, hang_up: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if hang_up:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def get(port: int, path: str = "/metrics") -> bytes:
    return await request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def run(coro_fn) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 20))


@pytest.mark.timeout(30)
def test_get_metrics_over_a_real_socket() -> None:
    async def main() -> None:
        m = known_state()
        await m.serve("127.0.0.1", 0)
        try:
            response = await get(m.port)
            head, body = response.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
            assert f"Content-Length: {len(body)}".encode() in head
            assert murmur_part(body.decode()) == EXPECTED_MURMUR
            m.set_round(13)  # a later scrape sees later values
            assert f"murmur_round{{{LABELS}}} 13.0\n".encode() in await get(m.port)
        finally:
            await m.close()
        await m.close()  # twice is fine

    run(main)


@pytest.mark.timeout(30)
def test_other_paths_methods_and_garbage() -> None:
    async def main() -> None:
        m = known_state()
        await m.serve("127.0.0.1", 0)
        try:
            assert (await get(m.port, "/")).startswith(b"HTTP/1.1 404 ")
            assert (await get(m.port, "/metrics?x=1")).startswith(b"HTTP/1.1 200 ")
            post = await request(m.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in post
            assert (await request(m.port, b"\x00\xff garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            assert await request(m.port, b"GET /met", hang_up=True) == b""  # hung up half-way: nothing to answer
            assert (await get(m.port)).startswith(b"HTTP/1.1 200 ")
        finally:
            await m.close()

    run(main)


@pytest.mark.timeout(30)
def test_oversized_request_is_refused_and_the_server_lives_on() -> None:
    async def main() -> None:
        m = known_state()
        await m.serve("127.0.0.1", 0)
        try:
            huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
            try:
                answer = await request(m.port, huge)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
            except ConnectionError:
                pass  # the server closed with our unread bytes still queued: a reset is a refusal too
            assert (await get(m.port)).startswith(b"HTTP/1.1 200 ")
        finally:
            await m.close()

    run(main)


@pytest.mark.timeout(30)
def test_a_slow_client_times_out_without_blocking_others() -> None:
    async def main() -> None:
        m = known_state()
        m.http.read_timeout = 0.5
        await m.serve("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", m.port)
            writer.write(b"GET /metrics HTTP/1.1\r\n")  # ... and never finishes the head
            await writer.drain()
            assert (await get(m.port)).startswith(b"HTTP/1.1 200 ")  # served meanwhile
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 408 ")
            writer.close()
            assert (await get(m.port)).startswith(b"HTTP/1.1 200 ")
            # a client still connected when the server closes is cut off, not waited for
            _, idle = await asyncio.open_connection("127.0.0.1", m.port)
            m.http.read_timeout = 60
        finally:
            await m.close()
        idle.close()

    run(main)


@pytest.mark.timeout(30)
def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    async def main() -> None:
        m = known_state()
        m.http.max_connections = 1
        await m.serve("127.0.0.1", 0)
        try:
            _, holder = await asyncio.open_connection("127.0.0.1", m.port)
            await until(lambda: len(m.http._connections) == 1)
            try:
                assert await get(m.port) == b""
            except ConnectionError:
                pass  # closed before or after our request reached it: refused either way
            holder.close()
            await until(lambda: not m.http._connections)
            assert (await get(m.port)).startswith(b"HTTP/1.1 200 ")
        finally:
            await m.close()

    run(main)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


LINE_12 = "round 12 | slice 1/4 | loss 3.250 | 0 tok/s | partners 2 | peers 7 | sent 1.5 KiB recv 3.0 MiB | rejected 3"


@pytest.mark.timeout(10)
def test_status_line_formats_a_snapshot_and_logs_nothing_while_drawn(caplog: pytest.LogCaptureFixture) -> None:
    m, clock = known_state(), Clock()
    status = StatusLine(m, clock=clock, window_s=10, logger=logging.getLogger("test.drawn"))
    with caplog.at_level(logging.INFO, logger="test.drawn"):
        assert status.update(drawn=True) == LINE_12
        clock.now += 2
        m.add_tokens(3000)
        assert "| 1.5k tok/s |" in status.update(drawn=True)
    assert not [r for r in caplog.records if r.name == "test.drawn"]


@pytest.mark.timeout(10)
def test_tokens_per_second_uses_a_sliding_window() -> None:
    status = StatusLine(Metrics(), window_s=10)
    assert status.tokens_per_second(0, 0) == 0
    assert status.tokens_per_second(5, 50_000) == 10_000
    # base: the newest sample at least window_s old (t=5), so the rate covers just over the window
    assert status.tokens_per_second(20, 60_000) == pytest.approx(10_000 / 15)
    assert status.tokens_per_second(31, 61_100) == pytest.approx(1_100 / 11)


@pytest.mark.timeout(10)
def test_status_line_off_a_tty_logs_plain_lines_at_most_every_n_seconds(caplog: pytest.LogCaptureFixture) -> None:
    m, clock = known_state(), Clock()
    logger = logging.getLogger("test.status")
    status = StatusLine(m, clock=clock, log_every_s=30, logger=logger)
    with caplog.at_level(logging.INFO, logger="test.status"):
        for _ in range(7):  # every 10 s for 60 s: logged at 0, 30 and 60
            status.update()
            clock.now += 10
    lines = [r.getMessage() for r in caplog.records if r.name == "test.status"]
    assert len(lines) == 3
    assert all("\r" not in line and "\x1b" not in line and line.startswith("round 12 |") for line in lines)


@pytest.mark.timeout(10)
def test_human_bytes() -> None:
    sizes = (0, 1023, 1024, 1536, 5 * 2**30)
    assert [human_bytes(n) for n in sizes] == ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 GiB"]


def _screen(text: str) -> list[str]:
    """The rows a terminal shows for `text`: a \\r returns to column 0 and what follows overwrites the row
    (tqdm clears a row with spaces); trailing blanks stripped."""
    rows = []
    for row in text.split("\n"):
        shown = ""
        for part in row.split("\r"):
            shown = part + shown[len(part) :]
        rows.append(shown.rstrip())
    return rows


@pytest.mark.timeout(20)
def test_status_reporter_draws_on_a_tty_and_keeps_round_lines_and_logs_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stdout and stderr are one terminal, as for a volunteer: the round line, a log record and the status
    line each end up on their own row, the status last, and the last status stays after the stop."""
    from peer.node.status import StatusReporter

    term = FakeTTY()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    murmur = logging.getLogger("murmur")
    handler = logging.StreamHandler(sys.stderr)  # what configure_logging installs
    monkeypatch.setattr(murmur, "handlers", [handler])
    monkeypatch.setattr(murmur, "propagate", False)
    m = known_state()
    reporter = StatusReporter(m, every_s=0.05)

    async def main() -> None:
        reporter.start()
        await until(lambda: term.getvalue().count("round 12 |") >= 4, timeout=10)  # redrawn on the timer
        m.set_round(13)
        reporter.emit("round 13 loss 2.5000 tok/s 100 slice 1 exchanged 2/2")
        logging.getLogger("murmur.peer.node.daemon").warning("exchange failed")
        assert murmur.handlers != [handler]  # redirected through tqdm while drawn
        shown = _screen(term.getvalue())
        assert shown[-3:] == ["round 13 loss 2.5000 tok/s 100 slice 1 exchanged 2/2", "exchange failed",
                              shown[-1]] and shown[-1].startswith("round 13 | slice 1/4")  # fmt: skip
        await reporter.aclose()
        await reporter.aclose()

    asyncio.run(main())
    assert murmur.handlers == [handler]
    assert term.getvalue().endswith("\n") and _screen(term.getvalue())[-2].startswith("round 13 | slice 1/4")
    settled = len(term.getvalue())
    time.sleep(0.2)
    assert len(term.getvalue()) == settled  # stopped redrawing


@pytest.mark.timeout(20)
def test_status_reporter_off_a_tty_prints_round_lines_plainly_and_logs_status_now_and_then(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from peer.node.status import StatusReporter

    m, err, out = known_state(), io.StringIO(), io.StringIO()
    reporter = StatusReporter(m, err, out=out, every_s=0.02, log_every_s=60, logger=logging.getLogger("test.rep"))

    async def main() -> None:
        reporter.start()
        await asyncio.sleep(0.2)
        reporter.emit("round 12 loss 3.2500")
        reporter.emit("eval round 12 val_loss 3.1000")
        await reporter.aclose()

    with caplog.at_level(logging.INFO, logger="test.rep"):
        asyncio.run(main())
    assert out.getvalue() == "round 12 loss 3.2500\neval round 12 val_loss 3.1000\n"
    assert err.getvalue() == ""
    logged = [r.getMessage() for r in caplog.records if r.name == "test.rep"]
    assert len(logged) == 1 and logged[0].startswith("round 12 | slice 1/4 | loss 3.250")


@pytest.mark.timeout(10)
def test_a_cuda_peer_exports_its_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator's numbers on the peer's own device (torch.cuda patched: no GPU in CI)."""
    import torch

    from peer.node.metrics import GPU_MEMORY_METRICS

    read: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    for i, (_help, reader) in enumerate(GPU_MEMORY_METRICS.values()):
        monkeypatch.setattr(torch.cuda, reader, lambda index, i=i: read.append(index) or (i + 1) * 2**30)
    m = Metrics()
    m.identify(PeerInfo(swarm="demo", run=RUN, device="cuda:1"))
    parsed = families(m.render())
    values = {name: parsed[name].samples[0].value for name in GPU_MEMORY_METRICS}
    assert values == {"murmur_gpu_memory_allocated_bytes": 2**30, "murmur_gpu_memory_reserved_bytes": 2 * 2**30,
                      "murmur_gpu_memory_peak_bytes": 3 * 2**30}  # fmt: skip
    assert read == [1, 1, 1]
