"""The full-duplex Exchange: push and reply at once, payloads checked as they land, nothing half-applied.

What is proved here, and how:
- concurrency: a caller that sends half of its push and then waits gets the first chunk of the reply (a server
  that replied after the push, `ServerConfig(duplex=False)`, sends none: the negative control); updates larger
  than HTTP/2's flow-control windows cross both ways in one call in every pairing of full-duplex and serial
  (the order before full duplex) clients and servers;
- incremental checks: `IncomingPayload` gives exactly what decoding after the transfer gave, for any chunking,
  with the same blame (bytes that are not the signed ones are BAD_SIGNATURE even where a tensor also fails);
- nothing half-applied: a corrupted chunk, a caller killed (SIGKILL) or cancelled mid-push, a partner killed
  mid-reply: nothing delivered or returned, every reserved byte given back, no ban for a vanished caller, its
  round free for a retry, and the server serving on.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from conftest_wire import (
    CLIENT_ID,
    RUN_ID,
    SERVER_ID,
    STRANGER_ID,
    Wire,
    pinned_channel,
    push_frames,
    run,
    serving,
    until,
    update_frames,
)

from protocol._generated import murmur_pb2 as pb
from protocol.client import PeerClient
from protocol.codec import decode
from protocol.duplex import chunk_body, chunk_frames
from protocol.errors import MalformedPayload, MurmurError, Reason, RejectedUpdate
from protocol.incoming import IncomingPayload
from protocol.service import ServerConfig
from protocol.updates import (
    CHUNK_BYTES,
    OutgoingUpdate,
    PayloadBuffer,
    chunked,
    decode_payload,
    payload_digest,
    plan_payload,
    seal_update,
)
from protocol.wire import ACCEPT_KEY

S = grpc.StatusCode
BIG = {"delta/w": (4096, 2048), "delta/b": (2048,), "phi/w": (1024, 2048)}
"""About 10.6 MB of int8 each way: far over HTTP/2's windows (64 KiB, grown by BDP probing to a few MiB)."""
SMALL = {"delta/w": (64, 48), "delta/e": (0, 3), "delta/b": (48,), "phi/w": (64, 48)}
"""With an empty tensor, which no chunk completes."""
CHILD = Path(__file__).with_name("duplex_child.py")


def _client(server, wire: Wire, **kwargs) -> PeerClient:
    return PeerClient.connect(server.endpoint, peer_id=SERVER_ID.peer_id, tls_fingerprint=SERVER_ID.tls_fingerprint,
                              identity=CLIENT_ID, policy=wire.policy(), deadline=30.0, **kwargs)  # fmt: skip


def _assert_same(got: dict[str, torch.Tensor], sent: OutgoingUpdate, wire: Wire) -> None:
    assert list(got) == list(sent.tensors)
    for name, encoded in sent.tensors.items():
        torch.testing.assert_close(got[name], decode(encoded, wire.codec), rtol=0, atol=0)


def _feed(payload: IncomingPayload, data: bytes, rng: random.Random) -> None:
    at = 0
    while at < len(data):
        size = rng.choice([1, 7, 100, 4096, CHUNK_BYTES, rng.randint(1, CHUNK_BYTES)])
        payload.add(data[at : at + size])
        at += size


# ------------------------------------------------------------------------------------ incremental checks


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(4))
def test_incoming_payload_equals_decoding_after_the_transfer(seed: int) -> None:
    wire = Wire(shapes=dict(SMALL))
    update = wire.update(seed + 1)
    header = seal_update(update, identity=CLIENT_ID, run_id=RUN_ID, recipient=SERVER_ID.peer_id)
    planned = plan_payload(header.tensors, wire.shapes, wire.policy())
    data = b"".join(enc.payload for enc in update.tensors.values())

    async def scenario() -> dict[str, torch.Tensor]:
        payload = IncomingPayload(planned, header.payload_sha256, "float32")
        _feed(payload, data, random.Random(seed))
        return await payload.finish()

    got = run(scenario)
    buffer = PayloadBuffer(len(data))
    buffer.add(data)
    _assert_same(got, update, wire)
    after = decode_payload(planned, buffer, header.payload_sha256, "float32")
    assert all(torch.equal(got[name], after[name]) for name in after)


