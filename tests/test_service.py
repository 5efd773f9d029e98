"""PeerService on loopback: push-pull, every refusal with its exact status and reason, state, TLS pins."""

from __future__ import annotations

import math
import struct
import time

import grpc
import pytest
import torch
from conftest_wire import (
    CLIENT_ID,
    RUN_ID,
    SERVER_ID,
    STRANGER_ID,
    CountingProxy,
    Wire,
    assert_valid,
    pinned_channel,
    push_frames,
    replace_payload,
    run,
    serving,
    unary,
    update_frames,
)

from protocol import PROTOCOL_MAJOR
from protocol import client as client_module
from protocol._generated import murmur_pb2 as pb
from protocol.bans import BanList, ReplayGuard
from protocol.client import PeerClient
from protocol.codec import decode
from protocol.errors import (
    BannedPeer,
    IncompatibleVersion,
    MalformedPayload,
    PeerTimeout,
    PeerUnreachable,
    Reason,
    RejectedUpdate,
)
from protocol.limits import Limits
from protocol.service import ServerConfig
from protocol.updates import CHUNK_BYTES, chunked, make_state_snapshot

S = grpc.StatusCode


def connect(server, wire: Wire, identity=CLIENT_ID, run_id: str = RUN_ID, **kwargs):
    return PeerClient.connect(
        server.endpoint,
        peer_id=SERVER_ID.peer_id,
        tls_fingerprint=kwargs.pop("tls_fingerprint", SERVER_ID.tls_fingerprint),
        identity=identity,
        policy=wire.policy(run_id),
        deadline=10.0,
        **kwargs,
    )


@pytest.mark.timeout(60)
def test_push_pull_delivers_update_and_reply() -> None:
    wire = Wire()
    sent = wire.update(round=3, slice=1)

    async def scenario():
        async with serving(wire) as server, connect(server, wire) as client:
            info = await client.info()
            reply = await client.exchange(sent)
            return server, info, reply, client.bytes_sent, client.bytes_received

    server, info, reply, sent_bytes, received_bytes = run(scenario)
    assert (info.run_id, info.round, info.slice, info.health) == (RUN_ID, 5, 1, "ok")
    assert info.peer_id == SERVER_ID.peer_id and info.protocol_version.startswith(f"{PROTOCOL_MAJOR}.")
    [got] = wire.received
    assert (got.sender, got.round, got.slice, got.run_id) == (CLIENT_ID.peer_id, 3, 1, RUN_ID)
    for name, encoded in sent.tensors.items():
        torch.testing.assert_close(got.tensors[name], decode(encoded, wire.codec))
    assert_valid(got, wire.shapes)
    assert reply is not None and reply.sender == SERVER_ID.peer_id and reply.round == 1003
    expected_reply = wire.update(1003, 1)
    for name, encoded in expected_reply.tensors.items():
        torch.testing.assert_close(reply.tensors[name], decode(encoded, wire.codec))
    payload = sum(len(e.payload) for e in sent.tensors.values())
    assert payload <= sent_bytes < payload * 1.05 + 2048
    assert payload <= received_bytes < payload * 1.05 + 2048
    assert server.accepted == 1 and not server.rejections


@pytest.mark.timeout(60)
def test_partial_update_and_no_reply() -> None:
    wire = Wire()

    async def scenario():
        async with serving(wire, reply_for=lambda r, s: None) as server, connect(server, wire) as client:
            return await client.exchange(wire.update(1, names=["phi/w"]))

    assert run(scenario) is None
    [got] = wire.received
    assert set(got.tensors) == {"phi/w"}


def _refusal_case(wire: Wire, frames: list[bytes], *, expect_ban: bool, pre: list[list[bytes]] = ()):
    """Send `pre` streams (must succeed), then `frames`; return the outcome and the server."""

    async def scenario():
        async with serving(wire) as server:
            channel = pinned_channel(server)
            try:
                for stream in pre:
                    assert (await push_frames(channel, stream)).code is S.OK
                result = await push_frames(channel, frames)
                info = await unary(channel, "Info", pb.InfoRequest(protocol_major=PROTOCOL_MAJOR).SerializeToString())
            finally:
                await channel.close()
            assert info.code is S.OK, "the server still answers Info"
            return result, server

    result, server = run(scenario)
    assert server.bans.is_banned(CLIENT_ID.peer_id) is expect_ban
    return result, server


