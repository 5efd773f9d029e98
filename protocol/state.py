"""FetchState, the serving half: what a peer streams to a late joiner (DESIGN.md: late join).

The server (protocol/service.py) checks the request and the limits; this module builds the signed header
and streams header and chunks within the download budget, so the service reads as the order of its checks.
"""

from __future__ import annotations

import asyncio
import itertools

import grpc

from protocol._generated import murmur_pb2 as pb
from protocol.identity import Identity, state_signing_bytes
from protocol.updates import StateSnapshot, chunked

WRITE_STALL_S = 30.0
"""How long past its budget one frame's write may hang before the stream is cut without a status."""


class WriteStalled(Exception):
    """A reader stopped reading mid-stream; the call ends without a status (see `stream_state`)."""


def state_header(identity: Identity, run_id: str, snapshot: StateSnapshot) -> pb.StateHeader:
    """The signed header of a state download: what the late joiner verifies before it reads a byte more."""
    signed = state_signing_bytes(
        run_id=run_id,
        round=snapshot.round,
        content_sha256=snapshot.content_sha256,
        sender=identity.peer_id,
    )
    return pb.StateHeader(
        run_id=run_id,
        round=snapshot.round,
        sender=identity.peer_id,
        tensors=snapshot.entries,
        content_sha256=snapshot.content_sha256,
        signature=identity.sign(signed),
    )


async def stream_state(context: grpc.aio.ServicerContext, header: pb.StateHeader, snapshot: StateSnapshot,
                       budget_s: float) -> None:  # fmt: skip
    """Header, then chunks, within `budget_s` (the server's fetch_timeout_s); TimeoutError, which the server
    refuses with a status, once it is spent.

    The budget is checked between frames instead of by cancelling the stream: grpc.aio can send no status
    on a call whose write was cancelled (the abort fails with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), so
    the downloader would wait out its own deadline instead of hearing `timeout`. Only a write stuck
    WRITE_STALL_S past the budget (a reader that stopped reading) is cancelled: `WriteStalled`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    frames = (pb.StateFrame(chunk=chunk) for chunk in chunked(enc.payload for enc in snapshot.tensors.values()))
    for frame in itertools.chain([pb.StateFrame(header=header)], frames):
        left = deadline - loop.time()
        if left <= 0:
            raise asyncio.TimeoutError
        try:
            await asyncio.wait_for(context.write(frame), left + WRITE_STALL_S)
        except asyncio.TimeoutError:
            raise WriteStalled(f"a write made no progress for {left + WRITE_STALL_S:.0f} s") from None
