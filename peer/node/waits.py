"""Waiting on the event loop with a way out: the daemon's waits all end early when its `stop` event is set."""

from __future__ import annotations

import asyncio


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