def _with_header(frames: list[bytes], mutate) -> list[bytes]:
    frame = pb.UpdateFrame.FromString(frames[0])
    mutate(frame.header)
    return [frame.SerializeToString(), *frames[1:]]


def _flip_signature(header: pb.UpdateHeader) -> None:
    header.signature = bytes([header.signature[0] ^ 1]) + header.signature[1:]


def _nan_scale(payload: bytes) -> bytes:
    return struct.pack("<f", math.nan) + payload[4:]


def _payload_total(wire: Wire) -> int:
    return sum(len(e.payload) for e in wire.update(1).tensors.values())


def _with_nan(wire: Wire):
    update = wire.update(1)
    return replace_payload(update, "delta/w", _nan_scale(update.tensors["delta/w"].payload))


def _wrong_shape(wire: Wire):
    update = wire.update(1)
    return replace_payload(update, "delta/b", update.tensors["delta/w"].payload, (64, 48))


def _padded(wire: Wire):
    update = wire.update(1)
    return replace_payload(update, "delta/w", update.tensors["delta/w"].payload + bytes(100))


def _major(header: pb.UpdateHeader) -> None:
    header.protocol_major = PROTOCOL_MAJOR + 98


# name: (frames of the stream, status, reason, whether the sender ends up banned)
CASES = {
    "bad_signature": (
        lambda w: _with_header(update_frames(w.update(1)), _flip_signature),
        S.UNAUTHENTICATED,
        Reason.BAD_SIGNATURE,
        False,
    ),
    "signed_for_another_peer": (
        lambda w: update_frames(w.update(1), recipient=STRANGER_ID),
        S.UNAUTHENTICATED,
        Reason.BAD_SIGNATURE,
        False,
    ),
    "payload_not_the_signed_one": (
        lambda w: update_frames(w.update(1), chunks=[bytes(_payload_total(w))]),
        S.UNAUTHENTICATED,
        Reason.BAD_SIGNATURE,
        True,
    ),
    "unknown_peer": (
        lambda w: update_frames(w.update(1), sender=STRANGER_ID),
        S.UNAUTHENTICATED,
        Reason.UNKNOWN_PEER,
        False,
    ),
    "wrong_run": (
        lambda w: update_frames(w.update(1), run_id="cd" * 32),
        S.FAILED_PRECONDITION,
        Reason.WRONG_RUN,
        False,
    ),
    "incompatible_version": (
        lambda w: _with_header(update_frames(w.update(1)), _major),
        S.FAILED_PRECONDITION,
        Reason.INCOMPATIBLE_VERSION,
        False,
    ),
    "wrong_shape": (lambda w: update_frames(_wrong_shape(w)), S.INVALID_ARGUMENT, Reason.WRONG_SHAPE, True),
    "unknown_tensor": (lambda w: update_frames(_renamed(w.update(1))), S.INVALID_ARGUMENT, Reason.WRONG_SHAPE, True),
    "unknown_slice": (lambda w: update_frames(w.update(1, slice=7)), S.INVALID_ARGUMENT, Reason.WRONG_SHAPE, True),
    "non_finite": (lambda w: update_frames(_with_nan(w)), S.INVALID_ARGUMENT, Reason.NON_FINITE, True),
    "oversize_header": (lambda w: update_frames(_padded(w))[:1], S.RESOURCE_EXHAUSTED, Reason.OVERSIZE, True),
    "chunk_beyond_announced": (
        lambda w: update_frames(w.update(1), chunks=[bytes(_payload_total(w) + 10)]),
        S.RESOURCE_EXHAUSTED,
        Reason.OVERSIZE,
        True,
    ),
    # not banned: a caller whose connection died mid-push ends the stream the same way (tests/test_churn.py)
    "truncated": (lambda w: update_frames(w.update(1))[:-1], S.INVALID_ARGUMENT, Reason.GARBAGE, False),
    "garbage_first_frame": (lambda w: [b"\xff\xfe garbage \x00" * 10], S.INVALID_ARGUMENT, Reason.GARBAGE, False),
    "chunk_before_header": (
        lambda w: [pb.UpdateFrame(chunk=b"x").SerializeToString()],
        S.INVALID_ARGUMENT,
        Reason.GARBAGE,
        False,
    ),
    "garbage_after_header": (
        lambda w: update_frames(w.update(1))[:1] + [b"\xff\xff\xff"],
        S.INVALID_ARGUMENT,
        Reason.GARBAGE,
        True,
    ),
    "empty_stream": (lambda w: [], S.INVALID_ARGUMENT, Reason.GARBAGE, False),
}


