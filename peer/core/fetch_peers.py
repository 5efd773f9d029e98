"""The second source of a dataset's files: other peers of the run (FetchShard, protocol/shard_service.py).

Why: the run owner's HTTP server is one machine, and volunteers outlive it. Every peer holds, verified, the
files its stream reached and serves them to the others by SHA-256; a fetcher (peer/core/fetch.py) asks them when
the server fails, and trusts none of them: whatever a peer sends is hashed and refused unless it is exactly the
file the index names, and then the next peer is asked.

This module knows peers only as `ShardPeer`s (a name for the log and a blocking `fetch`), handed over by
whoever knows the swarm (peer/node/datapeers.py bridges to the event loop), so it needs no network code.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peer.core.data import Batch
from peer.core.shard_plan import fallback_streams
from peer.core.shards import ShardStream, sha256_file
from protocol.errors import DataError, MurmurError
from protocol.logs import get_logger

log = get_logger(__name__)

MAX_PEERS_PER_TRY = 8
"""Peers asked for one file in one pass; the next pass (the fetcher's next try) draws others."""
MAX_SHIFT = 64
"""How many rounds ahead `stream_for_round` looks for windows the cache holds, when no stream of this round's can
be had: enough for every stream to pass through several epochs (a stream's epoch is a couple of rounds at least)."""


@dataclass(frozen=True, slots=True)
class ShardPeer:
    """A peer that may hold dataset files. `fetch(sha256, partial, size)` appends the rest of that file to
    `partial` (resuming from its size), blocking; it raises a MurmurError when the peer cannot serve it."""

    name: str
    fetch: Callable[[str, Path, int | None], object]


class FetchStopped(MurmurError):
    """The peer was told to stop (SIGTERM) while it waited to fetch again, or while a peer sent it a file."""


PeerList = Callable[[], Sequence[ShardPeer]]
"""Live peers of the run that serve files, in random order; called from the fetcher's (blocking) thread."""


class Fetcher(Protocol):
    """What `stream_for_round` needs of peer/core/fetch.py's DatasetFetcher (which imports this module)."""

    peers: PeerList | None

    def ensure(self, names: Iterable[str], stop: threading.Event | None = None, *, patient: bool = True) -> None: ...

    def holds(self, names: Iterable[str]) -> bool: ...


class ShiftedStream(ShardStream):
    """Another round's batches of a stream: round r reads what round r + `shift` of `stream` reads. What a peer
    trains on when no stream's shards for this very round can be had, but its cache holds another round's."""

    def __init__(self, stream: ShardStream, shift: int) -> None:
        super().__init__(stream.dataset, stream.plan)
        self.shift = shift

    def batch(self, round: int, step: int, batch_size: int) -> Batch:
        return super().batch(round + self.shift, step, batch_size)

    def shards_for_round(self, round: int, batch_size: int) -> list[str]:
        return super().shards_for_round(round + self.shift, batch_size)


def from_peers(peers: PeerList, name: str, sha256: str, size: int | None, partial: Path) -> str | None:
    """Have `partial` hold the file `name` with this SHA-256 from one of `peers`, verified: the peer's name, or
    None when none had it. A peer whose bytes do not hash right is refused (its bytes dropped) and the next one
    asked; a transfer cut short is resumed by the next peer (the file is the same wherever it comes from)."""
    try:
        candidates = list(peers())
    except (MurmurError, OSError, RuntimeError) as exc:  # the DHT read failed: no peers this time
        log.warning("dataset: cannot list peers to fetch %s from: %s", name, exc)
        return None
    random.shuffle(candidates)
    for peer in candidates[:MAX_PEERS_PER_TRY]:
        if size is None:  # index.json, tokenizer.json: small, and a stale partial's length cannot be checked
            partial.unlink(missing_ok=True)
        try:
            peer.fetch(sha256, partial, size)
        except FetchStopped:
            raise
        except MurmurError as exc:
            log.info("dataset: %s not from peer %s: %s", name, peer.name, exc)
            continue
        if partial.is_file() and sha256_file(partial) == sha256:
            return peer.name
        log.warning("dataset: %s from peer %s does not match its SHA-256: refused, asking the next peer", name,
                    peer.name)  # fmt: skip
        partial.unlink(missing_ok=True)
    return None


def stream_for_round(fetcher: Fetcher, own: ShardStream, round: int, batch_size: int,
                     stop: threading.Event | None = None) -> ShardStream:  # fmt: skip
    """The stream round `round` trains on, its shards on disk: `own` when they can be had, else the first stream
    in shard_plan's `fallback_streams` order whose shards can, each tried once without waiting (peer/core/fetch.py
    module docstring), else the first (shift, stream), shift = 1 .. MAX_SHIFT rounds ahead, whose shards this
    peer's cache holds (no network). DataError when none can; without peers to ask, `own`'s error as it was."""
    try:
        fetcher.ensure(own.shards_for_round(round, batch_size), stop)
        return own
    except DataError as exc:  # FetchStopped is no DataError: a stop goes straight up
        if fetcher.peers is None:
            raise
        missing = exc
    plan = own.plan
    others = [own.dataset.stream(plan.seq_len, stream_index=index, num_streams=plan.num_streams,
                                 steps_per_round=plan.steps_per_round, seed=plan.seed)
              for index in fallback_streams(plan.stream_index, plan.num_streams, round)]  # fmt: skip
    for other in others:
        try:
            fetcher.ensure(other.shards_for_round(round, batch_size), stop, patient=False)
        except DataError:
            continue
        log.warning("dataset: round %d trains on stream %d instead of this peer's %d, whose shards nobody has "
                    "(%s)", round, other.plan.stream_index, plan.stream_index, missing)  # fmt: skip
        return other
    for shift in range(1, MAX_SHIFT + 1):  # nobody has any stream's shards of this round: the cache's, then
        for stream in (own, *others):
            names = (shifted := ShiftedStream(stream, shift)).shards_for_round(round, batch_size)
            if fetcher.holds(names):
                try:
                    fetcher.ensure(names, stop, patient=False)  # hashes a file an earlier run left
                except DataError:
                    continue
                log.warning("dataset: round %d trains on stream %d's round %d, from this peer's cache: no stream's "
                            "shards of this round can be had (%s)", round, stream.plan.stream_index, round + shift,
                            missing)  # fmt: skip
                return shifted
    raise DataError(f"round {round}: neither this peer's stream nor any other can be had ({missing})")
