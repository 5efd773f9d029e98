"""Shared pieces of the wire tests: two identities, a policy, a server on 127.0.0.1, raw calls.

Imported explicitly by the wire, fuzz, limits and metrics tests (not an autouse conftest).
Every coroutine runs under uvloop through `run`, which also closes the loop, so nothing is left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch
import uvloop

from protocol.codec import CodecConfig, Encoded, encode
from protocol.identity import TLS_SERVER_NAME, Identity
from protocol.service import PeerServer, PeerStatus
from protocol.updates import OutgoingUpdate, ReceivedUpdate, WirePolicy, seal_update
from protocol.wire import ACCEPT_KEY, CHANNEL_OPTIONS, reason_from_metadata

T = TypeVar("T")

RUN_ID = "ab" * 32
SHAPES = {"delta/w": (64, 48), "delta/b": (48,), "phi/w": (64, 48)}
PATH = "/murmur.v1.PeerService/"
# One pair of identities for the whole session: key generation is cheap, but certificates are not free.
SERVER_ID = Identity.generate()
CLIENT_ID = Identity.generate()
STRANGER_ID = Identity.generate()


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function on a fresh uvloop loop and close it (and its executor) afterwards."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_fn())


@dataclass
class Wire:
    """A server-side policy, the keys it knows, and what its callback received."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(SHAPES))
    keys: dict[str, bytes] = field(
        default_factory=lambda: {SERVER_ID.peer_id: SERVER_ID.public_key, CLIENT_ID.peer_id: CLIENT_ID.public_key}
    )
    received: list[ReceivedUpdate] = field(default_factory=list)
    codec: CodecConfig = field(default_factory=CodecConfig)

    def policy(self, run_id: str = RUN_ID) -> WirePolicy:
        return WirePolicy(
            run_id=run_id,
            expected_shapes=lambda s: self.shapes if s in (0, 1) else None,
            lookup=self.keys.get,
            codec=self.codec,
        )

    async def on_update(self, update: ReceivedUpdate) -> None:
        self.received.append(update)

    def update(
        self, round: int, slice: int = 0, scale: float = 1.0, names: Sequence[str] | None = None
    ) -> OutgoingUpdate:
        gen = torch.Generator().manual_seed(round * 7919 + slice)
        tensors = {
            name: encode(torch.randn(shape, generator=gen) * scale, self.codec)
            for name, shape in self.shapes.items()
            if names is None or name in names
        }
        return OutgoingUpdate(round, slice, tensors)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds: a server's (or any task's) state moves between our awaits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def serving(wire: Wire, **kwargs: Any) -> AsyncIterator[PeerServer]:
    """A started PeerServer of SERVER_ID on 127.0.0.1:0 that replies with its own round-r update."""
    kwargs.setdefault("reply_for", lambda round, slice: wire.update(round + 1000, slice))
    kwargs.setdefault("status", lambda: PeerStatus(round=5, slice=1, health="ok"))
    server = PeerServer(identity=SERVER_ID, policy=wire.policy(), on_update=wire.on_update, **kwargs)
    async with server:
        yield server


def pinned_channel(server: PeerServer) -> grpc.aio.Channel:
    """A raw channel to `server`, trusting exactly its certificate."""
    credentials = grpc.ssl_channel_credentials(root_certificates=server.identity.tls_cert_pem)
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
    return grpc.aio.secure_channel(server.endpoint, credentials, options=options)


@dataclass
class Outcome:
    """How a raw call ended."""

    code: grpc.StatusCode
    reason: str | None
    details: str
    responses: list[bytes]
    write_raced: bool = False
    """One of our writes was in flight when the server ended the call: grpc.aio then replaces the server's
    status with a local INTERNAL "Internal error from Core" (grpc/grpc#36066), so `code` is not the server's."""


