"""Swarm membership over the hivemind DHT: the manifest, announcements, live peers, partners and slices.

A volunteer types a swarm name; `protocol/records.py` maps it to two DHT keys. This module does the
rest of joining: publish (owner) or fetch and verify (everyone else) the signed manifest, announce this
peer with a TTL and refresh it, list live peers, pick this peer's slice (the least covered; ties at
random; re-balanced when coverage is badly skewed) and its gossip partners (random, preferring slices
this peer lacks, never banned, unreachable or client-only ones), and re-bootstrap when it sees too few
peers.

`Swarm` calls hivemind's blocking API (the DHT lives in its own process); async callers wrap calls in
`asyncio.to_thread`. The choice functions are pure, take an `rng`, and are tested without a network.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from protocol import PROTOCOL_VERSION
from protocol.dht import refresh_routing
from protocol.errors import InvalidRecord, JoinInterrupted, ManifestError, UntrustedOwner
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.manifest import PinStore, SignedRunManifest, accept_owner, parse_signed
from protocol.manifest import trusted_key_for as _trusted_key_for
from protocol.records import (
    Announcement,
    encode_manifest_record,
    manifest_record_signer,
    sign_announcement,
    swarm_keys,
    verify_announcement,
)

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmConfig:
    """How this peer finds and stays in its swarm."""

    swarm: str
    initial_peers: tuple[str, ...] = ()
    announce_ttl_s: float = 60.0
    """Announcements expire this long after each refresh; a dead peer leaves the list within it."""
    manifest_ttl_s: float = 3600.0
    min_peers: int = 1
    """Seeing fewer other peers than this triggers a re-bootstrap (at most every `rebootstrap_every_s`)."""
    rebootstrap_every_s: float = 30.0
    rebalance_gap: int = 2
    """Coverage is "badly skewed" when the most and least covered slices differ by this many peers."""

    @property
    def refresh_every_s(self) -> float:
        """Refresh three times per TTL, so one lost store does not drop the peer from the list."""
        return self.announce_ttl_s / 3


MANIFEST_REPUBLISHERS = 3
"""How many peers re-publish the manifest per refresh period, on average (`Member.republishes`)."""


def slice_counts(peers: Iterable[Announcement], num_slices: int) -> list[int]:
    """Peers per slice (announcements of slices >= num_slices are ignored)."""
    counts = [0] * num_slices
    for peer in peers:
        if peer.slice < num_slices:
            counts[peer.slice] += 1
    return counts


def choose_slice(peers: Iterable[Announcement], num_slices: int, rng: random.Random) -> int:
    """The least covered slice among `peers` (ties at random)."""
    counts = slice_counts(peers, num_slices)
    least = min(counts)
    return rng.choice([s for s, c in enumerate(counts) if c == least])


def rebalance(
    peers: Sequence[Announcement], me: str, own_slice: int, num_slices: int, rng: random.Random, gap: int = 2
) -> int | None:
    """The slice to move to when coverage is badly skewed and this peer should move; None to stay.

    `peers` includes this peer's own announcement (id `me`) or not; it is counted on `own_slice` either way.
    Only one peer moves per skew: the one with the lowest id among the peers of the most covered slice,
    so peers that see the same list do not all jump at once and flap.
    """
    others = [p for p in peers if p.peer_id != me]
    counts = slice_counts(others, num_slices)
    counts[own_slice] += 1
    if counts[own_slice] != max(counts) or max(counts) - min(counts) < gap:
        return None
    crowd = [p.peer_id for p in others if p.slice == own_slice] + [me]
    if min(crowd) != me:
        return None
    least = min(counts)
    return rng.choice([s for s, c in enumerate(counts) if c == least])


def choose_partners(
    peers: Sequence[Announcement],
    *,
    me: str,
    own_slice: int,
    fanout: int,
    rng: random.Random,
    avoid: Iterable[str] = (),
) -> list[Announcement]:
    """Up to `fanout` random partners to dial this round.

    Never this peer, an avoided (banned or recently unreachable) peer, or a client-only peer (those dial
    us). Preference order: one peer from each slice this peer lacks, then more from other slices, then
    peers of this peer's own slice.
    """
    avoided = set(avoid)
    candidates = [p for p in peers if p.peer_id != me and p.peer_id not in avoided and not p.client_only]
    rng.shuffle(candidates)
    other = [p for p in candidates if p.slice != own_slice]
    same = [p for p in candidates if p.slice == own_slice]
    first, seen = [], set()
    for peer in other:
        if peer.slice not in seen:
            seen.add(peer.slice)
            first.append(peer)
    rest = [p for p in other if p not in first]
    return (first + rest + same)[:fanout]


class Swarm:
    """One swarm's records in a started DHT: the manifest and the announcements. Blocking calls."""

    def __init__(self, dht: DHT, config: SwarmConfig) -> None:
        self.dht = dht
        self.config = config
        self.keys = swarm_keys(config.swarm)
        self._last_rebootstrap = 0.0

    def publish_manifest(self, signed: SignedRunManifest) -> bool:
        """Store the manifest under its owner's subkey. Any peer may re-publish an authentic manifest."""
        return bool(
            self.dht.store(
                self.keys.manifest,
                encode_manifest_record(signed.to_bytes()),
                expiration_time=get_dht_time() + self.config.manifest_ttl_s,
                subkey=signed.owner_key_hex,
            )
        )

    def manifests(self) -> tuple[dict[bytes, SignedRunManifest], list[str]]:
        """Verified manifests by owner key, and a line per refused record (forged, other swarm, ...)."""
        found = self.dht.get(self.keys.manifest, latest=True)
        verified: dict[bytes, SignedRunManifest] = {}
        refused: list[str] = []
        if found is None or not isinstance(found.value, dict):
            return verified, refused
        for subkey, item in found.value.items():
            try:
                body, owner = manifest_record_signer(item.value)
                verified[owner] = parse_signed(body, swarm=self.config.swarm)
            except (InvalidRecord, ManifestError) as exc:
                refused.append(f"record under {str(subkey)[:16]}…: {exc}")
        return verified, refused

    def fetch_manifest(
        self, *, run_key: bytes | None, pins: PinStore, timeout_s: float = 30.0, halt: threading.Event | None = None
    ) -> SignedRunManifest:
        """The swarm's manifest, verified against the run key (or the pin; pinned on first use).

        Waits up to `timeout_s` for one to appear (JoinInterrupted as soon as `halt` is set). Raises
        UntrustedOwner when only other owners' manifests exist (the message says how to override) and
        ManifestError when none checks.
        """
        swarm = self.config.swarm
        deadline = time.monotonic() + timeout_s
        while True:
            verified, refused = self.manifests()
            trusted = _trusted_key_for(swarm, run_key, pins)
            if trusted is not None and trusted in verified:
                accept_owner(swarm, verified[trusted], run_key, pins)
                return verified[trusted]
            if trusted is None and len(verified) == 1:
                signed = next(iter(verified.values()))
                accept_owner(swarm, signed, None, pins)
                return signed
            if trusted is None and len(verified) > 1:
                owners = ", ".join(sorted(k.hex() for k in verified))
                raise UntrustedOwner(
                    f"swarm {swarm!r} has manifests by several owners ({owners}); pick one with --run-key"
                )
            if verified:  # only other owners' manifests: waiting will not change whom we trust
                if run_key is None and len(verified) == 1:
                    accept_owner(swarm, next(iter(verified.values())), None, pins)  # raises, naming --run-key
                owners = ", ".join(sorted(k.hex() for k in verified))
                raise UntrustedOwner(
                    f"swarm {swarm!r}: no manifest signed by the run key you trust (found owners: {owners}); "
                    "if the run changed hands, rerun with --run-key OWNER_KEY"
                )
            if time.monotonic() >= deadline:
                why = ("; refused: " + "; ".join(refused)) if refused else ""
                raise ManifestError(f"no valid manifest for swarm {swarm!r} in the DHT after {timeout_s:.0f}s{why}")
            if (halt or threading.Event()).wait(1.0):
                raise JoinInterrupted(f"stopped while waiting for the manifest of swarm {swarm!r}")

    def live_peers(self, run_id: str | None = None) -> list[Announcement]:
        """Verified, unexpired announcements (of `run_id` when given); forged records are dropped and logged."""
        found = self.dht.get(self.keys.peers, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        now = get_dht_time()
        peers = []
        for subkey, item in found.value.items():
            try:
                ann = verify_announcement(item.value, subkey=subkey, now=now)
            except InvalidRecord as exc:
                log.debug("dropped a peer record under %.16s: %s", subkey, exc)
                continue
            if run_id is None or ann.run_id == run_id:
                peers.append(ann)
        return sorted(peers, key=lambda p: p.peer_id)

    def announce(self, value: bytes, peer_id: str, expires_unix: float) -> bool:
        """Store this peer's signed announcement under its own subkey until `expires_unix`."""
        return bool(self.dht.store(self.keys.peers, value, expiration_time=expires_unix, subkey=peer_id))

    def maybe_rebootstrap(self, seen: int) -> None:
        """Re-dial the initial peers when fewer than `min_peers` others are visible (rate-limited)."""
        if seen >= self.config.min_peers or not self.config.initial_peers:
            return
        if time.monotonic() - self._last_rebootstrap < self.config.rebootstrap_every_s:
            return
        self._last_rebootstrap = time.monotonic()
        size = refresh_routing(self.dht, self.config.initial_peers)
        log.info("saw %d other peer(s): re-bootstrapped, routing table has %d node(s)", seen, size)


class Member:
    """This peer's presence in the swarm: its slice and announcement, refreshed by `refresh()`."""

    def __init__(
        self, swarm: Swarm, identity: Identity, manifest: SignedRunManifest, *, endpoint: str, software_version: str
    ) -> None:
        self.swarm = swarm
        self.identity = identity
        self.manifest = manifest
        self.num_slices = manifest.manifest.slices.num_slices
        self.endpoint = endpoint
        self.software_version = software_version
        self.rng = random.Random()
        self.slice = 0
        self.round = 0
        self.tokens_per_second = 0.0
        self.loss = math.nan
        self.bytes_sent = self.bytes_received = 0
        self.peers: list[Announcement] = []
        self.counted: Callable[[list[Announcement]], list[Announcement]] = lambda peers: peers
        """Which announcements count for slice coverage: the daemon counts only peers that answered at their
        endpoint or exchanged with it (peer/swarm/admission.py), so fake announcements cannot skew the slices."""

    def others(self) -> list[Announcement]:
        return [p for p in self.peers if p.peer_id != self.identity.peer_id]

    def join(self) -> None:
        """Pick the least covered slice among live peers and announce."""
        self.peers = self.swarm.live_peers(self.manifest.run_id)
        self.slice = choose_slice(self.counted(self.others()), self.num_slices, self.rng)
        self.announce()

    def refresh(self) -> None:
        """Re-announce, list peers, re-bootstrap if too few, re-balance if skewed (announcing the new slice),
        maybe re-publish the manifest (`republishes`). The announcement goes first: listing a big swarm is the slow
        part, and this peer's own record must not expire while it reads everyone else's."""
        self.announce()
        self.peers = self.swarm.live_peers(self.manifest.run_id)
        self.swarm.maybe_rebootstrap(len(self.others()))
        target = rebalance(self.counted(self.peers), self.identity.peer_id, self.slice, self.num_slices, self.rng,
                           self.swarm.config.rebalance_gap)  # fmt: skip
        if target is not None:
            log.info("slice coverage %s is skewed: moving from slice %d to %d",
                     slice_counts(self.others(), self.num_slices), self.slice, target)  # fmt: skip
            self.slice = target
            self.announce()
        if self.republishes():
            self.swarm.publish_manifest(self.manifest)

    def republishes(self) -> bool:
        """Whether this refresh re-publishes the manifest: with probability MANIFEST_REPUBLISHERS / peers listed, so
        the swarm stores it about that many times per refresh period whatever its size. Every peer storing it at
        every refresh made the few DHT nodes nearest the manifest's key take one store per peer per refresh (a
        hotspot that grows with the swarm); a small swarm still stores it at every refresh, as before."""
        return self.rng.random() < MANIFEST_REPUBLISHERS / max(1, len(self.peers))

    def announcement(self, expires_unix: float) -> bytes:
        return sign_announcement(
            self.identity,
            run_id=self.manifest.run_id,
            endpoint=self.endpoint,
            slice_index=self.slice,
            round=self.round,
            tokens_per_second=self.tokens_per_second,
            loss=self.loss,
            software_version=self.software_version,
            protocol_version=PROTOCOL_VERSION,
            expires_unix=expires_unix,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
        )

    def announce(self) -> None:
        expires = get_dht_time() + self.swarm.config.announce_ttl_s
        if not self.swarm.announce(self.announcement(expires), self.identity.peer_id, expires):
            log.warning("announcement was not stored by any DHT node; retrying at the next refresh")

    def lookup(self, peer_id: str) -> bytes | None:
        """The public key of a live peer (for the wire's `WirePolicy.lookup`)."""
        return next((p.public_key for p in self.peers if p.peer_id == peer_id), None)
