"""An update's payload as its chunks land: hashed in order, each tensor decoded once its last byte came.

Why: a push and its reply each need the link's time, and an exchange streams both at once (protocol/service.py,
protocol/client.py); checking and decoding only after the last chunk would add a CPU pass after the transfer
(SHA-256 and int8 decoding of a `124m` update: benchmarks/README.md, exchange_speed). Here the event loop only
checks sizes and queues each chunk; one worker at a time (a thread, so the loop never does tensor work) takes the
queued chunks in order, feeds the SHA-256 (`digest_start`: the same digest the sender signed) and the current
tensor's buffer, and decodes each tensor as soon as it is complete.

Nothing is usable before `finish`: every announced byte must have come and the digest must equal the signed one,
else RejectedUpdate(BAD_SIGNATURE) and the tensors decoded so far are dropped with this object. A decoding
failure (non-finite values, bad indices) is kept and raised only after the digest matched, so what the sender
is blamed for is exactly what it was blamed for when decoding followed the transfer: bytes that are not the
signed ones are BAD_SIGNATURE, signed bytes that do not decode are the decoder's reason.

Memory: the caller reserves the announced total before the first chunk (protocol/limits.py); queued chunks and
the bytes of the tensor being filled are dropped as soon as the worker used them, and the decoded tensors are
what a receiver keeps anyway. `close()` returns the worker still running, if any, so that the reservation is
given back only when the thread no longer holds the bytes.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import torch

from protocol.codec import Encoded, decode
from protocol.errors import MalformedPayload, ProtocolViolation, Reason, RejectedUpdate
from protocol.updates import CHUNK_BYTES, PlannedTensor, digest_start


class IncomingPayload:
    """The chunks of one update (`add` on the event loop), checked and decoded by `await finish()`."""

    def __init__(self, planned: Sequence[PlannedTensor], signed_digest: bytes, dtype: str | None) -> None:
        self.planned = list(planned)
        self.total = sum(p.entry.payload_length for p in self.planned)
        self.received = 0
        """Bytes accepted by `add` so far (the worker may still be behind)."""
        self._signed = signed_digest
        self._dtype = dtype
        self._hash = digest_start([p.entry for p in self.planned])
        self._queue: list[bytes] = []
        self._worker: asyncio.Task | None = None
        self._closed = False
        # Touched by the worker thread only (one at a time, in chunk order):
        self._index = 0
        self._filled = 0
        self._current: bytearray | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._error: ProtocolViolation | None = None

    def add(self, chunk: bytes) -> None:
        """Queue one chunk; raises MalformedPayload (GARBAGE for empty, OVERSIZE for too big or past the total)."""
        if not chunk:
            raise MalformedPayload(Reason.GARBAGE, "empty chunk")
        if len(chunk) > CHUNK_BYTES:
            raise MalformedPayload(Reason.OVERSIZE, f"chunk of {len(chunk)} bytes, at most {CHUNK_BYTES}")
        if self.received + len(chunk) > self.total:
            raise MalformedPayload(Reason.OVERSIZE, f"more than the {self.total} bytes the header announced")
        self.received += len(chunk)
        if self._closed:
            return
        self._queue.append(chunk)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._pump())

    async def finish(self) -> dict[str, torch.Tensor]:
        """The decoded tensors, in header order, once every byte came and the digest is the signed one."""
        if self.received != self.total:
            raise MalformedPayload(Reason.GARBAGE, f"stream ended after {self.received} of {self.total} bytes")
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)  # a cancelled caller leaves the thread to finish (see `close`)
        if self._worker is not None:
            self._worker.result()  # a bug in the worker surfaces here, not as a silently short update
        if self._index < len(self.planned):  # empty tensors after the last byte
            await asyncio.to_thread(self._take, [])
        if self._hash.digest() != self._signed:
            raise RejectedUpdate(Reason.BAD_SIGNATURE, "payload does not match its signed hash")
        if self._error is not None:
            raise self._error
        return self._tensors

    def close(self) -> asyncio.Task | None:
        """Stop taking chunks and drop the queued ones; the worker still running (hold the reservation until it
        ends), or None."""
        self._closed = True
        self._queue.clear()
        worker = self._worker
        return worker if worker is not None and not worker.done() else None

    async def _pump(self) -> None:
        while self._queue and not self._closed:
            batch, self._queue = self._queue, []
            await asyncio.to_thread(self._take, batch)

    def _take(self, batch: list[bytes]) -> None:
        """In the worker thread: hash the chunks and fill (then decode) tensors, in order."""
        self._skip_empty()
        for chunk in batch:
            self._hash.update(chunk)
            view = memoryview(chunk)
            while view:  # `add` lets no byte past the total in, so a tensor is always being filled here
                length = self.planned[self._index].entry.payload_length
                piece = view[: length - self._filled]
                view = view[len(piece) :]
                if self._filled == 0 and len(piece) == length:  # the whole tensor in this chunk: no copy
                    self._complete(piece)
                    continue
                if self._current is None:
                    self._current = bytearray(length)
                self._current[self._filled : self._filled + len(piece)] = piece
                self._filled += len(piece)
                if self._filled == length:
                    self._complete(memoryview(self._current))

    def _complete(self, payload: memoryview) -> None:
        self._decode(self.planned[self._index], payload)
        self._index, self._filled, self._current = self._index + 1, 0, None
        self._skip_empty()

    def _skip_empty(self) -> None:
        """Decode the tensors of no bytes at the current position: no chunk completes them."""
        while self._index < len(self.planned) and self.planned[self._index].entry.payload_length == 0:
            self._decode(self.planned[self._index], memoryview(b""))
            self._index += 1

    def _decode(self, item: PlannedTensor, payload: memoryview) -> None:
        if self._error is not None:
            return  # the update is lost already: the rest is only hashed (for the right blame), not decoded
        entry = item.entry
        try:
            self._tensors[entry.name] = decode(
                Encoded(entry.codec, entry.dtype, item.shape, payload), item.config, expected_shape=item.shape,
                expected_dtype=self._dtype, max_numel=math.prod(item.shape),
            )  # fmt: skip
        except (MalformedPayload, RejectedUpdate) as exc:
            self._error = exc
