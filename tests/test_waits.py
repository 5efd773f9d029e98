"""peer/node/waits.py: the daemon's stoppable waits and the pacing of its rounds."""

from __future__ import annotations

import asyncio

import pytest

from peer.node.waits import Pacer

pytestmark = pytest.mark.timeout(30)


def test_rounds_start_at_least_min_round_s_apart_and_stop_ends_the_wait() -> None:
    now = [100.0]
    pacer = Pacer(2.0, clock=lambda: now[0])

    async def scenario() -> list[bool]:
        stop = asyncio.Event()
        first = await pacer.next_round(stop)  # nothing to wait for
        now[0] += 2.5  # the round took longer than the floor: no wait
        second = await pacer.next_round(stop)
        now[0] += 0.5  # a fast round: 1.5 s are left, and a stop ends the wait with False, marking nothing
        stop.set()
        third = await pacer.next_round(stop)
        now[0] += 1.5
        fourth = await pacer.next_round(asyncio.Event())  # the floor has passed since the second start
        return [first, second, third, fourth]

    assert asyncio.run(scenario()) == [True, True, False, True]


def test_a_fast_round_waits_out_the_rest_of_the_floor() -> None:
    pacer = Pacer(0.2)

    async def gap() -> float:
        loop = asyncio.get_running_loop()
        await pacer.next_round(asyncio.Event())
        began = loop.time()
        await pacer.next_round(asyncio.Event())
        return loop.time() - began

    assert asyncio.run(gap()) >= 0.15  # a lower bound only: a sleep is never shorter, however loaded the machine