def _nan_update(wire: Wire) -> OutgoingUpdate:
    """delta/w's first scale is NaN: a tensor that does not decode, honestly signed."""
    update = wire.update(3)
    tensors = dict(update.tensors)
    bad = tensors["delta/w"]
    tensors["delta/w"] = type(bad)(bad.codec, bad.dtype, bad.shape, b"\x00\x00\xc0\x7f" + bad.payload[4:])
    return OutgoingUpdate(update.round, update.slice, tensors)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "case, error, reason",
    [
        ("signed_but_non_finite", RejectedUpdate, Reason.NON_FINITE),
        ("non_finite_and_not_the_signed_bytes", RejectedUpdate, Reason.BAD_SIGNATURE),
        ("one_byte_changed", RejectedUpdate, Reason.BAD_SIGNATURE),
        ("one_byte_short", MalformedPayload, Reason.GARBAGE),
        ("one_byte_too_many", MalformedPayload, Reason.OVERSIZE),
    ],
)
def test_incoming_payload_refuses_with_the_blame_of_the_serial_checks(case: str, error: type, reason: Reason) -> None:
    wire = Wire(shapes=dict(SMALL))
    update = _nan_update(wire) if "non_finite" in case else wire.update(3)
    header = seal_update(update, identity=CLIENT_ID, run_id=RUN_ID, recipient=SERVER_ID.peer_id)
    data = bytearray(b"".join(enc.payload for enc in update.tensors.values()))
    if case in ("non_finite_and_not_the_signed_bytes", "one_byte_changed"):
        data[-1] ^= 1
    data = {"one_byte_short": data[:-1], "one_byte_too_many": data + b"x"}.get(case, data)

    async def scenario() -> None:
        payload = IncomingPayload(plan_payload(header.tensors, wire.shapes, wire.policy()), header.payload_sha256,
                                  "float32")  # fmt: skip
        _feed(payload, bytes(data), random.Random(0))
        await payload.finish()

    with pytest.raises(error) as refused:
        run(scenario)
    assert refused.value.reason is reason


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sizes", [[5], [CHUNK_BYTES], [CHUNK_BYTES - 3, 10, 2 * CHUNK_BYTES + 7], [0, 300, 0]])
@pytest.mark.parametrize("tail", [0, 16, 4 << 10])
def test_chunk_frames_are_protobufs_frames_of_chunked(sizes: list[int], tail: int) -> None:
    """One copy instead of protobuf's three, the same bytes: every frame parses to `chunked`'s chunk (the last one
    split off `tail` bytes, when it is larger), and `chunk_body` reads them back without protobuf."""
    rng = random.Random(sum(sizes))
    payloads = [rng.randbytes(n) for n in sizes]
    frames = list(chunk_frames(payloads, tail))
    chunks = [pb.UpdateFrame.FromString(frame).chunk for frame, _ in frames]
    assert b"".join(chunks) == b"".join(payloads)
    expected = list(chunked(payloads))
    if tail and len(expected[-1]) > tail:
        expected[-1:] = [expected[-1][:-tail], expected[-1][-tail:]]
    assert chunks == expected and all(0 < len(c) <= CHUNK_BYTES for c in chunks)
    assert [is_tail for _, is_tail in frames] == [False] * (len(frames) - 1) + [bool(tail)]
    for frame, _ in frames:
        assert bytes(chunk_body(frame)) == pb.UpdateFrame.FromString(frame).chunk
        assert frame == pb.UpdateFrame(chunk=pb.UpdateFrame.FromString(frame).chunk).SerializeToString()


