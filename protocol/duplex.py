"""The two halves of a full-duplex Exchange on the server: reading the push's chunks, writing our reply meanwhile.

Why full duplex: a push and its reply each need `payload / rate` on the link; one after the other an exchange
cannot beat twice that (benchmarks/README.md, exchange_speed). Links are full duplex, so once the caller's header
is accepted our reply streams while its chunks still land.

Why the reply's tail waits: the last TAIL_BYTES of the reply are written only after the push was delivered
(checked against its signed digest, decoded, handed to `on_update`). A reply is thus complete, and its digest
checkable, only for a caller whose update was taken, as when the reply followed the push: an older client that
reads the reply without looking at the call's status still gets no usable reply for a refused push, and a
receiver that failed to use the update (INTERNAL) sends no complete reply. The tail costs at most TAIL_BYTES
after the push; everything else overlaps it.

Why the reply stops between frames: grpc.aio can send no status on a call whose write was cancelled
(protocol/state.py), so a refusal waits up to STOP_WAIT_S for a write in flight before it aborts the call; only
a write that makes no progress that long (a caller that stopped reading) is cancelled, and the call then ends
without the refusal's reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import grpc

from protocol._generated import murmur_pb2 as pb
from protocol.errors import MalformedPayload, Reason
from protocol.incoming import IncomingPayload
from protocol.limits import Reservation
from protocol.updates import PlannedTensor, ReceivedUpdate, chunk_views
from protocol.wire import parse_message

TAIL_BYTES = 16 << 10
"""Reply bytes held back until the push was delivered (a small share of one chunk)."""
STOP_WAIT_S = 5.0
"""How long a refusal waits for a reply write in flight before cancelling it (losing the refusal's status)."""


async def read_header(requests: AsyncIterator[bytes]) -> pb.UpdateHeader:
    """The first frame of a push, which must be a header (not yet checked: the server does that)."""
    first = await anext(aiter(requests), None)
    if first is None:
        raise MalformedPayload(Reason.GARBAGE, "empty stream")
    frame = parse_message(pb.UpdateFrame, first)
    if frame.WhichOneof("body") != "header":
        raise MalformedPayload(Reason.GARBAGE, "a stream must start with a header")
    return frame.header


async def receive_push(
    requests: AsyncIterator[bytes], header: pb.UpdateHeader, planned: list[PlannedTensor], dtype: str,
    reservation: Reservation, truncated: Callable[[], None],
) -> ReceivedUpdate:
    """Read the caller's chunks until it half-closes, hashed and decoded as they land (protocol/incoming.py), and
    check them; raises a refusal. `truncated()` is called when the stream ended before every announced byte."""
    payload = IncomingPayload(planned, header.payload_sha256, dtype)
    try:
        async for raw in requests:
            payload.add(chunk_body(raw))  # refuses any byte beyond the announced total
        if payload.received < payload.total:
            # The caller half-closed early, or its connection died: grpc.aio ends the request stream the same way
            # for both (measured: not cancelled, not done), so an honest peer that vanished mid-push would be
            # banned, and its retry refused as a replay. Neither: the server refuses it unblamed and gives the
            # round back; deliberate truncation still costs the sender its rate budget.
            truncated()
        tensors = await payload.finish()
    finally:
        if (busy := payload.close()) is not None:
            reservation.release_when_done(busy)  # the worker holds chunks even if our caller goes away
    return ReceivedUpdate.from_header(header, tensors, payload.total)


_CHUNK_TAG = b"\x12"
"""UpdateFrame.chunk on the wire: field 2, length-delimited (protos/murmur.proto)."""


def chunk_frames(payloads: Iterable[bytes], tail: int = 0) -> Iterator[tuple[bytes, bool]]:
    """(serialised chunk frame, is_tail) for the concatenated `payloads`, cut as `chunked` cuts them, each frame
    built with one copy (protobuf copies a chunk three times: join, message, serialisation). With `tail`, the last
    `tail` bytes go in a frame of their own, the only one marked True."""
    previous: list[memoryview] | None = None
    for views in chunk_views(payloads):
        if previous is not None:
            yield _frame(previous), False
        previous = views
    if previous is None:
        return
    size = sum(map(len, previous))
    if 0 < tail < size:
        head, previous = _split(previous, size - tail)
        yield _frame(head), False
    yield _frame(previous), tail > 0


def chunk_body(raw: bytes) -> bytes | memoryview:
    """The chunk of a serialised UpdateFrame: a view, without a copy, when the frame is the plain encoding (tag,
    length, bytes); protobuf parses any other; MalformedPayload(GARBAGE) for what is not a chunk frame."""
    if raw[:1] == _CHUNK_TAG:
        length, shift = 0, 0
        for at in range(1, min(len(raw), 6)):
            length |= (raw[at] & 0x7F) << shift
            shift += 7
            if raw[at] < 0x80:
                if at + 1 + length == len(raw):
                    return memoryview(raw)[at + 1 :]
                break
    frame = parse_message(pb.UpdateFrame, raw)
    if frame.WhichOneof("body") != "chunk":
        raise MalformedPayload(Reason.GARBAGE, "expected a chunk")
    return frame.chunk


def _split(views: list[memoryview], at: int) -> tuple[list[memoryview], list[memoryview]]:
    """The first `at` bytes of `views`, and the rest (neither copied)."""
    head: list[memoryview] = []
    for index, view in enumerate(views):
        if at < len(view):
            return [*head, view[:at]], [view[at:], *views[index + 1 :]]
        head.append(view)
        at -= len(view)
    return head, []


def _frame(views: list[memoryview]) -> bytes:
    size, varint = sum(map(len, views)), bytearray()
    while size > 0x7F:
        varint.append(size & 0x7F | 0x80)
        size >>= 7
    varint.append(size)
    return b"".join([_CHUNK_TAG, varint, *views])


class ReplyWriter:
    """Our signed reply, written by its own task while the push is read: `start`, `deliver`, `finish`, `stop`."""

    def __init__(self, context: grpc.aio.ServicerContext, frames: Iterator[tuple[bytes, bool]],
                 seal: Callable[[], pb.UpdateHeader]) -> None:  # fmt: skip
        self._context = context
        self._frames = frames
        self._seal = seal
        self._go = asyncio.Event()
        """Set when the tail may follow (the push was delivered) or the reply must stop."""
        self._stopping = False
        self._task = asyncio.ensure_future(self._write_all())

    async def _write_all(self) -> None:
        header = await asyncio.to_thread(self._seal)  # hashes the reply once per update (OutgoingUpdate.digest)
        if self._stopping:
            return
        await self._context.write(pb.UpdateFrame(header=header).SerializeToString())
        for frame, is_tail in self._frames:
            if is_tail:
                await self._go.wait()
            if self._stopping:
                return
            await self._context.write(frame)

    def deliver(self) -> None:
        """The push was taken: the tail may follow."""
        self._go.set()

    async def finish(self) -> None:
        """Let the tail follow and wait until every frame was written (raises what a write raised)."""
        self.deliver()
        await asyncio.shield(self._task)  # a cancelled caller leaves the task to `stop`

    async def stop(self) -> None:
        """No further frame; a write in flight gets STOP_WAIT_S to end so that a status can still follow."""
        self._stopping = True
        self._go.set()
        if not self._task.done():
            await asyncio.wait({self._task}, timeout=STOP_WAIT_S)
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
        if not self._task.cancelled():
            self._task.exception()  # retrieved: the call is ending for another reason, which is reported
