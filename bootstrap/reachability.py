"""The outside view of a peer's endpoint: a bootstrap node dials what a peer announces, on request.

A peer behind NAT cannot tell from inside whether its port is open, so it asks a bootstrap node over
libp2p (`REACHABILITY_HANDLER`), sending its signed announcement. The node checks the signature, dials
the announced endpoint with murmur's own client (TLS pinned to the announced fingerprint) and calls
Info; the reply is that Info, with `health` "ok" when the endpoint answered as the announcing peer, or
"unreachable: <why>" otherwise. Only signed announcements are dialled, and only their own endpoint, so a
bootstrap node cannot be used to probe arbitrary hosts on behalf of strangers beyond one Info call.

Before that, a peer that was not told its public address asks (`OBSERVED_ADDRESS_HANDLER`) which IP its libp2p
connection comes from, as a STUN server would tell it, and announces that IP with its own port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.utils.multiaddr import Multiaddr

from protocol._generated import murmur_pb2 as pb
from protocol.client import PeerClient
from protocol.errors import InvalidRecord, MurmurError
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.records import ANNOUNCEMENT_TAG, OBSERVED_ADDRESS_HANDLER, REACHABILITY_HANDLER, verify_announcement

log = get_logger(__name__)

DIAL_TIMEOUT_S = 5.0


async def dial_announced(
    request: pb.SignedAnnouncement, identity: Identity, timeout_s: float = DIAL_TIMEOUT_S
) -> pb.InfoReply:
    """Dial the endpoint a signed announcement names and report what answered (never raises)."""
    try:
        ann = verify_announcement(ANNOUNCEMENT_TAG + request.SerializeToString(deterministic=True))
    except InvalidRecord as exc:
        return pb.InfoReply(health=f"refused: {exc}")
    if ann.client_only:
        return pb.InfoReply(peer_id=ann.peer_id, health="unreachable: the announcement is client-only")
    try:
        async with PeerClient.connect(
            ann.endpoint,
            peer_id=ann.peer_id,
            tls_fingerprint=ann.tls_fingerprint,
            identity=identity,
            deadline=timeout_s,
        ) as client:
            info = await asyncio.wait_for(client.info(), timeout_s)
    except (MurmurError, asyncio.TimeoutError) as exc:  # the client's errors, and our own wait_for's
        log.info("reachability: %s at %s is unreachable (%s)", ann.peer_id[:16], ann.endpoint, exc)
        return pb.InfoReply(peer_id=ann.peer_id, health=f"unreachable: {exc}")
    health = "ok" if info.peer_id == ann.peer_id else f"unreachable: {ann.endpoint} answered as {info.peer_id[:16]}"
    log.info("reachability: %s at %s -> %s", ann.peer_id[:16], ann.endpoint, health)
    return pb.InfoReply(
        protocol_version=info.protocol_version,
        software_version=info.software_version,
        run_id=info.run_id,
        round=info.round,
        slice=info.slice,
        health=health,
        peer_id=info.peer_id,
    )


def ip_of(maddr: Multiaddr) -> str:
    """The IP of a connection's multiaddr ('' for one without, such as a relayed circuit)."""
    for protocol in ("ip4", "ip6"):
        try:
            return str(maddr.value_for_protocol(protocol))
        except Exception:  # multiaddr raises ProtocolLookupError and friends for an absent protocol
            continue
    return ""


async def observed_host(p2p: P2P, context: P2PContext) -> pb.ObservedAddress:
    """The IP that the caller's connection to this node comes from (never raises: '' when unknown)."""
    try:
        peers = await p2p.list_peers()
    except Exception as exc:  # the daemon's errors: the caller then goes client-only, it does not fail
        log.info("observed address: cannot list connections (%r)", exc)
        return pb.ObservedAddress()
    for info in peers:
        if info.peer_id == context.remote_id:
            hosts = [host for host in map(ip_of, info.addrs) if host]
            return pb.ObservedAddress(host=hosts[0] if hosts else "")
    return pb.ObservedAddress()


async def serve_reachability(p2p: P2P, identity: Identity, on_request: Callable[[str], None] = lambda _: None) -> None:
    """Register the reachability and observed-address handlers on `p2p` (a replica of the DHT's P2P);
    each request calls `on_request` with its handler's name (the node's metrics count them)."""

    async def handler(request: pb.SignedAnnouncement, context: P2PContext) -> pb.InfoReply:
        on_request("reachability")
        return await dial_announced(request, identity)

    async def observed(request: pb.InfoRequest, context: P2PContext) -> pb.ObservedAddress:
        on_request("observed_address")
        return await observed_host(p2p, context)

    await p2p.add_protobuf_handler(REACHABILITY_HANDLER, handler, pb.SignedAnnouncement)
    await p2p.add_protobuf_handler(OBSERVED_ADDRESS_HANDLER, observed, pb.InfoRequest)