@pytest.mark.timeout(30)
def test_chunk_body_reads_any_encoding_and_refuses_what_is_not_a_chunk() -> None:
    assert bytes(chunk_body(b"\x12\x83\x00abc")) == b"abc"  # a non-minimal length: protobuf's reading
    assert bytes(chunk_body(b"\x12\x01x\x12\x02yz")) == b"yz"  # a repeated field: the last one, as protobuf
    assert bytes(chunk_body(b"\x12\x00")) == b""  # empty: IncomingPayload refuses it as GARBAGE
    for raw in [pb.UpdateFrame(header=pb.UpdateHeader(round=1)).SerializeToString(), b"\x12\x05ab", b"\xff\xff"]:
        with pytest.raises(MalformedPayload) as refused:
            chunk_body(raw)
        assert refused.value.reason is Reason.GARBAGE


@pytest.mark.timeout(30)
def test_an_update_is_hashed_once_for_all_its_seals() -> None:
    """The daemon seals one update for every partner and every reply of a round: the digest, a pass over every
    payload byte, is computed by the first seal (or by `digest()` in the training thread) and kept."""
    update = Wire().update(2)
    assert update.payload_sha256 is None
    expected = payload_digest(
        seal_update(update, identity=CLIENT_ID, run_id=RUN_ID, recipient=SERVER_ID.peer_id).tensors,
        (enc.payload for enc in update.tensors.values()),
    )
    assert update.payload_sha256 == expected == update.digest()
    again = seal_update(update, identity=CLIENT_ID, run_id=RUN_ID, recipient=STRANGER_ID.peer_id)
    assert again.payload_sha256 == expected and update == OutgoingUpdate(update.round, update.slice, update.tensors)
    changed = replace(update, tensors=dict(list(update.tensors.items())[:1]))  # as benchmarks/adversary_peers.py
    assert changed.payload_sha256 is None and changed.digest() != expected, "a copy never keeps a stale digest"


# ------------------------------------------------------------------------------------------ concurrency


async def _half_push_then_wait(server, frames: list[bytes], wait_s: float) -> tuple[bool, list[bytes], S]:
    """Header, half of the chunks, then wait up to `wait_s` for a reply chunk; then the rest. Returns whether a
    reply chunk came before the second half, every response, and the status."""
    channel = pinned_channel(server)
    try:
        call = channel.stream_stream("/murmur.v1.PeerService/Exchange", request_serializer=None,
                                     response_deserializer=None)(timeout=60)  # fmt: skip
        responses: list[bytes] = []
        first_chunk = asyncio.Event()

        async def read() -> None:
            async for raw in call:
                responses.append(raw)
                if pb.UpdateFrame.FromString(raw).WhichOneof("body") == "chunk":
                    first_chunk.set()

        await call.write(frames[0])
        assert (ACCEPT_KEY, "1") in tuple(await call.initial_metadata())
        reading = asyncio.ensure_future(read())
        half = 1 + (len(frames) - 1) // 2
        for frame in frames[1:half]:
            await call.write(frame)
        try:
            await asyncio.wait_for(first_chunk.wait(), wait_s)
        except asyncio.TimeoutError:
            pass
        early = first_chunk.is_set()
        for frame in frames[half:]:
            await call.write(frame)
        await call.done_writing()
        await reading
        return early, responses, await call.code()
    finally:
        await channel.close()


@pytest.mark.slow(8)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "serial_server"])
def test_the_reply_streams_while_the_push_is_still_being_sent(duplex: bool) -> None:
    wire = Wire(shapes=dict(BIG))
    push = wire.update(4)
    frames = update_frames(push)
    assert len(frames) > 8

    async def scenario():
        async with serving(wire, config=ServerConfig(duplex=duplex)) as server:
            # A serial server never replies before the push is complete: 2 s of waiting only confirm it.
            return await _half_push_then_wait(server, frames, wait_s=30.0 if duplex else 2.0)

    early, responses, code = run(scenario)
    assert code is S.OK
    assert early is duplex, "the reply's first chunk came while the push was half sent" if duplex else "serial"
    [got] = wire.received
    _assert_same(got.tensors, push, wire)
    header = pb.UpdateFrame.FromString(responses[0]).header
    body = b"".join(pb.UpdateFrame.FromString(raw).chunk for raw in responses[1:])
    assert len(body) == sum(t.payload_length for t in header.tensors) > 8 * CHUNK_BYTES


