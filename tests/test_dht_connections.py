"""The DHT connection trimmer's choices (protocol/dht_connections.py), against a fake node: which connections it
closes, which it keeps, and that a failing daemon call costs nothing. tests/test_swarm_scale.py runs it for real."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from protocol.dht_connections import ConnectionTrimmer


@dataclass
class FakeP2P:
    connected: list[str]
    fail: set[str] = field(default_factory=set)
    closed: list[str] = field(default_factory=list)

    async def list_peers(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(peer_id=p) for p in self.connected]

    async def disconnect(self, peer: str) -> None:
        if peer in self.fail:
            raise ConnectionError("p2pd did not answer")
        self.closed.append(peer)
        self.connected.remove(peer)


def _trimmer(connected: list[str], keep: tuple[str, ...] = (), cap: int = 3, idle_s: float = 8.0):
    p2p = FakeP2P(list(connected))
    routed: list[tuple[str, bool]] = []

    async def update_routing_table(node_id: object, peer_id: str, responded: bool = True) -> None:
        routed.append((peer_id, responded))

    node = SimpleNamespace(p2p=SimpleNamespace(list_peers=p2p.list_peers, _client=p2p),
                           protocol=SimpleNamespace(update_routing_table=update_routing_table))  # fmt: skip
    now = [0.0]
    trimmer = ConnectionTrimmer(node, list(keep), cap, idle_s, clock=lambda: now[0])  # type: ignore[arg-type]
    return trimmer, node, p2p, now, routed


@pytest.mark.timeout(10)
def test_idle_connections_beyond_the_bound_close_longest_idle_first_and_kept_peers_stay() -> None:
    async def scenario() -> None:
        trimmer, node, p2p, now, routed = _trimmer(["boot", "a", "b", "c", "d", "e"], keep=("boot",))
        assert await trimmer.trim() == 6 and p2p.closed == [], "nothing is idle yet: first seen counts as activity"
        for t, peer in ((1.0, "a"), (2.0, "b"), (3.0, "c")):
            now[0] = t
            await node.protocol.update_routing_table(None, peer, responded=True)
        now[0] = 3.5
        await node.protocol.update_routing_table(None, "e", responded=False)  # a failed call is no activity
        assert routed[-1] == ("e", False), "hivemind's own routing-table update still runs"
        now[0] = 10.0  # idle >= 8 s: boot (kept), d, e (first seen at 0), a (1.0), b (2.0); 3 closes meet the bound
        assert await trimmer.trim() == 3
        assert p2p.closed == ["d", "e", "a"], "longest idle first, the bootstrap peer kept"
        now[0] = 11.5  # b is idle now too, but the bound (3) is met: nothing more closes
        assert await trimmer.trim() == 3 and trimmer.closed == 3
        assert set(trimmer.last_active) == {"boot", "b", "c"}, "peers that went away are forgotten"

    asyncio.run(scenario())


@pytest.mark.timeout(10)
def test_a_disconnect_the_daemon_refuses_is_skipped_and_active_peers_are_never_closed() -> None:
    async def scenario() -> None:
        trimmer, node, p2p, now, _ = _trimmer(["a", "b", "c", "d", "e"], cap=1)
        p2p.fail.add("a")
        await trimmer.trim()
        now[0] = 9.0
        await node.protocol.update_routing_table(None, "e")  # e is busy: stays however far over the bound
        assert await trimmer.trim() == 2 and p2p.closed == ["b", "c", "d"] and p2p.connected == ["a", "e"]

    asyncio.run(scenario())