def _renamed(update):
    tensors = dict(update.tensors)
    tensors["delta/evil"] = tensors.pop("delta/b")
    return type(update)(update.round, update.slice, tensors)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_refusals_are_precise_counted_banned_and_never_delivered(case: str) -> None:
    wire = Wire()
    make_frames, status, reason, banned = CASES[case]
    result, server = _refusal_case(wire, make_frames(wire), expect_ban=banned)
    assert (result.code, result.reason) == (status, reason.value), result.details
    assert server.rejections == {reason: 1}
    assert wire.received == [] and server.accepted == 0
    if case in HEADER_REFUSALS:
        assert not result.responses, "a caller refused at its header gets nothing of ours"
    else:  # refused after its header was accepted: our reply streamed meanwhile, but never its tail
        assert_incomplete_reply(result.responses)


HEADER_REFUSALS = {"bad_signature", "signed_for_another_peer", "unknown_peer", "wrong_run", "incompatible_version",
                   "wrong_shape", "unknown_tensor", "unknown_slice", "oversize_header", "garbage_first_frame",
                   "chunk_before_header", "empty_stream"}  # fmt: skip
"""Refused at the header, before the go-ahead: no reply has started."""


def assert_incomplete_reply(responses: list[bytes]) -> None:
    """The reply frames a refused caller got end before the payload the reply's header announced (the tail
    waits for a delivered push, protocol/duplex.py): nothing it could check, let alone use."""
    if not responses:
        return
    header = pb.UpdateFrame.FromString(responses[0]).header
    got = sum(len(pb.UpdateFrame.FromString(raw).chunk) for raw in responses[1:])
    assert got < sum(t.payload_length for t in header.tensors), "a refused caller got a complete reply"


@pytest.mark.timeout(60)
def test_oversize_chunk_over_one_mebibyte() -> None:
    wire = Wire(shapes={"delta/w": (1100, 1024)})
    update = wire.update(1)
    payload = update.tensors["delta/w"].payload
    assert len(payload) > CHUNK_BYTES + 1
    frames = update_frames(update, chunks=[payload[: CHUNK_BYTES + 1]])  # the offending frame last
    result, server = _refusal_case(wire, frames, expect_ban=True)
    assert (result.code, result.reason) == (S.RESOURCE_EXHAUSTED, "oversize")
    assert server.rejections == {Reason.OVERSIZE: 1} and wire.received == []


@pytest.mark.timeout(60)
def test_replayed_round_is_refused_but_not_banned() -> None:
    wire = Wire()
    frames = update_frames(wire.update(4))
    older = update_frames(wire.update(3))
    result, server = _refusal_case(wire, frames, expect_ban=False, pre=[frames])
    assert (result.code, result.reason) == (S.FAILED_PRECONDITION, "replay")
    assert len(wire.received) == 1
    result, server = _refusal_case(wire, older, expect_ban=False, pre=[frames])
    assert (result.code, result.reason) == (S.FAILED_PRECONDITION, "replay")
    assert server.rejections == {Reason.REPLAY: 1}


@pytest.mark.timeout(60)
def test_banned_peer_is_refused_before_payload_and_ban_expires() -> None:
    wire = Wire()
    now = [1000.0]
    bans = BanList(duration_s=60, clock=lambda: now[0])
    bad = update_frames(_with_nan(wire))

    async def scenario():
        async with serving(wire, bans=bans) as server:
            channel = pinned_channel(server)
            try:
                first = await push_frames(channel, bad)
                refused = await push_frames(channel, update_frames(wire.update(2))[:1])
                now[0] += 61
                after = await push_frames(channel, update_frames(wire.update(3)))
            finally:
                await channel.close()
            return first, refused, after, server

    first, refused, after, server = run(scenario)
    assert first.reason == "non_finite"
    assert (refused.code, refused.reason) == (S.PERMISSION_DENIED, "banned")
    assert after.code is S.OK, after.details
    assert server.rejections == {Reason.NON_FINITE: 1, Reason.BANNED: 1}
    assert [u.round for u in wire.received] == [3]


