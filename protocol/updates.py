"""Signed, chunked tensor streams: what an update and a state snapshot are, and how both sides check them.

An update stream is one `UpdateHeader` frame followed by chunk frames (each 1..CHUNK_BYTES bytes) that
carry the tensors' codec payloads back to back, in header order. The header announces every tensor's
name, codec, dtype, shape and payload length, the SHA-256 of all that (`payload_digest`) and the
sender's signature over it. A receiver therefore knows, before it reads a single chunk, whether the
sender is known, whether the signature checks, and exactly how many bytes may follow; the stream is cut
off the moment it exceeds them. The same checks serve the server (incoming push) and the client
(the pulled reply), and with small changes the FetchState stream.

Everything here is synchronous; the service runs the heavy parts (`seal_update`, `decode_payload`,
`make_state_snapshot`) in a worker thread so the event loop never does tensor work.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from protocol import PROTOCOL_MAJOR
from protocol._generated import murmur_pb2 as pb
from protocol.codec import CodecConfig, Encoded, decode, encode, payload_size
from protocol.errors import MalformedPayload, Reason, RejectedUpdate
from protocol.identity import Identity, update_signing_bytes, verify

CHUNK_BYTES = 1 << 20
"""Most payload bytes in one chunk frame."""
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
"""grpc's per-message receive limit: a full chunk plus framing, or a header with thousands of tensors."""

Shape = tuple[int, ...]
ShapeTable = Mapping[str, Shape]


