"""The PeerService server: receives signed updates, hands valid ones on, refuses the rest precisely.

Built from plain inputs (no training knowledge): an identity, a `WirePolicy` (run id, shape table,
codec, key lookup), an async `on_update` callback, and optional providers for the pull half of an
exchange (`reply_for`), for late joiners (`state_provider`) and for Info (`status`).

Order of checks in Exchange (cheap and unauthenticated first, nothing large read before the cap):
calls per minute of the caller's address -> parse -> protocol version -> sender banned? -> run id ->
sender known -> signature (addressed to us) -> [authenticated from here] the round (not from the future:
`WirePolicy.admit_round`) -> tensor table vs the slice's shapes, exact payload lengths -> the sender's
exchanges and bytes per minute -> room in the in-flight budget -> replay -> [our reply, signed for the caller,
streams from here] chunks (each 1..1 MiB, never beyond the announced total; hashed and decoded as they land in a
worker thread: shape, dtype, finiteness) -> signed digest -> `on_update` -> our reply's tail (protocol/duplex.py).
Info and FetchState are limited by address too. The limits and what each refusal means are in
protocol/limits.py.

Replays: the round is claimed when the header is accepted, and given back if the transfer dies
(timeout, caller gone, stream ended short) before delivery, so an honest retry of the same round is
not a replay.

Bans: only failures after the signature checked are bans, because before it the claimed peer id
proves nothing (banning it would let anyone get an honest peer banned). Replays, timeouts and a
busy server (RATE_LIMITED) are refused but not banned (an honest peer's retry looks like a replay);
going over a per-peer limit (OVER_LIMIT) is banned for `Limits.over_limit_ban_s`. Every refusal is counted in
`rejections` by reason and logged with the peer id and address.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import grpc

from protocol import PROTOCOL_VERSION, software_version
from protocol._generated import murmur_pb2 as pb
from protocol.bans import BanList, ReplayGuard
from protocol.duplex import TAIL_BYTES, ReplyWriter, chunk_frames, read_header, receive_push
from protocol.errors import (
    BannedPeer,
    IncompatibleVersion,
    ProtocolViolation,
    RateLimited,
    Reason,
    RejectedUpdate,
    SetupError,
)
from protocol.identity import Identity
from protocol.limits import DEFAULT_MIN_ROUND_S, Limiter, Limits, address_of, largest_stream_bytes
from protocol.logs import get_logger
from protocol.ports import check_listenable
from protocol.shard_service import ShardLookup, ShardService
from protocol.state import WriteStalled, state_header, stream_state
from protocol.updates import (
    OutgoingUpdate,
    PlannedTensor,
    ReceivedUpdate,
    StateSnapshot,
    WirePolicy,
    authenticate_header,
    plan_payload,
    seal_update,
)
from protocol.wire import (
    ACCEPT_KEY,
    CHANNEL_OPTIONS,
    REASON_KEY,
    SERVICE_NAME,
    STATUS_FOR_REASON,
    check_version,
    parse_message,
    reason_of,
)

log = get_logger(__name__)

_REFUSALS = (ProtocolViolation, IncompatibleVersion, BannedPeer)
_NOT_BANNED = (Reason.REPLAY, Reason.TIMEOUT, Reason.RATE_LIMITED, Reason.FUTURE_ROUND)
"""Refusals an honest peer can meet (a retry, a slow link, a busy server, a clock briefly ahead of ours):
counted, never banned here (repeated future rounds are banned by the policy's `admit_round`, which keeps count)."""


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What Info reports besides versions: where this peer is."""

    round: int = 0
    slice: int = 0
    health: str = "ok"


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Limits of one server; defaults suit a volunteer peer on a home line."""

    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port; read the real one from `PeerServer.port`."""
    ban_duration_s: float = 600.0
    exchange_timeout_s: float = 300.0
    """The most one Exchange may take on our side, whatever deadline the caller set."""
    max_concurrent_rpcs: int = 32
    max_concurrent_fetches: int = 2
    """FetchState streams served at once; more are refused with RATE_LIMITED."""
    fetch_timeout_s: float = 600.0
    """The most one FetchState may take on our side (a reader that stalls is cut off)."""
    limits: Limits | None = None
    """Rate and size limits (protocol/limits.py); None derives them with `Limits.for_run` from the
    policy's largest acceptable update and `min_round_s`."""
    min_round_s: float = DEFAULT_MIN_ROUND_S
    """The shortest round an honest peer of this run makes: sets the per-peer rates when `limits` is None."""
    duplex: bool = True
    """Write the reply while the push lands (protocol/duplex.py); off, only after it was delivered (the order of
    servers before full duplex: side-by-side benchmarks and compatibility tests)."""


@dataclass(slots=True)
class _Stream:
    """What one Exchange call has established so far."""

    sender: str | None = None
    """The sender, once its signature checked: from then on its failures are its own (bans)."""
    claim: tuple[str, int, int, int | None] | None = None
    """(peer, slice, round, previous round) claimed in the replay guard and not yet delivered."""



class _Refusal(Exception):
    """Internal: carries a refusal out of a handler together with who, if anyone, is to blame."""

    def __init__(self, error: Exception, blame: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.blame = blame


class PeerServer:
    """A grpc.aio PeerService on a TLS port. `await start()`, then `await stop()` (or `async with`).

    `on_update` is awaited once per accepted update, before the reply's last bytes; keep it short (queue
    the update). `reply_for(round, slice)` and `state_provider()` run on the event loop: return
    ready, pre-encoded objects (`OutgoingUpdate`, `make_state_snapshot`'s result), never compute.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        policy: WirePolicy,
        on_update: Callable[[ReceivedUpdate], Awaitable[None]],
        reply_for: Callable[[int, int], OutgoingUpdate | None] | None = None,
        state_provider: Callable[[], StateSnapshot | None] | None = None,
        status: Callable[[], PeerStatus] | None = None,
        bans: BanList | None = None,
        config: ServerConfig | None = None,
        shard_lookup: ShardLookup | None = None,
    ) -> None:
        self.identity = identity
        self.policy = policy
        self.config = config or ServerConfig()
        self.bans = bans if bans is not None else BanList(self.config.ban_duration_s)
        self.replay = ReplayGuard()
        self.limiter = Limiter(self.config.limits or Limits.for_run(
            stream_bytes=largest_stream_bytes(policy), min_round_s=self.config.min_round_s))  # fmt: skip
        self.rejections: Counter[Reason] = Counter()
        """Refusals by reason since start; the daemon exports them as metrics."""
        self.accepted = 0
        self._on_update = on_update
        self._reply_for = reply_for or (lambda _round, _slice: None)
        self._state_provider = state_provider or (lambda: None)
        self._status = status or PeerStatus
        self._fetch_slots = asyncio.Semaphore(self.config.max_concurrent_fetches)
        self.shards = ShardService(policy.run_id, shard_lookup, self.limiter.admit_call, self.rejections)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """ "host:port" clients dial."""
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Bind (TLS with the identity's P-256 certificate) and serve."""
        host, port = self.config.host, self.config.port
        check_listenable(host, port, "PeerService")  # grpc's own failure names no cause (protocol/ports.py)
        # grpc binds with SO_REUSEPORT by default: a second peer on a taken port would bind silently and get
        # half of the first one's connections. Off, a taken port is an error.
        options = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.config.max_concurrent_rpcs)
        server.add_generic_rpc_handlers((self._handler(),))
        credentials = grpc.ssl_server_credentials([(self.identity.tls_key_pem, self.identity.tls_cert_pem)])
        try:
            self.port = server.add_secure_port(f"{host}:{port}", credentials)
        except RuntimeError as exc:  # taken since the check
            raise SetupError(f"PeerService: cannot listen on {host}:{port} ({exc})") from exc
        if not self.port:
            raise SetupError(f"PeerService: cannot listen on {host}:{port}")
        await server.start()
        self._server = server
        log.info(
            "PeerService of %s on %s (tls %s)",
            self.identity.peer_id[:16],
            self.endpoint,
            self.identity.tls_fingerprint[:16],
        )

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving; calls still running get `grace` seconds."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> PeerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _handler(self) -> grpc.GenericRpcHandler:
        # Requests arrive as raw bytes (no deserializer) so that garbage is our GARBAGE, counted and
        # answered precisely, instead of grpc's generic failure.
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Info": grpc.unary_unary_rpc_method_handler(
                    self._info, response_serializer=pb.InfoReply.SerializeToString
                ),
                "Exchange": grpc.stream_stream_rpc_method_handler(
                    self._exchange, response_serializer=None  # frames are written serialised (protocol/duplex.py)
                ),
                "FetchState": grpc.unary_stream_rpc_method_handler(
                    self._fetch_state, response_serializer=pb.StateFrame.SerializeToString
                ),
                "FetchShard": grpc.unary_stream_rpc_method_handler(
                    self.shards.fetch_shard, response_serializer=pb.ShardFrame.SerializeToString
                ),
            },
        )

    async def _refuse(self, context: grpc.aio.ServicerContext, refusal: _Refusal) -> None:
        """Count, log, maybe ban, and abort the call with the reason's status and metadata."""
        reason = reason_of(refusal.error)
        self.rejections[reason] += 1
        if refusal.blame is not None and reason not in _NOT_BANNED:
            ban_s = self.limiter.limits.over_limit_ban_s if reason is Reason.OVER_LIMIT else None
            self.bans.ban(refusal.blame, reason.value, ban_s)
        # Unauthenticated refusals are anyone's to cause: counted always, logged quietly.
        level = logging.INFO if refusal.blame is not None else logging.DEBUG
        log.log(level, "refused %s from %s (%s): %s", reason.value, refusal.blame, context.peer(), refusal.error)
        await context.abort(
            STATUS_FOR_REASON[reason],
            str(refusal.error)[:500],
            trailing_metadata=((REASON_KEY, reason.value),),
        )

    # ------------------------------------------------------------------------------------- Info

    async def _info(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        try:
            self.limiter.admit_call(address_of(context.peer()))
            major = parse_message(pb.InfoRequest, request).protocol_major
            check_version(major)
        except _REFUSALS as exc:
            await self._refuse(context, _Refusal(exc, None))
        status = self._status()
        return pb.InfoReply(
            protocol_version=PROTOCOL_VERSION,
            software_version=software_version(),
            run_id=self.policy.run_id,
            round=status.round,
            slice=status.slice,
            health=status.health,
            peer_id=self.identity.peer_id,
        )

    # --------------------------------------------------------------------------------- Exchange

    async def _exchange(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        stream = _Stream()
        limit = self.config.exchange_timeout_s
        try:
            self.limiter.admit_call(address_of(context.peer()))
            # One budget for the whole call, reply included: a caller that stops reading is cut off too.
            await asyncio.wait_for(self._exchange_within(requests, context, stream), limit)
        except asyncio.TimeoutError:
            self._undo_claim(stream)
            error = RejectedUpdate(Reason.TIMEOUT, f"exchange took over {limit} s")
            await self._refuse(context, _Refusal(error, stream.sender))
        except _REFUSALS as exc:
            await self._refuse(context, _Refusal(exc, stream.sender))
        except asyncio.CancelledError:
            self._undo_claim(stream)  # the caller went away mid-transfer: its retry is not a replay
            raise

    def _undo_claim(self, stream: _Stream) -> None:
        if stream.claim is not None:
            self.replay.release(*stream.claim)
            stream.claim = None

    async def _exchange_within(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        """Accept the header, then read the push and write our reply at once (protocol/duplex.py); the reply's
        tail waits until the update was delivered. Serial (`ServerConfig.duplex` off): the reply starts then."""
        header, planned = await self._admit(requests, stream)
        reply: ReplyWriter | None = None
        try:
            with self.limiter.reserve(header.sender, sum(p.entry.payload_length for p in planned)) as reservation:
                self._claim(header, stream)
                await context.send_initial_metadata(((ACCEPT_KEY, "1"),))
                if self.config.duplex:
                    reply = self._start_reply(context, header)
                update = await receive_push(requests, header, planned, self.policy.dtype, reservation,
                                            truncated=partial(self._truncated, stream))  # fmt: skip
            stream.claim = None  # delivered: the round is used up
            self.accepted += 1
            try:
                await self._on_update(update)
            except Exception:
                log.exception("on_update failed for an update from %s", update.sender[:16])
                if reply is not None:
                    await reply.stop()
                await context.abort(grpc.StatusCode.INTERNAL, "the receiver failed to use the update")
            if not self.config.duplex:
                reply = self._start_reply(context, header)
            if reply is not None:
                await reply.finish()
        finally:
            if reply is not None:
                await reply.stop()

    async def _admit(
        self, requests: AsyncIterator[bytes], stream: _Stream
    ) -> tuple[pb.UpdateHeader, list[PlannedTensor]]:
        """Read and check the header (raises a refusal); records the authenticated sender in `stream`."""
        header = await read_header(requests)
        check_version(header.protocol_major)
        if self.bans.is_banned(header.sender):
            raise BannedPeer(f"peer {header.sender[:16]} is banned here for a while")
        authenticate_header(header, self.policy, self.identity.peer_id)
        stream.sender = header.sender
        planned = plan_payload(header.tensors, self.policy.expected_shapes(header.slice), self.policy)
        self.limiter.admit_exchange(header.sender, sum(p.entry.payload_length for p in planned))
        return header, planned

    def _claim(self, header: pb.UpdateHeader, stream: _Stream) -> None:
        previous = self.replay.highest(header.sender, header.slice)
        if not self.replay.claim(header.sender, header.slice, header.round):
            raise RejectedUpdate(Reason.REPLAY, f"round {header.round} of slice {header.slice}, seen {previous}")
        stream.claim = (header.sender, header.slice, header.round, previous)

    def _start_reply(self, context: grpc.aio.ServicerContext, header: pb.UpdateHeader) -> ReplyWriter | None:
        outgoing = self._reply_for(header.round, header.slice)
        if outgoing is None:
            return None
        seal = partial(seal_update, outgoing, identity=self.identity, run_id=self.policy.run_id,
                       recipient=header.sender)  # looked up here: benchmarks/adversary_peers.py forges it
        return ReplyWriter(context, chunk_frames((e.payload for e in outgoing.tensors.values()), TAIL_BYTES), seal)

    def _truncated(self, stream: _Stream) -> None:
        """The push ended short (see `receive_push`): refused unblamed, and the round is given back."""
        stream.sender = None
        self._undo_claim(stream)

    # ------------------------------------------------------------------------------- FetchState

    async def _fetch_state(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            self.limiter.admit_call(address_of(context.peer()))
            snapshot = self._checked_state_request(request)
            if snapshot is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no state to serve yet")
            if self._fetch_slots.locked():
                raise RateLimited(Reason.RATE_LIMITED, "too many downloads from this peer; try another")
            async with self._fetch_slots:
                header = state_header(self.identity, self.policy.run_id, snapshot)
                await stream_state(context, header, snapshot, self.config.fetch_timeout_s)
        except WriteStalled as exc:
            # the reader stopped reading: no status can follow a cancelled write, so the call just ends
            log.info("FetchState to %s cut off: %s", context.peer(), exc)
        except asyncio.TimeoutError:
            error = RejectedUpdate(Reason.TIMEOUT, f"download took over {self.config.fetch_timeout_s} s")
            await self._refuse(context, _Refusal(error, None))
        except _REFUSALS as exc:
            await self._refuse(context, _Refusal(exc, None))

    def _checked_state_request(self, request: bytes) -> StateSnapshot | None:
        parsed = parse_message(pb.FetchStateRequest, request)
        check_version(parsed.protocol_major)
        if parsed.run_id != self.policy.run_id:
            raise RejectedUpdate(
                Reason.WRONG_RUN, f"run {parsed.run_id[:16]!r}, this peer serves {self.policy.run_id[:16]!r}"
            )
        return self._state_provider()
