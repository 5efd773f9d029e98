"""Keeping the libp2p connections one DHT node holds bounded as the swarm grows.

Why: p2pd keeps every connection it ever opened, and a murmur peer's DHT traffic reaches many nodes: every refresh
stores and reads the swarm's announcements (one key) through a beam of `bucket_size` nodes, and hivemind's default
of 20 made the beam nearly the whole swarm up to 32 peers, so each peer held a connection to every other
(benchmarks/README.md, swarm_connections). On a home router every connection is a NAT-table entry, and the count
grew with the swarm. p2pd's own connection manager does not help: with `-connLo 2 -connHi 4 -connGrace 2s` ten idle
nodes kept all nine connections each for 45 s (measured; it never trims).

So two bounds of our own:
- `BUCKET_SIZE` nodes per k-bucket, which is also the beam of a lookup: 8, as in BitTorrent's mainline DHT. A
  lookup then contacts about 8 nodes near its key, not 20.
- `ConnectionTrimmer`, in the DHT process: every `TRIM_EVERY_S` it lists p2pd's connections and, while more than
  `MAX_CONNECTIONS` are open, disconnects the ones with no DHT request either way for `IDLE_S` (longest idle
  first). The initial peers (bootstrap nodes) are kept. A trimmed peer is simply re-dialled by the next lookup that
  needs it: one TCP and TLS handshake, against holding its connection forever. `IDLE_S` is above hivemind's RPC
  timeout (3 s), so no request in flight is cut.

The nodes nearest the announcement key are asked by every peer at every refresh, so they are busier than the rest;
the trimmer bounds what they hold to the peers that asked within `IDLE_S`. Why `IDLE_S` is that short: a refresh
touches many nodes at once (lookups, and the pings hivemind sends when a full k-bucket meets a new node), and with an
idle time of 8 s a 32-peer swarm at the default 60 s TTL held 25 connections per peer for most of each refresh
period; with 4 s, 8-10 (benchmarks/README.md, swarm_connections).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from functools import partial

from hivemind.dht import DHT, DHTNode
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from protocol.logs import get_logger

log = get_logger(__name__)

BUCKET_SIZE = 8
"""k: nodes per k-bucket of a murmur DHT node, and the beam of its lookups (hivemind's default is 20)."""
MAX_CONNECTIONS = 12
"""Open libp2p connections above which idle ones are closed."""
IDLE_S = 4.0
"""A connection with no DHT request either way for this long may be closed."""
TRIM_EVERY_S = 2.0
"""How often the trimmer looks."""


class ConnectionTrimmer:
    """Runs in the DHT process, on its event loop: records when each peer last exchanged a DHT request with us, and
    closes the longest-idle connections while more than `max_connections` are open."""

    def __init__(self, node: DHTNode, keep: Sequence[PeerID], max_connections: int, idle_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.node, self.keep = node, frozenset(keep)
        self.max_connections, self.idle_s, self.clock = max_connections, idle_s, clock
        self.last_active: dict[PeerID, float] = {}
        self.closed = 0
        protocol = node.protocol
        update = protocol.update_routing_table  # every request we answer or get an answer to goes through it

        async def noting_activity(node_id: object, peer_id: PeerID, responded: bool = True) -> None:
            if responded:
                self.last_active[peer_id] = self.clock()
            await update(node_id, peer_id, responded=responded)

        protocol.update_routing_table = noting_activity

    async def trim(self) -> int:
        """Close idle connections beyond the bound; returns how many are open after."""
        now = self.clock()
        connected = [info.peer_id for info in await self.node.p2p.list_peers()]
        for peer in connected:  # a connection we saw no request on counts as active from when we first saw it
            self.last_active.setdefault(peer, now)
        idle = sorted((p for p in connected if p not in self.keep and now - self.last_active[p] >= self.idle_s),
                      key=self.last_active.__getitem__)  # fmt: skip
        closed = 0
        for peer in idle[: max(0, len(connected) - self.max_connections)]:
            try:
                await self.node.p2p._client.disconnect(peer)  # hivemind's P2P has no public disconnect
                closed += 1
            except Exception as exc:  # a daemon hiccup costs one round of trimming, never the node
                log.debug("could not close the connection to %s: %r", peer, exc)
        self.closed += closed
        alive = set(connected)
        for peer in [p for p in self.last_active if p not in alive]:
            del self.last_active[peer]  # forget peers that went away, so the table stays the size of the swarm
        return len(connected) - closed

    async def run_forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.trim()
            except Exception as exc:  # p2pd stopping: the node's shutdown ends this task with the loop
                log.debug("connection trimming skipped: %r", exc)


_TASKS: set[asyncio.Task] = set()
"""The DHT process's trimmer task, held so it is not garbage-collected while it runs."""


async def _start_trimmer(_dht: DHT, node: DHTNode, keep: Sequence[str], max_connections: int, idle_s: float,
                         every_s: float) -> None:  # fmt: skip
    trimmer = ConnectionTrimmer(node, [PeerID.from_base58(p) for p in keep], max_connections, idle_s)
    task = asyncio.get_running_loop().create_task(trimmer.run_forever(every_s))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


def bound_connections(dht: DHT, initial_peers: Sequence[str], *, max_connections: int = MAX_CONNECTIONS,
                      idle_s: float = IDLE_S, every_s: float = TRIM_EVERY_S) -> None:  # fmt: skip
    """Start trimming `dht`'s connections (in its process) to `max_connections`, never closing `initial_peers`."""
    keep = []
    for text in initial_peers:
        try:
            keep.append(Multiaddr(text)["p2p"])
        except Exception:  # an address without /p2p/ names no peer to keep
            continue
    dht.run_coroutine(partial(_start_trimmer, keep=keep, max_connections=max_connections, idle_s=idle_s,
                              every_s=every_s))  # fmt: skip