@dataclass(frozen=True, slots=True)
class OutgoingUpdate:
    """One round's update for one slice, already encoded (the caller owns error feedback)."""

    round: int
    slice: int
    tensors: Mapping[str, Encoded]
    """Name -> encoded tensor; names come from the manifest's shape table for `slice`."""
    payload_sha256: bytes | None = field(default=None, init=False, compare=False, repr=False)
    """`payload_digest` of `tensors`, computed by the first `digest()` and kept: the daemon sends one update to
    all its partners and as every reply of a round, and the digest (a pass over every payload byte) does not
    depend on the recipient. Not an argument, so that `dataclasses.replace` never carries a stale one."""

    def digest(self) -> bytes:
        """The payload's SHA-256 (blocking the first time: hashes every payload; call it off the event loop)."""
        if self.payload_sha256 is None:
            digest = payload_digest(_entries(self.tensors), (enc.payload for enc in self.tensors.values()))
            object.__setattr__(self, "payload_sha256", digest)  # a cache of a pure function of `tensors`
        return self.payload_sha256  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ReceivedUpdate:
    """A validated update: signature checked, shapes as the table says, every value finite."""

    sender: str
    run_id: str
    round: int
    slice: int
    tensors: dict[str, torch.Tensor]
    payload_sha256: bytes
    payload_bytes: int
    """Codec payload bytes received (the sum of the header's payload lengths)."""

    @classmethod
    def from_header(
        cls, header: pb.UpdateHeader, tensors: dict[str, torch.Tensor], payload_bytes: int
    ) -> ReceivedUpdate:
        """The update a verified header and its decoded tensors describe."""
        return cls(
            sender=header.sender,
            run_id=header.run_id,
            round=header.round,
            slice=header.slice,
            tensors=tensors,
            payload_sha256=header.payload_sha256,
            payload_bytes=payload_bytes,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class WirePolicy:
    """What a peer accepts, from plain inputs: no training knowledge.

    `expected_shapes(slice)` returns the manifest's name -> shape table of what an update for that
    slice may carry (e.g. "delta/<param>" and "phi/<param>" entries), or None for a slice that does
    not exist; an update carries any non-empty subset of it. `lookup(peer_id)` returns the raw
    Ed25519 public key of a known peer or None.
    """

    run_id: str
    expected_shapes: Callable[[int], ShapeTable | None]
    lookup: Callable[[str], bytes | None]
    codec: CodecConfig = field(default_factory=CodecConfig)
    accepted_codecs: frozenset[str] = frozenset()
    """Codec names accepted besides `codec.name` (e.g. "bf16" for weight slices)."""
    dtype: str = "float32"
    """The dtype every update tensor must decode to."""
    admit_round: Callable[[str, int], bool] = lambda _sender, _round: True
    """`admit_round(sender, round)` after the signature checked: False refuses the update as FUTURE_ROUND.

    Whether a round is plausible is the peer's judgement (its clock and what the swarm agrees on), not the
    wire's; the callback may also remember the claim and decide on bans, since the sender is proven by then."""

    def codec_for(self, name: str) -> CodecConfig | None:
        """The config to decode codec `name` with, or None when it is not accepted."""
        if name == self.codec.name:
            return self.codec
        if name in self.accepted_codecs:
            return replace(self.codec, name=name)
        return None


def _entry_bytes(entry: pb.TensorEntry) -> bytes:
    parts = [entry.name.encode(), entry.codec.encode(), entry.dtype.encode()]
    head = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    dims = struct.pack(f">I{len(entry.shape)}Q", len(entry.shape), *entry.shape)
    return head + dims + struct.pack(">Q", entry.payload_length)


def payload_digest(
    entries: Sequence[pb.TensorEntry], payloads: Iterable[bytes | bytearray | memoryview]
) -> bytes:
    """SHA-256 over a canonical encoding of the tensor table, then the payload bytes (blocking)."""
    digest = digest_start(entries)
    for payload in payloads:
        digest.update(payload)
    return digest.digest()


def digest_start(entries: Sequence[pb.TensorEntry]) -> hashlib._Hash:
    """`payload_digest` before its payload bytes: a receiver feeds them chunk by chunk as they land."""
    digest = hashlib.sha256(b"murmur/payload/v1\0")
    digest.update(struct.pack(">I", len(entries)))
    for entry in entries:
        digest.update(_entry_bytes(entry))
    return digest


def _entries(tensors: Mapping[str, Encoded]) -> list[pb.TensorEntry]:
    return [
        pb.TensorEntry(
            name=name, codec=enc.codec, dtype=enc.dtype, shape=enc.shape, payload_length=len(enc.payload)
        )
        for name, enc in tensors.items()
    ]


def seal_update(
    update: OutgoingUpdate, *, identity: Identity, run_id: str, recipient: str
) -> pb.UpdateHeader:
    """The signed header of `update` addressed to `recipient` (hashes every payload the first time an update is
    sealed, `OutgoingUpdate.digest`: run it off-loop)."""
    entries = _entries(update.tensors)
    digest = update.digest()
    message = update_signing_bytes(
        run_id=run_id,
        round=update.round,
        slice_index=update.slice,
        payload_sha256=digest,
        sender=identity.peer_id,
        recipient=recipient,
    )
    return pb.UpdateHeader(
        protocol_major=PROTOCOL_MAJOR,
        run_id=run_id,
        round=update.round,
        slice=update.slice,
        sender=identity.peer_id,
        tensors=entries,
        payload_sha256=digest,
        signature=identity.sign(message),
    )


def chunk_views(payloads: Iterable[bytes]) -> Iterator[list[memoryview]]:
    """The concatenation of `payloads` cut into chunks of exactly CHUNK_BYTES (the last may be shorter), each as the
    views of the payloads it spans: no copy until a frame is built (protocol/duplex.py writes them as they are)."""
    pending: list[memoryview] = []
    size = 0
    for payload in payloads:
        view = memoryview(payload)
        while view:
            take = min(len(view), CHUNK_BYTES - size)
            pending.append(view[:take])
            size += take
            view = view[take:]
            if size == CHUNK_BYTES:
                yield pending
                pending, size = [], 0
    if size:
        yield pending


def chunked(payloads: Iterable[bytes]) -> Iterator[bytes]:
    """The concatenation of `payloads` cut into chunks of exactly CHUNK_BYTES (the last may be shorter)."""
    for views in chunk_views(payloads):
        yield b"".join(views)


def authenticate_header(header: pb.UpdateHeader, policy: WirePolicy, recipient: str) -> None:
    """Run id, known sender, signature (addressed to `recipient`), then the round; raises RejectedUpdate.

    Nothing here bans: until the signature checks, the claimed sender proves nothing; after it, a round
    refused by `policy.admit_round` is the policy's to punish (it knows the sender's history).
    """
    if header.run_id != policy.run_id:
        raise RejectedUpdate(
            Reason.WRONG_RUN, f"run {header.run_id[:16]!r}, this peer trains {policy.run_id[:16]!r}"
        )
    public_key = policy.lookup(header.sender)
    if public_key is None:
        raise RejectedUpdate(Reason.UNKNOWN_PEER, f"no announcement for peer {header.sender[:16]!r}")
    message = update_signing_bytes(
        run_id=header.run_id,
        round=header.round,
        slice_index=header.slice,
        payload_sha256=header.payload_sha256 if len(header.payload_sha256) == 32 else bytes(32),
        sender=header.sender,
        recipient=recipient,
    )
    if len(header.payload_sha256) != 32 or not verify(public_key, message, header.signature):
        raise RejectedUpdate(Reason.BAD_SIGNATURE, f"signature of {header.sender[:16]} does not check")
    if not policy.admit_round(header.sender, header.round):
        raise RejectedUpdate(Reason.FUTURE_ROUND, f"round {header.round} of {header.sender[:16]} is too far ahead")


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """One header entry that passed the table checks, with the config to decode it."""

    entry: pb.TensorEntry
    shape: Shape
    config: CodecConfig


def plan_payload(
    entries: Sequence[pb.TensorEntry], table: ShapeTable | None, policy: WirePolicy
) -> list[PlannedTensor]:
    """Check a header's tensor table against the expected shapes; the total is then capped by them."""
    if table is None:
        raise RejectedUpdate(Reason.WRONG_SHAPE, "no such slice")
    if not entries:
        raise MalformedPayload(Reason.GARBAGE, "an update with no tensors")
    if len(entries) > len(table):
        raise MalformedPayload(Reason.OVERSIZE, f"{len(entries)} tensors, the slice has {len(table)}")
    planned: list[PlannedTensor] = []
    seen: set[str] = set()
    for entry in entries:
        expected = table.get(entry.name)
        if expected is None or entry.name in seen:
            raise RejectedUpdate(Reason.WRONG_SHAPE, f"unexpected or repeated tensor {entry.name[:80]!r}")
        seen.add(entry.name)
        shape = tuple(entry.shape)
        if shape != tuple(expected):
            raise RejectedUpdate(
                Reason.WRONG_SHAPE, f"{entry.name}: shape {shape[:8]}, expected {tuple(expected)}"
            )
        if entry.dtype != policy.dtype:
            raise RejectedUpdate(
                Reason.WRONG_DTYPE, f"{entry.name}: dtype {entry.dtype[:20]!r}, expected {policy.dtype}"
            )
        config = policy.codec_for(entry.codec)
        if config is None:
            raise MalformedPayload(Reason.GARBAGE, f"{entry.name}: codec {entry.codec[:20]!r} not accepted")
        _check_length(entry, payload_size(shape, config))
        planned.append(PlannedTensor(entry, shape, config))
    return planned


def _check_length(entry: pb.TensorEntry, expected: int) -> None:
    if entry.payload_length > expected:
        raise MalformedPayload(
            Reason.OVERSIZE, f"{entry.name}: {entry.payload_length} bytes, at most {expected}"
        )
    if entry.payload_length != expected:
        raise MalformedPayload(
            Reason.GARBAGE, f"{entry.name}: {entry.payload_length} bytes, expected {expected}"
        )


class PayloadBuffer:
    """Collects chunks into one buffer of exactly the announced size; refuses anything beyond it.

    The buffer is allocated once, after the header was checked against the cap, so a peer can make us
    allocate at most what the manifest's shapes allow.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.data = bytearray(total)
        self.received = 0

    def add(self, chunk: bytes) -> None:
        """Append one chunk; raises MalformedPayload (GARBAGE for empty, OVERSIZE for too big)."""
        if not chunk:
            raise MalformedPayload(Reason.GARBAGE, "empty chunk")
        if len(chunk) > CHUNK_BYTES:
            raise MalformedPayload(Reason.OVERSIZE, f"chunk of {len(chunk)} bytes, at most {CHUNK_BYTES}")
        end = self.received + len(chunk)
        if end > self.total:
            raise MalformedPayload(Reason.OVERSIZE, f"more than the {self.total} bytes the header announced")
        self.data[self.received : end] = chunk
        self.received = end

    def finish(self) -> None:
        """Raise MalformedPayload unless every announced byte arrived."""
        if self.received != self.total:
            raise MalformedPayload(
                Reason.GARBAGE, f"stream ended after {self.received} of {self.total} bytes"
            )


def decode_payload(
    planned: Sequence[PlannedTensor], buffer: PayloadBuffer, signed_digest: bytes, dtype: str | None
) -> dict[str, torch.Tensor]:
    """Check the payload against its signed digest, then decode every tensor (blocking: run off-loop).

    Raises RejectedUpdate(BAD_SIGNATURE) when the bytes are not the signed ones, and the codec's
    MalformedPayload / RejectedUpdate (garbage, shape, dtype, non-finite) otherwise.
    """
    view = memoryview(buffer.data)
    if payload_digest([p.entry for p in planned], (view,)) != signed_digest:
        raise RejectedUpdate(Reason.BAD_SIGNATURE, "payload does not match its signed hash")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for item in planned:
        length = item.entry.payload_length
        encoded = Encoded(item.entry.codec, item.entry.dtype, item.shape, view[offset : offset + length])
        tensors[item.entry.name] = decode(
            encoded,
            item.config,
            expected_shape=item.shape,
            expected_dtype=dtype,
            max_numel=math.prod(item.shape),
        )
        offset += length
    return tensors


# ------------------------------------------------------------------------------------------- state


STATE_CODECS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp32"}
"""The lossless codec FetchState uses for each dtype it carries."""


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """Full weights as a donor serves them: encoded once, streamed to every late joiner."""

    round: int
    tensors: Mapping[str, Encoded]
    content_sha256: bytes

    @property
    def entries(self) -> list[pb.TensorEntry]:
        return _entries(self.tensors)


def make_state_snapshot(round: int, tensors: Mapping[str, torch.Tensor]) -> StateSnapshot:
    """Encode float32/bfloat16/float16 weights losslessly and hash them (blocking: run off-loop)."""
    encoded: dict[str, Encoded] = {}
    for name, tensor in tensors.items():
        codec = STATE_CODECS.get(str(tensor.dtype).removeprefix("torch."))
        if codec is None:
            raise ValueError(f"{name}: FetchState carries {tuple(STATE_CODECS)}, not {tensor.dtype}")
        encoded[name] = encode(tensor.detach(), CodecConfig(name=codec))
    digest = payload_digest(_entries(encoded), (enc.payload for enc in encoded.values()))
    return StateSnapshot(round=round, tensors=encoded, content_sha256=digest)


def plan_state(entries: Sequence[pb.TensorEntry], table: ShapeTable) -> list[PlannedTensor]:
    """Check a state header against the full shape table: every name exactly once, lossless codecs."""
    if len(entries) != len(table) or {e.name for e in entries} != set(table):
        raise RejectedUpdate(Reason.WRONG_SHAPE, "the state's tensors are not the manifest's")
    planned = []
    for entry in entries:
        shape = tuple(entry.shape)
        if shape != tuple(table[entry.name]):
            raise RejectedUpdate(
                Reason.WRONG_SHAPE, f"{entry.name}: shape {shape[:8]}, expected {table[entry.name]}"
            )
        if STATE_CODECS.get(entry.dtype) != entry.codec:
            raise RejectedUpdate(
                Reason.WRONG_DTYPE, f"{entry.name}: {entry.dtype[:20]!r} as {entry.codec[:20]!r}"
            )
        config = CodecConfig(name=entry.codec)
        _check_length(entry, payload_size(shape, config))
        planned.append(PlannedTensor(entry, shape, config))
    return planned
