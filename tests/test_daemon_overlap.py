"""The daemon's round order with and without overlap, on a fake trainer (no model, no sockets).

Every round takes its outer step with its own delta right after it trained, never while an inner round runs.
With overlap, round r's exchanges stay in flight while round r+1 trains, and what they bring is mixed into
round r+1's step; without it, round r's step waits for round r's exchanges. `--rounds N` lets the last
exchanges finish; a signal drops the exchanges in flight.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from types import SimpleNamespace

import pytest

from peer.core.robust import ClipReport
from peer.node.daemon import Daemon, InFlight
from peer.node.trainer import TrainedRound
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
    gossip = SimpleNamespace(fanout=2, exchange_timeout_s=1.0, min_round_s=0.0)  # no pacing: rounds as fast as asked
    run = SimpleNamespace(gossip=gossip, codec=CodecConfig())
    identity = SimpleNamespace(peer_id="cd" * 32)
    return Daemon(FakeTrainer(), member, identity, run, overlap=overlap)  # type: ignore[arg-type]


async def _rounds(daemon: Daemon, n: int, stop: asyncio.Event) -> None:
    for _ in range(n):
        assert await daemon.run_round(threading.Event(), stop)


class Gate:
    """Exchanges of the daemon's rounds that finish only when the test says so."""

    def __init__(self, daemon: Daemon) -> None:
        self.opened: dict[int, asyncio.Future] = {}
        self.daemon = daemon
        daemon._launch = self.launch  # type: ignore[method-assign]

    def launch(self, r: int, trained: TrainedRound) -> InFlight:
        self.opened[r] = asyncio.get_running_loop().create_future()
        self.daemon.trainer.calls.append(("launch", r))  # type: ignore[attr-defined]
        return InFlight(round=r, partners=1, exchanges=self.opened[r])

    def open(self, r: int) -> None:
        self.daemon.trainer.calls.append(("exchanged", r))  # type: ignore[attr-defined]
        self.opened[r].set_result([True])


@pytest.mark.timeout(30)
def test_overlap_mixes_a_rounds_exchanges_into_the_next_rounds_step() -> None:
    daemon = _daemon(overlap=True)
    gate = Gate(daemon)

    async def go() -> None:
        stop = asyncio.Event()
        assert await daemon.run_round(threading.Event(), stop)  # round 0: nothing in flight before it
        assert not gate.opened[0].done() and daemon.in_flight is not None and daemon.in_flight.round == 0
        round1 = asyncio.create_task(daemon.run_round(threading.Event(), stop))
        while ("launch", 1) not in daemon.trainer.calls:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not round1.done(), "round 1's step must wait for round 0's exchanges"
        gate.open(0)
        assert await round1
        gate.open(1)
        await daemon.finish_exchanges(stop)

    asyncio.run(go())
    calls = daemon.trainer.calls  # type: ignore[attr-defined]
    assert calls == [("train", 0), ("launch", 0), ("outer", 0), ("train", 1), ("launch", 1), ("exchanged", 0),
                     ("outer", 1), ("exchanged", 1)]  # fmt: skip
    assert daemon.clock == 1 and daemon.in_flight is None


@pytest.mark.timeout(30)
def test_without_overlap_every_round_lands_before_the_next_trains() -> None:
    daemon = _daemon(overlap=False)
    asyncio.run(_rounds(daemon, 3, asyncio.Event()))
    calls = daemon.trainer.calls  # type: ignore[attr-defined]
    assert calls == [("train", 0), ("outer", 0), ("train", 1), ("outer", 1), ("train", 2), ("outer", 2)]
    assert daemon.in_flight is None and daemon.clock == 2


@pytest.mark.timeout(30)
def test_overlap_takes_each_own_step_at_once_with_no_partners() -> None:
    daemon = _daemon(overlap=True)
    asyncio.run(_rounds(daemon, 3, asyncio.Event()))
    calls = daemon.trainer.calls  # type: ignore[attr-defined]
    assert calls == [("train", 0), ("outer", 0), ("train", 1), ("outer", 1), ("train", 2), ("outer", 2)]
    assert daemon.in_flight is not None and daemon.in_flight.round == 2 and daemon.clock == 2


@pytest.mark.timeout(30)
def test_a_signal_drops_the_exchanges_in_flight() -> None:
    daemon = _daemon(overlap=True)
    gate = Gate(daemon)

    async def go() -> None:
        stop = asyncio.Event()
        assert await daemon.run_round(threading.Event(), stop)
        round1 = asyncio.create_task(daemon.run_round(threading.Event(), stop))
        while ("launch", 1) not in daemon.trainer.calls:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        stop.set()  # round 0's exchanges never finished: round 1's step does not land
        assert not await round1
        await daemon.drop_in_flight()
        assert gate.opened[0].cancelled() and gate.opened[1].cancelled()

    asyncio.run(go())
    assert daemon.in_flight is None
    assert daemon.trainer.calls == [("train", 0), ("launch", 0), ("outer", 0), ("train", 1),  # type: ignore[attr-defined]
                                    ("launch", 1)]  # fmt: skip
    assert daemon.clock == 0
