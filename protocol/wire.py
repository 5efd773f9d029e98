"""How murmur's errors look on gRPC, both ways, and the channel/server settings both sides share.

A refusal travels as a status code plus trailing metadata `murmur-reason: <Reason value>`; the
message text is for humans only. Clients branch on (code, reason), never on text:

    reason                  status
    garbage, wrong_shape,   INVALID_ARGUMENT
    wrong_dtype, non_finite
    bad_signature,          UNAUTHENTICATED
    unknown_peer
    wrong_run, replay,      FAILED_PRECONDITION
    future_round,
    incompatible_version
    oversize, rate_limited, RESOURCE_EXHAUSTED
    over_limit
    banned                  PERMISSION_DENIED
    timeout                 DEADLINE_EXCEEDED
    not_found               NOT_FOUND (FetchShard: a dataset file this peer does not hold)

Exchange has one handshake inside the stream: the caller sends its header and waits; the callee answers
with initial metadata `murmur-accept: 1` once the header passed every check, and only then does the
caller send chunks. A refused update so costs its header, not its payload, and the refusal's status
reaches the caller intact (grpc.aio reports a write that races the server's final status as
"Internal error from Core", which would lose the reason).
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from protocol import PROTOCOL_MAJOR, PROTOCOL_VERSION, software_version
from protocol._generated import murmur_pb2 as pb
from protocol.errors import (
    BannedPeer,
    IncompatibleVersion,
    MalformedPayload,
    MurmurError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolViolation,
    RateLimited,
    Reason,
    RejectedUpdate,
)
from protocol.updates import MAX_MESSAGE_BYTES

_M = TypeVar("_M", bound=Message)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PeerService"].full_name
"""The PeerService's full name from the generated descriptor (murmur.proto), so that the server's handler and
the client's method paths ("/<SERVICE_NAME>/<Method>") cannot drift apart."""
REASON_KEY = "murmur-reason"
ACCEPT_KEY = "murmur-accept"
"""Initial metadata by which a server says "header accepted, send the chunks" in Exchange."""

STATUS_FOR_REASON: dict[Reason, grpc.StatusCode] = {
    Reason.GARBAGE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.WRONG_SHAPE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.WRONG_DTYPE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.NON_FINITE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.BAD_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
    Reason.UNKNOWN_PEER: grpc.StatusCode.UNAUTHENTICATED,
    Reason.WRONG_RUN: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.REPLAY: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.FUTURE_ROUND: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.INCOMPATIBLE_VERSION: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.OVERSIZE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.OVER_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.BANNED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
}

# Both sides: a frame is at most one chunk plus framing; keepalives notice dead partners.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


def check_version(protocol_major: int) -> None:
    """Raise IncompatibleVersion, saying what to install, unless `protocol_major` is ours."""
    if protocol_major == PROTOCOL_MAJOR:
        return
    ours = software_version()
    if protocol_major < PROTOCOL_MAJOR:
        advice = f"upgrade: pip install 'murmur>={ours}'"
    else:
        advice = (
            f"this peer is older; it needs an upgrade, or you need a murmur with protocol {PROTOCOL_MAJOR}.x"
        )
    raise IncompatibleVersion(
        f"protocol major {protocol_major} is not spoken here: this peer runs murmur {ours} "
        f"(protocol {PROTOCOL_VERSION}); {advice}"
    )


def reason_of(exc: MurmurError) -> Reason:
    """The counter label of a refusal raised on our side."""
    if isinstance(exc, ProtocolViolation):
        return exc.reason
    if isinstance(exc, IncompatibleVersion):
        return Reason.INCOMPATIBLE_VERSION
    if isinstance(exc, BannedPeer):
        return Reason.BANNED
    raise TypeError(f"{type(exc).__name__} is not a refusal")


def error_from_status(code: grpc.StatusCode | None, details: str, reason: str | None) -> MurmurError:
    """The murmur error a client raises for a failed call, from its status and `murmur-reason` (`by_peer` when
    the partner named its reason: a refusal of the partner's, not a failure to reach it)."""
    error = _error_from_status(code, details, reason)
    error.by_peer = reason in Reason._value2member_map_
    return error


def _error_from_status(code: grpc.StatusCode | None, details: str, reason: str | None) -> MurmurError:
    known = Reason(reason) if reason in Reason._value2member_map_ else None
    text = f"peer refused: {details}" if known else f"{code.name if code else 'UNKNOWN'}: {details}"
    if known is Reason.BANNED or code is grpc.StatusCode.PERMISSION_DENIED:
        return BannedPeer(text)
    if known is Reason.INCOMPATIBLE_VERSION:
        return IncompatibleVersion(text)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerTimeout(text)
    if known in (Reason.GARBAGE, Reason.OVERSIZE):
        return MalformedPayload(known, text)
    if known in (Reason.OVER_LIMIT, Reason.RATE_LIMITED):
        return RateLimited(known, text)
    if known is not None:
        return RejectedUpdate(known, text)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:  # grpc's own message-size limit
        return MalformedPayload(Reason.OVERSIZE, text)
    return PeerUnreachable(text)


def reason_from_metadata(metadata: object) -> str | None:
    """The `murmur-reason` value in a call's trailing metadata, if any."""
    for key, value in metadata or ():  # type: ignore[union-attr]
        if key == REASON_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def error_from_rpc(error: grpc.aio.AioRpcError) -> MurmurError:
    """`error_from_status` for an AioRpcError."""
    reason = reason_from_metadata(error.trailing_metadata())
    return error_from_status(error.code(), error.details() or "", reason)


def parse_message(message_type: type[_M], data: bytes) -> _M:
    """Parse untrusted bytes as `message_type`; any failure is MalformedPayload(GARBAGE), on either side."""
    try:
        return message_type.FromString(data)
    except (DecodeError, ValueError, TypeError) as exc:
        raise MalformedPayload(Reason.GARBAGE, f"not a {message_type.__name__}: {exc}") from exc