@pytest.mark.timeout(90)
@pytest.mark.parametrize("client_duplex, server_duplex", [(True, True), (False, True), (True, False), (False, False)])
def test_full_duplex_and_serial_peers_interoperate(client_duplex: bool, server_duplex: bool) -> None:
    """Updates larger than the flow-control windows, both ways: a serial client (the order before full duplex) against a
    full-duplex server, and a full-duplex client against a serial server, exchange as both full-duplex ones do."""
    wire = Wire(shapes=dict(BIG))
    push, reply = wire.update(5), wire.update(6, slice=1)

    async def scenario():
        async with serving(wire, reply_for=lambda r, s: reply, config=ServerConfig(duplex=server_duplex)) as server:
            async with _client(server, wire, duplex=client_duplex) as client:
                got = await client.exchange(push)
            await until(lambda: server.limiter.inflight_bytes == 0)
            return got

    got = run(scenario)
    assert (got.sender, got.round, got.slice) == (SERVER_ID.peer_id, 6, 1)
    _assert_same(got.tensors, reply, wire)
    [pushed] = wire.received
    _assert_same(pushed.tensors, push, wire)


# ------------------------------------------------------------------------------------ nothing half-applied


@pytest.mark.slow(8)
@pytest.mark.timeout(60)
def test_a_corrupted_chunk_is_refused_and_nothing_is_applied() -> None:
    wire = Wire(shapes=dict(BIG))
    push = wire.update(7)
    frames = update_frames(push)
    middle = pb.UpdateFrame.FromString(frames[4])
    middle.chunk = middle.chunk[:100] + bytes([middle.chunk[100] ^ 1]) + middle.chunk[101:]
    frames[4] = middle.SerializeToString()

    async def scenario():
        async with serving(wire) as server:
            channel = pinned_channel(server)
            try:
                result = await push_frames(channel, frames, timeout=30)
            finally:
                await channel.close()
            await until(lambda: server.limiter.inflight_bytes == 0 and server.limiter.tracked() <= 3)
            return result, server

    result, server = run(scenario)
    assert (result.code, result.reason) == (S.UNAUTHENTICATED, "bad_signature")
    assert wire.received == [] and server.accepted == 0 and server.rejections == {Reason.BAD_SIGNATURE: 1}
    assert server.bans.is_banned(CLIENT_ID.peer_id), "the signed sender sent bytes that are not the signed ones"
    header = pb.UpdateFrame.FromString(result.responses[0]).header
    got = sum(len(pb.UpdateFrame.FromString(raw).chunk) for raw in result.responses[1:])
    assert got < sum(t.payload_length for t in header.tensors), "the refused caller got no complete reply"


@pytest.mark.timeout(60)
def test_a_reply_whose_bytes_are_not_the_signed_ones_is_not_returned() -> None:
    wire = Wire(shapes=dict(BIG))
    reply = wire.update(8)
    forged = OutgoingUpdate(reply.round, reply.slice, reply.tensors)
    object.__setattr__(forged, "payload_sha256", bytes(32))  # a sender that signs the wrong hash

    async def scenario():
        async with serving(wire, reply_for=lambda r, s: forged) as server, _client(server, wire) as client:
            with pytest.raises(RejectedUpdate) as refused:
                await client.exchange(wire.update(9))
            return refused.value

    assert run(scenario).reason is Reason.BAD_SIGNATURE
    assert len(wire.received) == 1, "our push itself was taken"


def _write_child_files(folder: Path, me, other) -> None:
    folder.mkdir(exist_ok=True)
    me.save(folder / "me.id")
    other.save(folder / "other.id")
    (folder / "shapes.json").write_text(json.dumps(BIG))


