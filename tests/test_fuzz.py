"""Fuzz every RPC of a running server with a fixed number of random and mutated inputs.

What must hold afterwards: the server still answers Info, it never failed with an unexpected exception
(no UNKNOWN or INTERNAL status, and no error logged by a handler, even where a status was lost), and
every update that reached its callback passed validation (signed by a known peer, shapes from the
table, float32, finite). Mutations come in three kinds:
- bytes: random strings, bit flips, truncations, splices of valid frames;
- streams: frames dropped, duplicated, reordered, or a header sent twice;
- fields: a valid header or payload changed field by field and then signed honestly by a registered
  peer, so the mutation gets past the signature and exercises the table, cap and codec checks.
Bans last 0 s here so that one banned mutation does not shield the deeper checks from the rest, and the
rate limits are out of the fuzzer's reach (tests/test_limits.py is about them): the same TARGET_CALLS
mutations, drawn from one seed (MURMUR_FUZZ_SEED to try others), reach the same checks on a fast machine
and on a slow one.

Statuses are counted as the client saw them, except one: a stream that goes on after a frame the server
refuses (a header sent twice, a mutated chunk before the last) has a write in flight when the refusal
arrives, and grpc.aio then reports a local INTERNAL instead of the server's status (grpc/grpc#36066: its
`_StreamRequestMixin._write` calls `set_internal_error` over the delivered status). The server cannot
prevent that short of reading on after a refusal, so such calls are counted as "write raced", and the
server's side of them is checked through its error log instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch
from conftest_wire import (
    CLIENT_ID,
    RUN_ID,
    SERVER_ID,
    Wire,
    assert_valid,
    pinned_channel,
    push_frames,
    run,
    serving,
    unary,
)

from protocol import PROTOCOL_MAJOR
from protocol._generated import murmur_pb2 as pb
from protocol.bans import BanList
from protocol.identity import Identity, update_signing_bytes
from protocol.limits import Limits
from protocol.service import ServerConfig
from protocol.updates import OutgoingUpdate, chunked, make_state_snapshot, payload_digest, seal_update

TARGET_CALLS = 5000
"""Exactly this many calls, however long they take: each call's choices (RPC, mutation, where) are drawn from
the seed before its first await, so every machine runs the same sequence of mutations."""
SEED = int(os.environ.get("MURMUR_FUZZ_SEED", "20261122"))
CONCURRENCY = 16
SIGNERS = [CLIENT_ID, *(Identity.generate() for _ in range(3))]
OUT_OF_REACH = Limits(
    calls_per_minute_per_address=2 * TARGET_CALLS,
    exchanges_per_minute_per_peer=2 * TARGET_CALLS,
    bytes_per_minute_per_peer=2 * TARGET_CALLS << 20,
    max_streams_per_peer=2 * CONCURRENCY,
    over_limit_ban_s=0,
)
"""Buckets start full, so a bucket of 2 x TARGET_CALLS is never emptied by TARGET_CALLS calls, at any speed."""
WRITE_RACED = "write raced"


class Fuzzer:
    """Makes one random call's worth of bytes at a time, from valid seeds."""

    def __init__(self, wire: Wire, seed: int) -> None:
        self.rng = random.Random(seed)
        self.wire = wire
        self.round = 0
        # Encoded once: torch work in the loop would measure the codec, not the server.
        self.pool = [wire.update(i) for i in range(16)]

    def next_round(self) -> int:
        self.round += 1
        return self.round

    def fresh_update(self) -> OutgoingUpdate:
        """A valid update with a round never used before (payloads from the pool)."""
        template = self.pool[self.rng.randrange(len(self.pool))]
        return OutgoingUpdate(self.next_round(), 0, template.tensors)

    def frames_for(self, update: OutgoingUpdate, signer: Identity) -> list[bytes]:
        header = seal_update(update, identity=signer, run_id=RUN_ID, recipient=SERVER_ID.peer_id)
        return [pb.UpdateFrame(header=header).SerializeToString()] + [
            pb.UpdateFrame(chunk=c).SerializeToString() for c in chunked(e.payload for e in update.tensors.values())
        ]

    # ---------------------------------------------------------------------------------- bytes

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 2, 5, 17, 100, 1000, 5000]))

    def mutate(self, data: bytes) -> bytes:
        rng, data = self.rng, bytearray(data)
        kind = rng.randrange(5)
        if kind == 0 and data:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            del data[rng.randrange(len(data) + 1) :]
        elif kind == 2 and data:  # delete a span
            i = rng.randrange(len(data))
            del data[i : i + rng.randint(1, 64)]
        elif kind == 3:  # insert random bytes
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 64))
        else:  # overwrite a varint-ish byte with an extreme value
            if data:
                data[rng.randrange(len(data))] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        return bytes(data)

    # ---------------------------------------------------------------------------------- calls

    def info_request(self) -> bytes:
        valid = pb.InfoRequest(protocol_major=PROTOCOL_MAJOR).SerializeToString()
        return self.rng.choice([valid, self.mutate(valid), self.random_bytes()])

    def state_request(self) -> bytes:
        valid = pb.FetchStateRequest(protocol_major=PROTOCOL_MAJOR, run_id=RUN_ID).SerializeToString()
        return self.rng.choice([valid, self.mutate(valid), self.random_bytes()])

    def exchange_frames(self) -> list[bytes]:
        rng = self.rng
        kind = rng.randrange(6)
        # A fresh round each time, so that mutations are not all stopped early as replays.
        frames = self.frames_for(self.fresh_update(), rng_choice(rng, SIGNERS))
        if kind == 0:
            return [self.random_bytes() for _ in range(rng.randint(0, 4))]
        if kind == 1:  # one frame mutated
            i = rng.randrange(len(frames))
            frames[i] = self.mutate(frames[i])
            return frames
        if kind == 2:  # stream surgery
            op = rng.randrange(4)
            if op == 0:
                del frames[rng.randrange(len(frames))]
            elif op == 1:
                frames.insert(rng.randrange(len(frames) + 1), rng.choice(frames))
            elif op == 2:
                rng.shuffle(frames)
            else:
                frames = frames[:1] + frames[:1] + frames[1:]
            return frames
        if kind == 3:
            return self.signed_header_mutation()
        if kind == 4:
            return self.signed_payload_mutation()
        return self.frames_for(self.fresh_update(), rng.choice(SIGNERS))  # valid

    def signed_header_mutation(self) -> list[bytes]:
        """A valid update whose header fields are changed, then signed honestly by a known peer."""
        rng, signer = self.rng, rng_choice(self.rng, SIGNERS)
        update = self.fresh_update()
        frames = self.frames_for(update, signer)
        header = pb.UpdateFrame.FromString(frames[0]).header
        entry = header.tensors[rng.randrange(len(header.tensors))]
        field_mutations: list[Callable[[], None]] = [
            lambda: entry.shape.append(rng.choice([0, 1, 2**31, 2**63])),
            lambda: entry.shape.__setitem__(0, rng.choice([0, 1, 63, 65, 2**40])),
            lambda: setattr(
                entry, "payload_length", rng.choice([0, entry.payload_length - 1, entry.payload_length + 1, 2**60])
            ),
            lambda: setattr(entry, "dtype", rng.choice(["float64", "bfloat16", "", "int8"])),
            lambda: setattr(entry, "codec", rng.choice(["fp32", "topk", "int4", "pickle", ""])),
            lambda: setattr(entry, "name", rng.choice(["", "delta/w", "x" * 300, "phi/w"])),
            lambda: header.tensors.append(
                pb.TensorEntry(name="extra", codec="int8", dtype="float32", shape=[8], payload_length=12)
            ),
            lambda: setattr(header, "slice", rng.choice([1, 2, 2**32 - 1])),
            lambda: setattr(header, "round", rng.choice([0, 1, self.round])),
            lambda: header.ClearField("tensors"),
        ]
        rng.choice(field_mutations)()
        digest = payload_digest(header.tensors, (e.payload for e in update.tensors.values()))
        header.payload_sha256 = digest
        header.signature = signer.sign(
            update_signing_bytes(
                run_id=RUN_ID,
                round=header.round,
                slice_index=header.slice,
                payload_sha256=digest,
                sender=signer.peer_id,
                recipient=SERVER_ID.peer_id,
            )
        )
        return [pb.UpdateFrame(header=header).SerializeToString(), *frames[1:]]

    def signed_payload_mutation(self) -> list[bytes]:
        """Payload bytes flipped (scales, values), then hashed and signed honestly: the codec must judge."""
        update = self.fresh_update()
        name = self.rng.choice(list(update.tensors))
        tensors = dict(update.tensors)
        old = tensors[name]
        tensors[name] = type(old)(old.codec, old.dtype, old.shape, self.mutate_in_place(old.payload))
        return self.frames_for(OutgoingUpdate(update.round, update.slice, tensors), rng_choice(self.rng, SIGNERS))

    def mutate_in_place(self, payload: bytes) -> bytes:
        data = bytearray(payload)
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randrange(min(len(data), 64) if self.rng.random() < 0.7 else len(data))  # scales first
            data[i] = self.rng.choice([0xFF, 0x7F, 0x80, 0x00, self.rng.randrange(256)])
        return bytes(data)