@pytest.mark.timeout(60)
def test_client_maps_refusals_to_error_classes() -> None:
    wire = Wire()

    async def scenario():
        async with serving(wire) as server:
            async with connect(server, wire, run_id="cd" * 32) as client:
                with pytest.raises(RejectedUpdate) as wrong_run:
                    await client.exchange(wire.update(1))
            server.bans.ban(CLIENT_ID.peer_id, "test")
            async with connect(server, wire) as client:
                with pytest.raises(BannedPeer):
                    await client.exchange(wire.update(2))
            return wrong_run.value

    assert run(scenario).reason is Reason.WRONG_RUN


@pytest.mark.timeout(60)
def test_incompatible_version_info_is_refused_with_what_to_install() -> None:
    wire = Wire()

    async def scenario():
        async with serving(wire) as server:
            channel = pinned_channel(server)
            try:
                newer = pb.InfoRequest(protocol_major=PROTOCOL_MAJOR + 1).SerializeToString()
                old = await unary(channel, "Info", newer)
                empty = await unary(channel, "Info", b"")
                garbage = await unary(channel, "Info", b"\xff\xff\xff")
            finally:
                await channel.close()
            return old, empty, garbage, server

    old, empty, garbage, server = run(scenario)
    assert (old.code, old.reason) == (S.FAILED_PRECONDITION, "incompatible_version")
    assert "murmur" in old.details and "protocol" in old.details
    assert (empty.code, empty.reason) == (S.FAILED_PRECONDITION, "incompatible_version")
    assert (garbage.code, garbage.reason) == (S.INVALID_ARGUMENT, "garbage")
    assert server.rejections == {Reason.INCOMPATIBLE_VERSION: 2, Reason.GARBAGE: 1}
    with pytest.raises(IncompatibleVersion):
        from protocol.wire import error_from_status

        raise error_from_status(old.code, old.details, old.reason)


@pytest.mark.timeout(60)
def test_fetch_state_streams_weights_with_a_verified_hash() -> None:
    wire = Wire()
    shapes = {"emb": (300, 1024), "head.w": (1024, 700), "norm": (1024,)}  # ~3.8 MB: several chunks
    weights = {name: torch.randn(shape) for name, shape in shapes.items()}
    weights["norm"] = weights["norm"].bfloat16()
    weights["head.w"] = weights["head.w"].half()
    snapshot = make_state_snapshot(9, weights)

    async def scenario():
        async with serving(wire, state_provider=lambda: snapshot) as server, connect(server, wire) as client:
            state = await client.fetch_state(
                shapes, run_id=RUN_ID, public_key=SERVER_ID.public_key, expected_sha256=snapshot.content_sha256
            )
            with pytest.raises(RejectedUpdate) as forged:
                await client.fetch_state(shapes, run_id=RUN_ID, public_key=STRANGER_ID.public_key)
            with pytest.raises(RejectedUpdate) as other_hash:
                await client.fetch_state(
                    shapes, run_id=RUN_ID, public_key=SERVER_ID.public_key, expected_sha256=bytes(32)
                )
            with pytest.raises(RejectedUpdate) as other_run:
                await client.fetch_state(shapes, run_id="cd" * 32, public_key=SERVER_ID.public_key)
            with pytest.raises(RejectedUpdate) as wrong_shapes:
                await client.fetch_state({**shapes, "emb": (301, 1024)}, run_id=RUN_ID, public_key=SERVER_ID.public_key)
            return state, forged.value, other_hash.value, other_run.value, wrong_shapes.value

    state, forged, other_hash, other_run, wrong_shapes = run(scenario)
    assert state.round == 9 and state.sender == SERVER_ID.peer_id
    assert state.content_sha256 == snapshot.content_sha256
    for name, tensor in weights.items():
        assert state.tensors[name].dtype == tensor.dtype
        assert torch.equal(state.tensors[name], tensor), name
    assert forged.reason is Reason.BAD_SIGNATURE and other_hash.reason is Reason.BAD_SIGNATURE
    assert other_run.reason is Reason.WRONG_RUN and wrong_shapes.reason is Reason.WRONG_SHAPE
    assert len(list(chunked(e.payload for e in snapshot.tensors.values()))) >= 3


