"""Reachability from outside: this peer's own endpoint as a bootstrap node sees it, and probes of other peers.

`observe_host` asks a bootstrap node which IP this peer's connection comes from (what a peer announces when it
was not told), and `check_reachability` has one dial the endpoint announced; `murmur run` goes client-only when
that fails. The probes behind admission (peer/swarm/admission.py) are an Info call at each announced endpoint,
in the background.

`Admission` is bookkeeping (who answered, who waits out a failure); this module makes the calls. A probe dials
the endpoint over TLS pinned to the certificate the signed announcement names, asks Info, and admits the peer
if it answers as itself, for this run. Probes run as tasks on the event loop, at most PROBES_AT_ONCE in flight,
each within PROBE_TIMEOUT_S; whatever happens to one (a refused port, a timeout, a bug of ours with one
stranger's bytes, a cancellation at shutdown), its outcome is recorded and its slot given back.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from peer.swarm.admission import PROBE_TIMEOUT_S, PROBES_AT_ONCE, Admission
from protocol import PROTOCOL_MAJOR
from protocol._generated import murmur_pb2 as pb
from protocol.client import PeerClient
from protocol.errors import MurmurError
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.records import ANNOUNCEMENT_TAG, OBSERVED_ADDRESS_HANDLER, REACHABILITY_HANDLER, Announcement

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Reachability:
    """The outside view of this peer's endpoint: whether `via` (a bootstrap node) reached it, and why not."""

    reachable: bool | None
    """None when no bootstrap node answered, so nothing is known."""
    via: str
    detail: str

    def advice(self, endpoint: str) -> str:
        """One line for the volunteer: what happened and exactly what to do about it."""
        if self.reachable:
            return f"reachability: OK, {self.via} reached {endpoint} from outside"
        port = endpoint.rpartition(":")[2]
        if self.reachable is None:
            return (
                f"reachability: could not test {endpoint} ({self.detail}); if peers never reach you, use --client-only"
            )
        return (
            f"reachability: {self.via} could NOT reach {endpoint} ({self.detail}). Open TCP port {port} to this "
            f"machine (router port forward and firewall), pass --announce PUBLIC_IP:{port} if your public address "
            "differs, or run with --client-only (you then dial all exchanges yourself)"
        )


async def _ask_bootstrap_nodes(dht: DHT, initial_peers: Sequence[str], handler: str, request: Message,
                               reply_type: type[Message], errors: list[str], timeout_s: float,
                               ) -> AsyncIterator[tuple[str, Message]]:  # fmt: skip
    """(node, reply) from each of `initial_peers` in random order that answers `request` on libp2p `handler`;
    a node that does not answer adds its error to `errors`. The caller stops at the first reply it can use."""
    p2p = await dht.replicate_p2p()
    for maddr in random.sample(list(initial_peers), len(initial_peers)):
        try:
            node = PeerID.from_base58(Multiaddr(maddr)["p2p"])
            reply = await asyncio.wait_for(p2p.call_protobuf_handler(node, handler, request, reply_type), timeout_s)
        except Exception as exc:  # hivemind raises P2PHandlerError, P2PDaemonError, timeouts...: try the next node
            errors.append(f"{maddr}: {exc!r}")
            continue
        yield maddr, reply


async def check_reachability(
    dht: DHT, initial_peers: Sequence[str], announcement: bytes, timeout_s: float = 15.0
) -> Reachability:
    """Ask a bootstrap node (from `initial_peers`, in random order) to dial our signed, announced endpoint.

    This is a third-party dial: the node opens a TLS connection to the endpoint, pins the fingerprint
    and calls Info, then says whether this peer answered. It proves the endpoint is reachable from
    that node's network position (on the open internet: from outside this peer's NAT).
    """
    request = pb.SignedAnnouncement.FromString(announcement[len(ANNOUNCEMENT_TAG) :])
    errors: list[str] = []
    async for maddr, reply in _ask_bootstrap_nodes(dht, initial_peers, REACHABILITY_HANDLER, request, pb.InfoReply,
                                                   errors, timeout_s):  # fmt: skip
        return Reachability(reply.health == "ok", via=maddr, detail=reply.health)
    return Reachability(None, via="", detail="; ".join(errors) or "no --initial-peers to ask")


async def observe_host(dht: DHT, initial_peers: Sequence[str], timeout_s: float = 15.0) -> tuple[str, str]:
    """The IP a bootstrap node (from `initial_peers`, in random order) sees this peer's connection come from, and
    the node that said so; ('', why not) when none could tell (unreachable nodes, an older node, a relay)."""
    request = pb.InfoRequest(protocol_major=PROTOCOL_MAJOR)
    errors: list[str] = []
    async for maddr, reply in _ask_bootstrap_nodes(dht, initial_peers, OBSERVED_ADDRESS_HANDLER, request,
                                                   pb.ObservedAddress, errors, timeout_s):  # fmt: skip
        if reply.host:
            return reply.host, maddr
        errors.append(f"{maddr}: it sees no IP for this connection")
    return "", "; ".join(errors) or "no --initial-peers to ask"


class Prober:
    """Probes announced peers for an `Admission`. Event-loop only; `close()` cancels what is in flight."""

    def __init__(self, admission: Admission, identity: Identity, run_id: str,
                 announced: Callable[[], Sequence[Announcement]], rng: random.Random) -> None:  # fmt: skip
        self.admission, self.identity, self.run_id = admission, identity, run_id
        self.announced = announced
        """The peers announced right now (the daemon's peer list, refreshed from the DHT)."""
        self.rng = rng
        self.tasks: set[asyncio.Task] = set()

    def start(self) -> list[asyncio.Task]:
        """Start probes of announced, unadmitted peers (at most PROBES_AT_ONCE in flight); the started tasks."""
        room = PROBES_AT_ONCE - self.admission.probing()
        chosen = self.admission.to_probe(self.announced(), me=self.identity.peer_id, limit=room, rng=self.rng)
        started = [asyncio.get_running_loop().create_task(self._probe(peer)) for peer in chosen]
        for task in started:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return started

    async def admit_now(self, timeout_s: float = 2 * PROBE_TIMEOUT_S) -> None:
        """Probe announced peers until none is left unprobed or `timeout_s` passed: before the first round, so
        that slice, donors and partners are chosen among peers that answered."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (started := self.start()) or self.tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(started or set(self.tasks), timeout=left, return_when=asyncio.FIRST_COMPLETED)

    async def _probe(self, peer: Announcement) -> None:
        ok = False
        try:
            async with PeerClient.connect(
                peer.endpoint, peer_id=peer.peer_id, tls_fingerprint=peer.tls_fingerprint, identity=self.identity,
                tls_certificate=peer.tls_certificate or None, deadline=PROBE_TIMEOUT_S,
            ) as client:  # fmt: skip
                info = await asyncio.wait_for(client.info(), PROBE_TIMEOUT_S)
            ok = info.peer_id == peer.peer_id and info.run_id == self.run_id
        except (MurmurError, asyncio.TimeoutError) as exc:  # the client's errors, and our own wait_for's
            log.debug("probe of %s at %s failed: %r", peer.peer_id[:16], peer.endpoint, exc)
        except Exception:  # a bug of ours with one stranger's announcement must not stop admission
            log.exception("probe of %s at %s failed unexpectedly", peer.peer_id[:16], peer.endpoint)
        finally:  # also when cancelled: a probe slot is never lost
            self.admission.probed(peer.peer_id, ok)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