def rng_choice(rng: random.Random, items: list[Identity]) -> Identity:
    return items[rng.randrange(len(items))]


class ErrorRecords(logging.Handler):
    """Collects ERROR records of murmur's and grpc's loggers: a handler that raised (grpc logs "Unexpected ...
    raised by servicer method") or an on_update that failed shows here even when its status was lost."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def error_records() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    loggers = [logging.getLogger("murmur"), logging.getLogger("grpc")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.timeout(240)
def test_fuzz_every_rpc_server_survives_and_delivers_nothing_invalid() -> None:
    wire = Wire()
    wire.keys.update({s.peer_id: s.public_key for s in SIGNERS})
    snapshot = make_state_snapshot(2, {name: torch.randn(shape) for name, shape in wire.shapes.items()})
    fuzzer = Fuzzer(wire, seed=SEED)
    codes: Counter[str] = Counter()
    tickets = iter(range(TARGET_CALLS))  # shared by the workers: exactly TARGET_CALLS calls in all

    async def one_call(channel: grpc.aio.Channel) -> None:
        pick = fuzzer.rng.random()
        if pick < 0.2:
            result = await unary(channel, "Info", fuzzer.info_request(), timeout=5)
        elif pick < 0.35:
            result = await unary(channel, "FetchState", fuzzer.state_request(), timeout=5)
        else:
            result = await push_frames(channel, fuzzer.exchange_frames(), timeout=5)
        codes[WRITE_RACED if result.write_raced else result.code.name] += 1

    async def worker(channel: grpc.aio.Channel) -> None:
        for _ in tickets:
            await one_call(channel)

    async def scenario():
        bans = BanList(duration_s=0)
        reply = wire.update(10_000)
        config = ServerConfig(limits=OUT_OF_REACH)
        async with serving(
            wire, bans=bans, state_provider=lambda: snapshot, reply_for=lambda r, s: reply, config=config
        ) as server:
            channel = pinned_channel(server)
            try:
                started = time.monotonic()
                await asyncio.gather(*(worker(channel) for _ in range(CONCURRENCY)))
                elapsed = time.monotonic() - started
                request = pb.InfoRequest(protocol_major=PROTOCOL_MAJOR).SerializeToString()
                info = await unary(channel, "Info", request)
            finally:
                await channel.close()
            return server, info, elapsed

    with error_records() as errors:
        server, info, elapsed = run(scenario)
    calls = sum(codes.values())
    print(
        f"\nfuzz (seed {SEED}): {calls} calls in {elapsed:.1f} s; statuses {dict(codes)}; "
        f"refusals {dict((r.value, n) for r, n in server.rejections.items())}; delivered {len(wire.received)}"
    )
    assert info.code is grpc.StatusCode.OK, f"the server still answers Info: {info.code.name} {info.details}"
    assert calls == TARGET_CALLS
    assert codes["UNKNOWN"] == 0, "a handler raised something it should have refused precisely"
    assert codes["INTERNAL"] == 0, "an INTERNAL status other than grpc.aio's write race (grpc/grpc#36066)"
    assert not errors.records, [record.getMessage() for record in errors.records]
    assert sum(server.rejections.values()) > calls / 3
    assert len(wire.received) == server.accepted > 0
    known = {s.peer_id for s in SIGNERS}
    for update in wire.received:
        assert update.sender in known and update.run_id == RUN_ID
        assert_valid(update, wire.shapes)