@pytest.mark.timeout(60)
def test_tls_pin_mismatch_fails() -> None:
    wire = Wire()

    async def scenario():
        async with serving(wire) as server:
            # The probe finds the server's real certificate, which is not the pinned one.
            with pytest.raises(PeerUnreachable, match="pinned"):
                async with connect(server, wire, tls_fingerprint=STRANGER_ID.tls_fingerprint):
                    pass
            # A pinned certificate handed over directly: grpc's handshake itself refuses the server.
            async with connect(
                server, wire, tls_fingerprint=STRANGER_ID.tls_fingerprint, tls_certificate=STRANGER_ID.tls_cert_pem
            ) as client:
                client.deadline = 3.0
                with pytest.raises(PeerUnreachable):
                    await client.info()
            with pytest.raises(PeerUnreachable, match="unreadable"):
                async with connect(server, wire, tls_certificate=b"-----BEGIN CERTIFICATE-----\nAAAA\n"):
                    pass
            # And the right pin, given directly, works.
            async with connect(server, wire, tls_certificate=SERVER_ID.tls_cert_pem) as client:
                return await client.info()

    assert run(scenario).peer_id == SERVER_ID.peer_id


@pytest.mark.slow(4)
@pytest.mark.timeout(120)
def test_50m_parameter_int8_exchange_wire_bytes_within_10_percent_of_payload() -> None:
    shapes = {"delta/w0": (4096, 4096), "delta/w1": (4096, 4096), "delta/w2": (4096, 4096), "delta/b": (128, 1024)}
    numel = sum(math.prod(s) for s in shapes.values())
    assert numel >= 50_000_000
    wire = Wire(shapes=shapes)
    push, pull = wire.update(1), wire.update(1001)
    payload_each = sum(len(e.payload) for e in push.tensors.values())

    async def scenario():
        async with serving(wire, reply_for=lambda r, s: pull) as server, CountingProxy(server.port) as proxy:
            async with PeerClient.connect(
                f"127.0.0.1:{proxy.port}",
                peer_id=SERVER_ID.peer_id,
                tls_fingerprint=SERVER_ID.tls_fingerprint,
                identity=CLIENT_ID,
                policy=wire.policy(),
                deadline=90.0,
            ) as client:
                started = time.perf_counter()
                reply = await client.exchange(push)
                elapsed = time.perf_counter() - started
            return reply, proxy.upstream, proxy.downstream, elapsed

    reply, upstream, downstream, elapsed = run(scenario)
    assert reply is not None and wire.received and wire.received[0].payload_bytes == payload_each
    assert_valid(wire.received[0], shapes)
    assert_valid(reply, shapes)
    ratio = (upstream + downstream) / (2 * payload_each)
    print(
        f"\n50M int8 push-pull: payload {payload_each} B each way; on the wire {upstream} B up, "
        f"{downstream} B down (TLS probe included); ratio {ratio:.4f}; {elapsed:.2f} s"
    )
    assert 1.0 <= ratio < 1.10
    assert upstream < payload_each * 1.10 and downstream < payload_each * 1.10


@pytest.mark.timeout(60)
def test_client_refuses_an_invalid_reply() -> None:
    wire = Wire()
    bad_reply = _with_nan(wire)

    async def scenario():
        async with serving(wire, reply_for=lambda r, s: bad_reply) as server, connect(server, wire) as client:
            with pytest.raises(RejectedUpdate) as refused:
                await client.exchange(wire.update(2))
            return refused.value

    assert run(scenario).reason is Reason.NON_FINITE
    assert len(wire.received) == 1, "the push itself was fine"


