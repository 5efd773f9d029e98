"""The PeerService client: pinned TLS, a deadline on every call, replies checked like pushes.

`async with PeerClient.connect(endpoint, peer_id=..., tls_fingerprint=..., identity=..., policy=...)`
opens a channel whose only trusted root is the partner's own certificate, the one whose SHA-256
fingerprint its signed announcement carries. The certificate comes from the announcement
(`tls_certificate`) or, when absent, from a TLS probe of the endpoint; either way it must hash to the
pinned fingerprint, and grpc then refuses any server that does not hold that certificate's key.

Every failure surfaces as a `protocol.errors` class, so a caller catches MurmurError and nothing else:
TransportError (timeout, unreachable, pin mismatch; grpc's errors, OSError and timeouts raised inside a
call are turned into these), IncompatibleVersion, BannedPeer, or a ProtocolViolation with the partner's
`reason` (either the partner refused our update, or its reply failed our checks). Errors raised by the
caller's own code inside `async with PeerClient.connect(...)` are not translated.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import grpc
import torch

from protocol import PROTOCOL_MAJOR
from protocol._generated import murmur_pb2 as pb
from protocol.duplex import chunk_body, chunk_frames
from protocol.errors import MalformedPayload, PeerTimeout, PeerUnreachable, Reason, RejectedUpdate
from protocol.identity import TLS_SERVER_NAME, Identity, certificate_fingerprint, state_signing_bytes, verify
from protocol.incoming import IncomingPayload
from protocol.logs import get_logger
from protocol.updates import (
    OutgoingUpdate,
    PayloadBuffer,
    ReceivedUpdate,
    ShapeTable,
    WirePolicy,
    authenticate_header,
    decode_payload,
    plan_payload,
    plan_state,
    seal_update,
)
from protocol.wire import (
    ACCEPT_KEY,
    CHANNEL_OPTIONS,
    SERVICE_NAME,
    check_version,
    error_from_rpc,
    error_from_status,
    parse_message,
    reason_from_metadata,
)

log = get_logger(__name__)

_PATH = f"/{SERVICE_NAME}/"


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A partner's answer to Info."""

    protocol_version: str
    software_version: str
    run_id: str
    round: int
    slice: int
    health: str
    peer_id: str


@dataclass(frozen=True, slots=True)
class FetchedState:
    """Full weights from a donor; `content_sha256` checked against the bytes and the donor's signature."""

    sender: str
    run_id: str
    round: int
    tensors: dict[str, torch.Tensor]
    content_sha256: bytes


async def probe_certificate(endpoint: str, timeout: float) -> bytes:
    """The DER certificate a TLS server at `endpoint` presents (unverified: the caller pins it)."""
    host, _, port = endpoint.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host.strip("[]"), int(port), ssl=context, server_hostname=TLS_SERVER_NAME
            ),
            timeout,
        )
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        raise PeerUnreachable(f"{endpoint}: TLS probe failed ({exc!r})") from exc
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.transport.abort()  # no TLS shutdown dance: we only wanted the certificate
    if not der:
        raise PeerUnreachable(f"{endpoint}: presented no certificate")
    return der


