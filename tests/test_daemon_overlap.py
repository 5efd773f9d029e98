"""The daemon's round order with and without overlap, on a fake trainer (no model, no sockets).

With overlap, round r's outer step lands after round r+1's inner steps (a one-round delay) and never
while an inner round runs; without it every round lands before the next one trains; `--rounds N` lands
all N; a signal drops the round in flight.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from types import SimpleNamespace

import pytest

from peer.daemon import Daemon
from peer.robust import ClipReport
from peer.trainer import TrainedRound
from protocol.codec import CodecConfig
from protocol.updates import OutgoingUpdate


class FakeTrainer:
    """Records the order of the calls the daemon makes into the training thread."""

    def __init__(self) -> None:
        self.layouts, self.shapes, self.slice = [{}], {}, 0
        self.calls: list[tuple[str, int]] = []
        self.busy = False

    def take_slice(self, index: int) -> None:
        self.slice = index

    def train_round(self, r: int, halt: threading.Event) -> TrainedRound:
        assert not self.busy
        self.calls.append(("train", r))
        self.busy = True  # an outer step arriving now (from another thread) would trip its assertion
        time.sleep(0.05)
        self.busy = False
        return TrainedRound(update=OutgoingUpdate(r, 0, {}), own=r, loss=1.0, tokens=100)  # type: ignore[arg-type]

    def outer_step(self, own: int, updates: list) -> ClipReport:
        assert not self.busy, "an outer step ran while an inner round was training"
        self.calls.append(("outer", own))
        return ClipReport()

    def snapshot(self, r: int) -> None:
        return None


def _daemon(overlap: bool) -> Daemon:
    member = SimpleNamespace(slice=0, peers=[], rng=random.Random(0), manifest=SimpleNamespace(run_id="ab" * 32),
                             round=-1, loss=None, tokens_per_second=0.0, lookup=lambda _: None,
                             others=lambda: [])  # fmt: skip
    run = SimpleNamespace(gossip=SimpleNamespace(fanout=2, exchange_timeout_s=1.0), codec=CodecConfig())
    identity = SimpleNamespace(peer_id="cd" * 32)
    return Daemon(FakeTrainer(), member, identity, run, overlap=overlap)  # type: ignore[arg-type]


async def _rounds(daemon: Daemon, n: int, stop: asyncio.Event) -> None:
    for _ in range(n):
        assert await daemon.run_round(threading.Event(), stop)


@pytest.mark.timeout(30)
def test_overlap_lands_each_round_after_the_next_one_trained() -> None:
    daemon = _daemon(overlap=True)

    async def go() -> None:
        stop = asyncio.Event()
        await _rounds(daemon, 3, stop)
        assert daemon.in_flight is not None and daemon.in_flight.round == 2
        flight, daemon.in_flight = daemon.in_flight, None
        assert await daemon.land(flight, stop)

    asyncio.run(go())
    calls = daemon.trainer.calls  # type: ignore[attr-defined]
    assert calls == [("train", 0), ("train", 1), ("outer", 0), ("train", 2), ("outer", 1), ("outer", 2)]
    assert daemon.clock == 2


@pytest.mark.timeout(30)
def test_without_overlap_every_round_lands_before_the_next_trains() -> None:
    daemon = _daemon(overlap=False)
    asyncio.run(_rounds(daemon, 3, asyncio.Event()))
    calls = daemon.trainer.calls  # type: ignore[attr-defined]
    assert calls == [("train", 0), ("outer", 0), ("train", 1), ("outer", 1), ("train", 2), ("outer", 2)]
    assert daemon.in_flight is None and daemon.clock == 2


@pytest.mark.timeout(30)
def test_a_signal_drops_the_round_in_flight_without_its_outer_step() -> None:
    daemon = _daemon(overlap=True)

    async def go() -> None:
        await _rounds(daemon, 2, asyncio.Event())
        await daemon.drop_in_flight()

    asyncio.run(go())
    assert daemon.in_flight is None
    assert daemon.trainer.calls == [("train", 0), ("train", 1), ("outer", 0)]  # type: ignore[attr-defined]
    assert daemon.clock == 0
