"""The run's live peers as a source of dataset files for the fetcher (peer/core/fetch_peers.py), from its thread.

Why a bridge: the fetcher runs in the trainer's thread (blocking HTTP, hashing), gRPC runs on the event loop. Each
peer's `fetch` submits the FetchShard call (protocol/shard_client.py) to the loop with
`asyncio.run_coroutine_threadsafe` and waits for it in the calling thread, never on the loop itself. The list comes
from the DHT (`Swarm.live_peers`, blocking, fine in that thread): announcements of this run with an endpoint, not
this peer; each is dialled pinned to the TLS fingerprint it announced, like a gossip partner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from peer.core.fetch_peers import FetchStopped, PeerList, ShardPeer
from peer.swarm.membership import Swarm
from protocol.errors import PeerTimeout, PeerUnreachable
from protocol.identity import Identity
from protocol.records import Announcement
from protocol.shard_client import ShardClient

POLL_S = 0.25
"""How often a waiting fetch looks at `halt`."""
SHARD_DEADLINE_S = 300.0
"""The most one file may take from one peer (a 64 MiB shard at ~0.2 MB/s); then the next peer resumes it."""


def shard_peers(swarm: Swarm, identity: Identity, run_id: str, loop: asyncio.AbstractEventLoop,
                halt: threading.Event, deadline_s: float = SHARD_DEADLINE_S) -> PeerList:  # fmt: skip
    """A `PeerList` for a DatasetFetcher: the run's live, reachable peers other than this one, in random order.
    `halt` (SIGTERM) cancels a transfer in progress, so a stopping peer does not wait out its deadline."""

    def peers() -> list[ShardPeer]:
        found = [a for a in swarm.live_peers(run_id) if a.endpoint and a.peer_id != identity.peer_id]
        random.shuffle(found)
        return [ShardPeer(f"{a.peer_id[:16]} at {a.endpoint}", _fetcher(a, identity, run_id, loop, halt, deadline_s))
                for a in found]  # fmt: skip

    return peers


def _fetcher(peer: Announcement, identity: Identity, run_id: str, loop: asyncio.AbstractEventLoop,
             halt: threading.Event, deadline_s: float) -> Callable[[str, Path, int | None], int]:  # fmt: skip
    """`ShardPeer.fetch` for one announced peer: a blocking call that runs the transfer on `loop`."""

    async def transfer(sha256: str, partial: Path, size: int | None) -> int:
        async with ShardClient.connect(peer.endpoint, peer_id=peer.peer_id, tls_fingerprint=peer.tls_fingerprint,
                                       identity=identity, tls_certificate=peer.tls_certificate or None,
                                       deadline=deadline_s) as client:  # fmt: skip
            return await client.fetch_shard(run_id=run_id, sha256=sha256, partial=partial, size=size)

    def fetch(sha256: str, partial: Path, size: int | None) -> int:
        try:
            future = asyncio.run_coroutine_threadsafe(transfer(sha256, partial, size), loop)
        except RuntimeError as exc:  # the loop is closed: the peer is shutting down
            raise PeerUnreachable(f"{peer.peer_id[:16]}: {exc}") from None
        ends = time.monotonic() + deadline_s + 5
        while time.monotonic() < ends and not halt.is_set():
            try:
                return future.result(POLL_S)
            except concurrent.futures.TimeoutError:
                continue
            except concurrent.futures.CancelledError:
                break
        future.cancel()
        if halt.is_set():
            raise FetchStopped(f"stopped while fetching from {peer.peer_id[:16]}")
        raise PeerTimeout(f"{peer.peer_id[:16]}: no file within {deadline_s:.0f} s")

    return fetch
