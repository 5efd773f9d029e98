"""Waiting on the event loop with a way out: the daemon's waits all end early when its `stop` event is set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True as soon as `stop` is set (at once if it already is), False if it never was."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True


async def unless_stopped(work: asyncio.Future, stop: asyncio.Event) -> bool:
    """Wait for `work`; if `stop` is set first, cancel it and return False."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if work.done():
        return True
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return False


class Pacer:
    """Starts of consecutive rounds at least `min_gap_s` apart (the run's `gossip.min_round_s`).

    Servers size their per-peer rate limits on that floor (protocol/limits.py: an honest peer pushes to a server at
    most once a round), so a peer whose rounds are faster than it would be cut off as a flooder by the whole swarm;
    it waits out the rest of the gap instead, serving partners all the while, and spends no device time on it.
    """

    def __init__(self, min_gap_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_gap_s = min_gap_s
        self._clock = clock
        self._began: float | None = None

    async def next_round(self, stop: asyncio.Event) -> bool:
        """Wait until the next round may begin and mark its start; False (nothing marked) when `stop` came first."""
        if self._began is not None:
            rest = self._began + self.min_gap_s - self._clock()
            if rest > 0 and await stopped_within(stop, rest):
                return False
        self._began = self._clock()
        return True
