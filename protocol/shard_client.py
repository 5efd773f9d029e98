"""FetchShard, the client half: one dataset file from a peer, appended to a `.partial` file, resumed from its size.

The connection is PeerClient's (protocol/client.py): TLS pinned to the fingerprint the peer announced, a deadline
on the call, grpc's errors turned into murmur's. What arrives is checked as it comes (the header names the
file asked for, its size is the one expected, the chunks never run past it) and, by the caller, against the
SHA-256 once complete (peer/core/fetch.py, exactly as for a file fetched over HTTP): a peer that sends other
bytes wastes one download and is refused, nothing more. File writes run in a worker thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from protocol import PROTOCOL_MAJOR
from protocol._generated import murmur_pb2 as pb
from protocol.client import PeerClient, _transport_errors
from protocol.errors import MalformedPayload, Reason
from protocol.wire import SERVICE_NAME, parse_message

_PATH = f"/{SERVICE_NAME}/FetchShard"
MAX_UNSIZED_BYTES = 64 << 20
"""The most a file whose size the index does not give (index.json, tokenizer.json) may be: a lying peer could
otherwise fill the disk with one of them until the call's deadline, before the hash check refuses it."""


def _append(partial: Path, data: bytes) -> None:
    with partial.open("ab") as f:
        f.write(data)


def _resume_from(partial: Path, size: int | None) -> int:
    """Bytes of `partial` to keep: all of them, unless there are more than the file has (then none)."""
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        return 0
    return have


class ShardClient(PeerClient):
    """A PeerClient that also fetches dataset files: `async with ShardClient.connect(...) as client`."""

    async def fetch_shard(self, *, run_id: str, sha256: str, partial: Path, size: int | None = None) -> int:
        """Append the rest of the file `sha256` (of run `run_id`'s dataset) to `partial`, from its current size;
        the number of bytes received. `size`, when known (a shard's, from the index), must be the peer's too.
        Raises a MurmurError: the peer's refusal (`reason` NOT_FOUND when it does not hold the file), a transport
        failure, or MalformedPayload when what it sends is not what was asked for."""
        offset = await asyncio.to_thread(_resume_from, partial, size)
        if size is not None and offset == size:
            return 0
        request = pb.FetchShardRequest(protocol_major=PROTOCOL_MAJOR, run_id=run_id, sha256=sha256, offset=offset)
        call = self._channel.unary_stream(_PATH, request_serializer=None, response_deserializer=None)(
            request.SerializeToString(), timeout=self.deadline
        )
        received = 0
        try:
            with _transport_errors(self.peer_id[:16]):
                first = await self._read(call)
                if first is None:
                    raise MalformedPayload(Reason.GARBAGE, "shard stream ended before its header")
                total = self._checked_header(parse_message(pb.ShardFrame, first), sha256, offset, size)
                while (raw := await self._read(call)) is not None:
                    frame = parse_message(pb.ShardFrame, raw)
                    if frame.WhichOneof("body") != "chunk" or not frame.chunk:
                        raise MalformedPayload(Reason.GARBAGE, "expected a non-empty chunk")
                    if offset + received + len(frame.chunk) > total:
                        raise MalformedPayload(Reason.OVERSIZE, f"more bytes than the {total} announced")
                    await asyncio.to_thread(_append, partial, frame.chunk)
                    received += len(frame.chunk)
        finally:
            call.cancel()
        return received

    @staticmethod
    def _checked_header(frame: pb.ShardFrame, sha256: str, offset: int, size: int | None) -> int:
        """The file's total size from a header that names the file asked for, from the offset asked for."""
        if frame.WhichOneof("body") != "header":
            raise MalformedPayload(Reason.GARBAGE, "a shard stream must start with a header")
        header = frame.header
        if header.sha256 != sha256 or header.offset != offset:
            raise MalformedPayload(Reason.GARBAGE, "the header names another file or offset than asked for")
        if header.total_size < offset or (size is not None and header.total_size != size):
            raise MalformedPayload(Reason.GARBAGE, f"announced {header.total_size} bytes, expected {size}")
        if size is None and header.total_size > MAX_UNSIZED_BYTES:
            raise MalformedPayload(Reason.OVERSIZE, f"announced {header.total_size} bytes for a file of at most "
                                                    f"{MAX_UNSIZED_BYTES >> 20} MiB")  # fmt: skip
        return header.total_size