@pytest.mark.timeout(60)
def test_stalled_exchange_times_out_on_the_server_without_a_ban() -> None:
    wire = Wire()

    async def scenario():
        async with serving(wire, config=ServerConfig(exchange_timeout_s=0.5)) as server:
            channel = pinned_channel(server)
            try:
                frames = update_frames(wire.update(1))
                stalled = await push_frames(channel, frames[:-1], timeout=10.0, half_close=False)
                assert wire.received == []
                retry = await push_frames(channel, frames)
            finally:
                await channel.close()
            return stalled, retry, server

    stalled, retry, server = run(scenario)
    assert (stalled.code, stalled.reason) == (S.DEADLINE_EXCEEDED, "timeout")
    assert server.rejections == {Reason.TIMEOUT: 1}
    assert not server.bans.is_banned(CLIENT_ID.peer_id)
    assert retry.code is S.OK, "a retry of a round whose transfer died is not a replay"
    assert [u.round for u in wire.received] == [1]


@pytest.mark.timeout(10)
def test_replay_guard_and_ban_list() -> None:
    guard = ReplayGuard(max_entries=2)
    assert guard.claim("a", 0, 5) and not guard.claim("a", 0, 5) and not guard.claim("a", 0, 4)
    assert guard.claim("a", 1, 1), "slices are separate"
    guard.release("a", 0, 5, None)
    assert guard.claim("a", 0, 5)
    assert guard.claim("a", 0, 6)
    guard.release("a", 0, 5, None)  # stale release: a newer round stands
    assert guard.highest("a", 0) == 6
    assert guard.claim("b", 0, 1) and guard.highest("a", 1) is None, "oldest key dropped past max_entries"
    now = [0.0]
    bans = BanList(duration_s=10, clock=lambda: now[0])
    bans.ban("p", "test")
    assert bans.is_banned("p") and bans.banned() == ["p"] and not bans.is_banned("q")
    now[0] = 9.9
    assert bans.is_banned("p")
    now[0] = 10.0
    assert not bans.is_banned("p") and bans.banned() == []


# name: (weights served, server config, calls made, status and reason of the last, at most this many frames)
FETCH_REFUSALS = {
    "too_many_downloads": ((4,), ServerConfig(max_concurrent_fetches=0), 1, S.RESOURCE_EXHAUSTED, "rate_limited", 0),
    "overruns_the_server_budget": (  # 16 MiB: many chunks, cut off early
        (4096, 1024),
        ServerConfig(fetch_timeout_s=0.001),
        1,
        S.DEADLINE_EXCEEDED,
        "timeout",
        16,
    ),
    "address_over_its_calls": (
        (4,),
        ServerConfig(limits=Limits(calls_per_minute_per_address=2)),
        3,
        S.RESOURCE_EXHAUSTED,
        "over_limit",
        0,
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(FETCH_REFUSALS))
def test_fetch_state_refusals(case: str) -> None:
    shape, config, calls, status, reason, most_frames = FETCH_REFUSALS[case]
    wire = Wire()
    snapshot = make_state_snapshot(1, {"w": torch.randn(shape)})

    async def scenario():
        async with serving(wire, state_provider=lambda: snapshot, config=config) as server:
            channel = pinned_channel(server)
            try:
                request = pb.FetchStateRequest(protocol_major=PROTOCOL_MAJOR, run_id=RUN_ID).SerializeToString()
                return [await unary(channel, "FetchState", request) for _ in range(calls)][-1]
            finally:
                await channel.close()

    result = run(scenario)
    assert (result.code, result.reason) == (status, reason), (result.details, len(result.responses))
    assert len(result.responses) <= most_frames


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (TimeoutError("slow"), PeerTimeout),
        (ConnectionResetError("reset"), PeerUnreachable),
        (grpc.RpcError(), PeerUnreachable),
        (MalformedPayload(Reason.GARBAGE, "junk"), MalformedPayload),
    ],
)
def test_the_client_turns_every_transport_failure_into_a_murmur_error(
    raised: Exception, expected: type[Exception]
) -> None:
    """Callers of PeerClient catch MurmurError alone: sockets, timeouts and grpc never leak past it."""
    with pytest.raises(expected):
        with client_module._transport_errors("peer"):
            raise raised
