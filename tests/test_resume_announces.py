"""A peer that resumes (or joins late) announces the round it goes on from at once: before, its first
announcement (made on entering the swarm, at round 0) stood until the next refresh, a third of the TTL later,
and `murmur status` and the swarm's dashboard showed a resumed peer at round 0, loss '-' (docs test finding)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from peer.node import lifecycle, resume

pytestmark = pytest.mark.timeout(30)


class FakeMember:
    def __init__(self) -> None:
        self.slice, self.round, self.announced = 1, 0, []

    def announce(self) -> None:
        self.announced.append(self.round)


def fake_daemon(clock: int) -> SimpleNamespace:
    daemon = SimpleNamespace(clock=clock, member=FakeMember(), policy=SimpleNamespace(run_id="r"), trainer=None,
                             eligible=lambda: [])  # fmt: skip

    async def late_join() -> None:
        daemon.clock = 12  # the donors' round

    daemon.late_join = late_join
    return daemon


@pytest.mark.parametrize(("restored", "announced"), [(7, [7]), (None, [12])])
def test_resuming_or_joining_late_announces_the_round_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, restored: int | None, announced: list[int]
) -> None:
    monkeypatch.setattr(resume, "restore", lambda *args, **kwargs: restored)
    daemon = fake_daemon(clock=-1)
    asyncio.run(lifecycle._resume_or_late_join(daemon, tmp_path))
    assert daemon.member.announced == announced and daemon.member.round == announced[-1]


def test_a_fresh_peer_with_no_donor_announces_nothing_new(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = fake_daemon(clock=-1)

    async def no_donor() -> None:
        return None

    daemon.late_join = no_donor
    asyncio.run(lifecycle._resume_or_late_join(daemon, None))
    assert daemon.member.announced == []