async def push_frames(
    channel: grpc.aio.Channel, frames: Sequence[bytes], timeout: float = 10.0, half_close: bool = True
) -> Outcome:
    """Send raw Exchange frames the way PeerClient does, read every response, report status and reason.

    After the first frame it waits for the server's go-ahead (`murmur-accept`) and sends nothing more
    without it. A refusal caused by a later frame is only reported intact when that frame is the last
    one: grpc.aio turns a write that races the server's final status into a local INTERNAL, which is
    reported as `write_raced` (see `Outcome`).
    """
    call = channel.stream_stream(PATH + "Exchange", request_serializer=None, response_deserializer=None)(
        timeout=timeout
    )
    write_raced = False
    try:
        for index, frame in enumerate(frames):
            await call.write(frame)
            if index == 0 and (ACCEPT_KEY, "1") not in tuple(await call.initial_metadata() or ()):
                break
        else:
            if half_close:
                await call.done_writing()
    except asyncio.InvalidStateError:
        pass  # the server ended the call before this write; its status says why
    except grpc.aio.AioRpcError as exc:
        # A write fails with a status only when the call ended under it: INTERNAL is then grpc.aio's local
        # "Failed execute_batch (SendMessageOperation)", written over the status the server sent (the
        # server's own INTERNAL, on_update failing, comes after we half-closed, when no write is in flight).
        write_raced = exc.code() is grpc.StatusCode.INTERNAL
    responses: list[bytes] = []
    try:
        async for raw in call:
            responses.append(raw)
    except grpc.aio.AioRpcError:
        pass
    return await outcome(call, responses, write_raced)


async def unary(channel: grpc.aio.Channel, method: str, request: bytes, timeout: float = 10.0) -> Outcome:
    """A raw unary (Info) or unary-stream (FetchState) call with bytes in and bytes out."""
    if method == "Info":
        call = channel.unary_unary(PATH + method, request_serializer=None, response_deserializer=None)(
            request, timeout=timeout
        )
        try:
            responses = [await call]
        except grpc.aio.AioRpcError:
            responses = []
        return await outcome(call, responses)
    call = channel.unary_stream(PATH + method, request_serializer=None, response_deserializer=None)(
        request, timeout=timeout
    )
    responses = []
    try:
        async for raw in call:
            responses.append(raw)
    except grpc.aio.AioRpcError:
        pass
    return await outcome(call, responses)


async def outcome(call: grpc.aio.Call, responses: list[bytes], write_raced: bool = False) -> Outcome:
    code = await call.code()
    reason = reason_from_metadata(await call.trailing_metadata())
    return Outcome(code, reason, await call.details() or "", responses, write_raced)


def update_frames(
    update: OutgoingUpdate,
    *,
    sender: Identity = CLIENT_ID,
    recipient: Identity = SERVER_ID,
    run_id: str = RUN_ID,
    chunks: Sequence[bytes] | None = None,
) -> list[bytes]:
    """A signed update's frames, as a well-behaved client would send them (or with `chunks` instead)."""
    from protocol._generated import murmur_pb2 as pb
    from protocol.updates import chunked

    header = seal_update(update, identity=sender, run_id=run_id, recipient=recipient.peer_id)
    body = chunks if chunks is not None else list(chunked(e.payload for e in update.tensors.values()))
    return [pb.UpdateFrame(header=header).SerializeToString()] + [
        pb.UpdateFrame(chunk=c).SerializeToString() for c in body
    ]


def replace_payload(
    update: OutgoingUpdate, name: str, payload: bytes, shape: tuple[int, ...] | None = None
) -> OutgoingUpdate:
    """`update` with one tensor's payload (and optionally shape) swapped, still to be signed honestly."""
    old = update.tensors[name]
    tensors = dict(update.tensors)
    tensors[name] = Encoded(old.codec, old.dtype, shape or old.shape, payload)
    return OutgoingUpdate(update.round, update.slice, tensors)


def assert_valid(update: ReceivedUpdate, shapes: dict[str, tuple[int, ...]]) -> None:
    """What every update that reaches a callback must satisfy."""
    assert update.tensors, "empty update delivered"
    for name, tensor in update.tensors.items():
        assert tuple(tensor.shape) == shapes[name], name
        assert tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts every byte each way: what really crosses the wire
    (TLS records, HTTP/2 frames, gRPC framing, protobuf and payload, handshakes included)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream = 0  # client -> server
        self.downstream = 0  # server -> client
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(self._pump(reader, up_writer, True), self._pump(up_reader, writer, False))
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(1 << 18):
                if up:
                    self.upstream += len(data)
                else:
                    self.downstream += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the other side went away; the pump's job is done
        finally:
            writer.close()