async def _child(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, str(CHILD), *argv, stdout=asyncio.subprocess.PIPE)


async def _line(child: asyncio.subprocess.Process) -> str:
    line = await asyncio.wait_for(child.stdout.readline(), 60)
    assert line, "the child died"
    return line.decode().strip()


async def _kill(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        child.send_signal(signal.SIGKILL)
    await child.wait()


@pytest.mark.slow(10)
@pytest.mark.timeout(90)
def test_a_caller_killed_mid_push_leaves_no_trace(tmp_path: Path) -> None:
    wire = Wire(shapes=dict(BIG))
    _write_child_files(tmp_path, CLIENT_ID, SERVER_ID)

    async def scenario():
        async with serving(wire) as server:
            child = await _child("push", str(tmp_path), server.endpoint)
            try:
                assert await _line(child) == "pushed"
                await until(lambda: server.limiter.inflight_bytes > 0)
            finally:
                await _kill(child)
            await until(lambda: server.limiter.inflight_bytes == 0, timeout=30)
            assert wire.received == [] and server.accepted == 0
            assert not server.bans.is_banned(CLIENT_ID.peer_id), "a vanished caller is nobody's fault"
            async with _client(server, wire) as client:  # the same round again: not a replay, and served
                retry = await client.exchange(OutgoingUpdate(1, 0, wire.update(1).tensors))
            return retry, server

    retry, server = run(scenario)
    assert retry is not None and [u.round for u in wire.received] == [1]
    assert server.limiter.inflight_bytes == 0


@pytest.mark.timeout(60)
def test_a_caller_cancelled_mid_push_leaves_no_trace() -> None:
    wire = Wire(shapes=dict(BIG))
    frames = update_frames(wire.update(2))

    async def scenario():
        async with serving(wire) as server:
            channel = pinned_channel(server)
            try:
                call = channel.stream_stream("/murmur.v1.PeerService/Exchange", request_serializer=None,
                                             response_deserializer=None)(timeout=30)  # fmt: skip
                await call.write(frames[0])
                await call.initial_metadata()
                for frame in frames[1:4]:
                    await call.write(frame)
                await until(lambda: server.limiter.inflight_bytes > 0)
                call.cancel()
            finally:
                await channel.close()
            await until(lambda: server.limiter.inflight_bytes == 0, timeout=30)
            async with _client(server, wire) as client:
                await client.exchange(wire.update(2))
            return server

    server = run(scenario)
    assert [u.round for u in wire.received] == [2] and server.accepted == 1
    assert not server.bans.is_banned(CLIENT_ID.peer_id)


@pytest.mark.slow(10)
@pytest.mark.timeout(90)
def test_a_partner_killed_mid_reply_gives_the_caller_nothing(tmp_path: Path) -> None:
    wire = Wire(shapes=dict(BIG))
    _write_child_files(tmp_path, SERVER_ID, CLIENT_ID)

    async def scenario():
        child = await _child("serve", str(tmp_path))
        try:
            port = int((await _line(child)).split()[1])
            client_cm = PeerClient.connect(f"127.0.0.1:{port}", peer_id=SERVER_ID.peer_id, identity=CLIENT_ID,
                                           tls_fingerprint=SERVER_ID.tls_fingerprint, policy=wire.policy(),
                                           tls_certificate=SERVER_ID.tls_cert_pem, deadline=60.0)  # fmt: skip
            async with client_cm as client:
                exchange = asyncio.ensure_future(client.exchange(wire.update(3)))
                assert await _line(child) == "delivered"  # the partner took our push; its reply waits for that
                await until(lambda: client.bytes_received > 8 * CHUNK_BYTES, timeout=30)  # most of the reply came
                assert not exchange.done()
                await _kill(child)
                with pytest.raises(MurmurError):
                    await exchange
        finally:
            await _kill(child)

    run(scenario)
