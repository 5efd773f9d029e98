"""Late join: a peer that arrives while the swarm is training starts from a live peer's outer weights.

Without it a newcomer would mix freshly initialised weights into the swarm through the consensus term
and send pseudo-gradients computed from them (DESIGN.md section 4: "Late joiners stream the current
weights ... verify their hash, and start training from there"). Donors are picked at random among
peers that accept connections and have trained at least one round, so joiners do not all hit one
donor; a failed download moves on to the next donor. The fetched state's signature and content hash
are checked by `PeerClient.fetch_state`; its round becomes the joiner's clock.

Donors serve a snapshot of phi taken every `SNAPSHOT_EVERY` rounds (encoding the full model each
round would cost a 124m peer ~0.5 GB of copying per round for a download that rarely comes).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence

import grpc

from protocol.client import FetchedState, PeerClient
from protocol.errors import MurmurError
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.records import Announcement

log = get_logger(__name__)

SNAPSHOT_EVERY = 5
"""Rounds between two snapshots a donor serves."""
MAX_DONORS = 3
"""Donors tried before starting from the manifest's initial weights."""


def choose_donors(peers: Sequence[Announcement], *, me: str, rng: random.Random) -> list[Announcement]:
    """Up to MAX_DONORS random live peers that accept connections and have trained (round > 0)."""
    candidates = [p for p in peers if p.peer_id != me and not p.client_only and p.round > 0]
    rng.shuffle(candidates)
    return candidates[:MAX_DONORS]


async def fetch_initial_state(
    donors: Sequence[Announcement],
    *,
    identity: Identity,
    run_id: str,
    shapes: Mapping[str, tuple[int, ...]],
    timeout_s: float,
) -> FetchedState | None:
    """The first state a donor delivers intact, or None when nobody does (each failure is logged)."""
    for donor in donors:
        try:
            async with PeerClient.connect(
                donor.endpoint, peer_id=donor.peer_id, tls_fingerprint=donor.tls_fingerprint, identity=identity,
                tls_certificate=donor.tls_certificate or None, deadline=timeout_s,
            ) as client:  # fmt: skip
                return await asyncio.wait_for(
                    client.fetch_state(shapes, run_id=run_id, public_key=donor.public_key), timeout_s
                )
        except (MurmurError, asyncio.TimeoutError, OSError, grpc.RpcError) as exc:
            log.warning("late join: state download from %s at %s failed: %r", donor.peer_id[:16], donor.endpoint, exc)
    return None