class PeerClient:
    """Calls on one partner. Build with `connect`; not reusable after the context exits."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        peer_id: str,
        identity: Identity,
        policy: WirePolicy | None,
        deadline: float,
        duplex: bool = True,
    ) -> None:
        self.peer_id = peer_id
        self.duplex = duplex
        """Push and read the reply at once; False: push all, then read (older clients: benchmarks, tests)."""
        self.identity = identity
        self.policy = policy
        self.deadline = deadline
        self.bytes_sent = 0
        """Serialized frame bytes this client sent (gRPC messages, before HTTP/2 and TLS framing)."""
        self.bytes_received = 0
        self._channel = channel
        self._info = channel.unary_unary(_PATH + "Info", request_serializer=None, response_deserializer=None)
        self._exchange = channel.stream_stream(
            _PATH + "Exchange", request_serializer=None, response_deserializer=None
        )
        self._fetch = channel.unary_stream(
            _PATH + "FetchState", request_serializer=None, response_deserializer=None
        )

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        endpoint: str,
        *,
        peer_id: str,
        tls_fingerprint: str,
        identity: Identity,
        policy: WirePolicy | None = None,
        tls_certificate: bytes | None = None,
        deadline: float = 60.0,
        duplex: bool = True,
    ) -> AsyncIterator[PeerClient]:
        """A client of the peer `peer_id` at `endpoint`, pinned to `tls_fingerprint` (hex SHA-256 of DER).

        `policy` is needed for `exchange` (run id, shapes, and `lookup` for the partner's key).
        Raises PeerUnreachable when the certificate does not match the pin.
        """
        with _transport_errors(endpoint):
            if tls_certificate is None:
                der = await probe_certificate(endpoint, deadline)
                tls_certificate = ssl.DER_cert_to_PEM_cert(der).encode()
            try:
                fingerprint = certificate_fingerprint(tls_certificate)
            except ValueError as exc:  # an announcement's certificate is a stranger's bytes
                raise PeerUnreachable(f"{endpoint}: unreadable TLS certificate ({exc})") from exc
            if fingerprint != tls_fingerprint.lower():
                raise PeerUnreachable(f"{endpoint}: TLS certificate does not match the pinned fingerprint")
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_certificate)
            options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
            channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
        try:
            yield cls(channel, peer_id=peer_id, identity=identity, policy=policy, deadline=deadline, duplex=duplex)
        finally:
            await channel.close()

    async def info(self) -> PeerInfo:
        """The partner's versions, run, round, slice and health."""
        request = pb.InfoRequest(protocol_major=PROTOCOL_MAJOR).SerializeToString()
        with _transport_errors(self.peer_id[:16]):
            raw = await self._info(request, timeout=self.deadline)
        reply = parse_message(pb.InfoReply, raw)
        return PeerInfo(
            reply.protocol_version,
            reply.software_version,
            reply.run_id,
            reply.round,
            reply.slice,
            reply.health,
            reply.peer_id,
        )

    async def exchange(self, update: OutgoingUpdate) -> ReceivedUpdate | None:
        """Push `update` (signed for this partner) and return the partner's checked reply, if any.

        Full duplex: once the partner accepted our header, our chunks go out (a task of their own) while its reply
        is read, hashed and decoded as it lands. The reply is returned only when the call ended OK, which the
        partner says only after it took our update; a refusal raises instead, and a reply cut short is dropped.
        """
        if self.policy is None:
            raise ValueError("exchange needs a WirePolicy")
        call = self._exchange(timeout=self.deadline)  # connects (TCP, TLS) while the update is hashed and signed
        pushing: asyncio.Future | None = None
        try:
            with _transport_errors(self.peer_id[:16]):
                header = await asyncio.to_thread(
                    seal_update, update, identity=self.identity, run_id=self.policy.run_id, recipient=self.peer_id
                )
                await self._offer(call, header)
                if self.duplex:
                    pushing = asyncio.ensure_future(self._push(call, update))
                else:  # the order before full duplex: all of the push, then the reply
                    await self._push(call, update)
                reply = await self._read_reply(call)
                if pushing is not None:
                    await pushing
                return reply
        finally:
            call.cancel()
            if pushing is not None:
                pushing.cancel()  # a failed call's status was raised by the reader; the writer has nothing to add
                await asyncio.wait({pushing})
                if not pushing.cancelled():
                    pushing.exception()

    async def _offer(self, call: grpc.aio.StreamStreamCall, header: pb.UpdateHeader) -> None:
        """Send the header and wait for the partner's go-ahead; raises its refusal."""
        try:
            await self._write(call, pb.UpdateFrame(header=header).SerializeToString())
            metadata = await call.initial_metadata()
        except asyncio.InvalidStateError:  # the partner ended the call early: say why
            metadata = None
        if (ACCEPT_KEY, "1") not in tuple(metadata or ()):
            await _raise_for_call(call)
            raise PeerUnreachable("the partner ended the exchange without accepting the header")

    async def _push(self, call: grpc.aio.StreamStreamCall, update: OutgoingUpdate) -> None:
        """The chunks, then half-close. A partner that ends the call meanwhile is heard by the reader: its status
        says why (after a serial push, nothing is left to write)."""
        try:
            for frame, _ in chunk_frames(enc.payload for enc in update.tensors.values()):
                await self._write(call, frame)
            await call.done_writing()
        except asyncio.InvalidStateError:
            pass

    async def _write(self, call: grpc.aio.StreamStreamCall, frame: bytes) -> None:
        await call.write(frame)
        self.bytes_sent += len(frame)

    async def _read(self, call: grpc.aio.Call) -> bytes | None:
        raw = await call.read()
        if raw is grpc.aio.EOF:
            await _raise_for_call(call)
            return None
        self.bytes_received += len(raw)
        return raw

    async def _read_reply(self, call: grpc.aio.StreamStreamCall) -> ReceivedUpdate | None:
        """The partner's reply, read to the end of the call (whose status must be OK), or None if it sent none."""
        first = await self._read(call)
        if first is None:
            return None
        header = _frame_body(parse_message(pb.UpdateFrame, first), "header")
        check_version(header.protocol_major)
        if header.sender != self.peer_id:
            raise RejectedUpdate(
                Reason.BAD_SIGNATURE, f"reply signed by {header.sender[:16]}, not the partner"
            )
        authenticate_header(header, self.policy, self.identity.peer_id)
        planned = plan_payload(header.tensors, self.policy.expected_shapes(header.slice), self.policy)
        payload = IncomingPayload(planned, header.payload_sha256, self.policy.dtype)
        try:
            while (raw := await self._read(call)) is not None:  # raises the partner's refusal of our push
                payload.add(chunk_body(raw))
            tensors = await payload.finish()
        finally:
            payload.close()
        return ReceivedUpdate.from_header(header, tensors, payload.total)

    async def _fill(self, call: grpc.aio.Call, buffer: PayloadBuffer, frame_type: type) -> None:
        while buffer.received < buffer.total:
            raw = await self._read(call)
            if raw is None:
                break
            buffer.add(_frame_body(parse_message(frame_type, raw), "chunk"))
        buffer.finish()

    async def fetch_state(
        self, shapes: ShapeTable, *, run_id: str, public_key: bytes, expected_sha256: bytes | None = None
    ) -> FetchedState:
        """Stream the partner's full weights for `run_id`; every name of `shapes` must come, exactly.

        `public_key` is the donor's Ed25519 key (from its announcement); its signature over the content
        hash is checked, and so is the hash over the bytes. `expected_sha256`, when given, must match.
        """
        request = pb.FetchStateRequest(protocol_major=PROTOCOL_MAJOR, run_id=run_id).SerializeToString()
        call = self._fetch(request, timeout=self.deadline)
        try:
            with _transport_errors(self.peer_id[:16]):
                first = await self._read(call)
                if first is None:
                    raise MalformedPayload(Reason.GARBAGE, "state stream ended before its header")
                header = _frame_body(parse_message(pb.StateFrame, first), "header")
                self._check_state_header(header, run_id, public_key, expected_sha256)
                planned = plan_state(header.tensors, shapes)
                buffer = PayloadBuffer(sum(p.entry.payload_length for p in planned))
                await self._fill(call, buffer, pb.StateFrame)
        finally:
            call.cancel()
        tensors = await asyncio.to_thread(decode_payload, planned, buffer, header.content_sha256, None)
        return FetchedState(header.sender, header.run_id, header.round, tensors, header.content_sha256)

    def _check_state_header(
        self, header: pb.StateHeader, run_id: str, public_key: bytes, expected_sha256: bytes | None
    ) -> None:
        if header.run_id != run_id:
            raise RejectedUpdate(Reason.WRONG_RUN, f"state of run {header.run_id[:16]!r}")
        if header.sender != self.peer_id or len(header.content_sha256) != 32:
            raise RejectedUpdate(Reason.BAD_SIGNATURE, "state not from the partner")
        signed = state_signing_bytes(
            run_id=run_id, round=header.round, content_sha256=header.content_sha256, sender=header.sender
        )
        if not verify(public_key, signed, header.signature):
            raise RejectedUpdate(Reason.BAD_SIGNATURE, "state signature does not check")
        if expected_sha256 is not None and header.content_sha256 != expected_sha256:
            raise RejectedUpdate(Reason.BAD_SIGNATURE, "state hash is not the expected one")


@contextmanager
def _transport_errors(where: str) -> Iterator[None]:
    """Turn what grpc, sockets and timeouts raise inside a call into murmur's errors, so that callers catch
    MurmurError alone: a failed call's status becomes its murmur error (`error_from_rpc`), a timeout
    PeerTimeout, any other socket or grpc failure PeerUnreachable. MurmurErrors pass through unchanged."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from exc
    except grpc.RpcError as exc:
        raise PeerUnreachable(f"{where}: {exc!r}") from exc
    except (asyncio.TimeoutError, TimeoutError) as exc:  # one class since 3.11, and an OSError: caught first
        raise PeerTimeout(f"{where}: {exc!r}") from exc
    except OSError as exc:
        raise PeerUnreachable(f"{where}: {exc!r}") from exc


async def _raise_for_call(call: grpc.aio.Call) -> None:
    """Raise the murmur error for a finished call that did not end OK."""
    code = await call.code()
    if code is grpc.StatusCode.OK:
        return
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        raise PeerTimeout(await call.details() or "deadline exceeded")
    reason = reason_from_metadata(await call.trailing_metadata())
    raise error_from_status(code, await call.details() or "", reason)


def _frame_body(frame: pb.UpdateFrame | pb.StateFrame, expected: str):
    if frame.WhichOneof("body") != expected:
        raise MalformedPayload(Reason.GARBAGE, f"expected a {expected} frame")
    return getattr(frame, expected)
