"""FetchShard, the server half: a peer serves the files of its run's dataset that it holds verified.

Why peers serve data: the run owner's HTTP server is one machine; once it is gone, a newcomer would have nothing
to train on. Every peer already holds, verified against the chain of hashes (manifest -> dataset id ->
index.json -> each file's SHA-256, peer/core/fetch.py), the files its own stream reached, so it can hand them on
to whoever asks, and the asker needs to trust nobody: it checks the bytes against the hash it asked for.

What is served: exactly what `lookup(sha256)` returns, a path or None. The peer side (peer/core/fetch.py
`DatasetFetcher.lookup`) answers only for the current run's dataset files (index.json, tokenizer.json, a train
shard, the held-out shard) that it holds complete and verified, never a `.partial`, never anything else on
its disk: a request names a hash, never a path. This module knows nothing of datasets (protocol/ never imports
peer/).

Order of checks (cheap first): calls per minute of the address (the server's `admit_call`) -> parse ->
protocol version -> run id (WRONG_RUN) -> hash well formed (GARBAGE) -> `lookup` (NOT_FOUND) -> offset within
the file (GARBAGE) -> a free stream slot (RATE_LIMITED) -> the address's byte budget, charged per chunk
(OVER_LIMIT: the stream is cut, the caller resumes later or elsewhere; protocol/limits.py `ShardLimits`).
None of these is a ban: the caller is unauthenticated, and an honest one meets each of them.
File reads run in a worker thread; the event loop only writes frames.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc

from protocol._generated import murmur_pb2 as pb
from protocol.errors import (
    IncompatibleVersion,
    MalformedPayload,
    ProtocolViolation,
    RateLimited,
    Reason,
    RejectedUpdate,
)
from protocol.limits import ByteBudget, ShardLimits, address_of
from protocol.logs import get_logger
from protocol.updates import CHUNK_BYTES
from protocol.wire import REASON_KEY, STATUS_FOR_REASON, check_version, parse_message, reason_of

log = get_logger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
ShardLookup = Callable[[str], Path | None]
"""sha256 (lowercase hex) -> the verified file with that hash, or None when this peer does not hold one."""


def read_chunk(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes of `path` from `offset` (fewer at its end). Blocking: called in a worker thread."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


class ShardService:
    """The FetchShard handler of one PeerServer: see the module docstring. Touched only from the event loop."""

    def __init__(self, run_id: str, lookup: ShardLookup | None, admit_call: Callable[[str], None],
                 rejections: Counter[Reason], limits: ShardLimits | None = None) -> None:  # fmt: skip
        """`admit_call` and `rejections` are the PeerServer's: FetchShard counts against the same per-address
        call limit, and its refusals show among the server's."""
        self.run_id = run_id
        self.limits = limits or ShardLimits()
        self.budget = ByteBudget(self.limits)
        self.bytes_served = 0
        self._lookup = lookup or (lambda _sha: None)
        self._admit_call = admit_call
        self._rejections = rejections
        self._slots = asyncio.Semaphore(self.limits.max_streams)

    async def fetch_shard(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """The handler: header frame, then the file's bytes from the requested offset in chunks of <= 1 MiB."""
        address = address_of(context.peer())
        try:
            self._admit_call(address)
            path, offset, parsed = self._checked(request)
            if self._slots.locked():
                raise RateLimited(Reason.RATE_LIMITED, "too many dataset downloads from this peer; try another")
            async with self._slots:
                await asyncio.wait_for(self._send(context, path, offset, parsed.sha256, address),
                                       self.limits.timeout_s)  # fmt: skip
        except asyncio.TimeoutError:
            await self._refuse(context, RejectedUpdate(Reason.TIMEOUT, f"download took over {self.limits.timeout_s} s"))
        except (ProtocolViolation, IncompatibleVersion) as exc:
            await self._refuse(context, exc)

    def _checked(self, request: bytes) -> tuple[Path, int, pb.FetchShardRequest]:
        """(file, offset, request) of a request that passes every check before a byte is read; raises a refusal."""
        parsed = parse_message(pb.FetchShardRequest, request)
        check_version(parsed.protocol_major)
        if parsed.run_id != self.run_id:
            raise RejectedUpdate(Reason.WRONG_RUN, f"run {parsed.run_id[:16]!r}, this peer serves {self.run_id[:16]!r}")
        if not _SHA256.fullmatch(parsed.sha256):
            raise MalformedPayload(Reason.GARBAGE, "sha256 must be 64 lowercase hex digits")
        path = self._lookup(parsed.sha256)
        if path is None:
            raise RejectedUpdate(Reason.NOT_FOUND, f"no verified dataset file {parsed.sha256[:16]}… here")
        try:
            size = path.stat().st_size
        except OSError:  # gone since it was verified (the cache cleared): as good as never held
            raise RejectedUpdate(Reason.NOT_FOUND, f"dataset file {parsed.sha256[:16]}… is gone here") from None
        if parsed.offset > size:
            raise MalformedPayload(Reason.GARBAGE, f"offset {parsed.offset} beyond the file's {size} bytes")
        return path, parsed.offset, parsed

    async def _send(self, context: grpc.aio.ServicerContext, path: Path, offset: int, sha256: str,
                    address: str) -> None:  # fmt: skip
        size = path.stat().st_size
        await context.write(pb.ShardFrame(header=pb.ShardHeader(total_size=size, sha256=sha256, offset=offset)))
        position = offset
        while position < size:
            want = min(CHUNK_BYTES, size - position)
            self.budget.charge(address, want)
            chunk = await asyncio.to_thread(read_chunk, path, position, want)
            if not chunk:  # the file shrank under us: the caller's hash check will tell; end the stream here
                break
            await context.write(pb.ShardFrame(chunk=chunk))
            position += len(chunk)
            self.bytes_served += len(chunk)

    async def _refuse(self, context: grpc.aio.ServicerContext, error: ProtocolViolation | IncompatibleVersion) -> None:
        """Count and abort with the reason's status and `murmur-reason` (never a ban: the caller is unproven)."""
        reason = reason_of(error)
        self._rejections[reason] += 1
        log.debug("FetchShard refused %s to %s: %s", reason.value, context.peer(), error)
        metadata = ((REASON_KEY, reason.value),)
        await context.abort(STATUS_FOR_REASON[reason], str(error)[:500], trailing_metadata=metadata)
