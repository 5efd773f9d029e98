"""A partner in its own process for tests/test_duplex.py, to be killed with SIGKILL mid-stream.

    python tests/duplex_child.py push  DIR ENDPOINT   # pushes half an update to ENDPOINT, prints "pushed", waits
    python tests/duplex_child.py serve DIR            # serves; takes pushes but never finishes on_update

DIR holds `me.id` (this process's identity), `other.id` (the partner's) and `shapes.json`. Lines on stdout say
where it stands ("listening PORT", "pushed", "delivered"), so the test kills it at a known point of a stream.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
import torch
import uvloop

from protocol._generated import murmur_pb2 as pb
from protocol.codec import CodecConfig, encode
from protocol.identity import TLS_SERVER_NAME, Identity
from protocol.service import PeerServer
from protocol.updates import OutgoingUpdate, ReceivedUpdate, WirePolicy, chunked, seal_update
from protocol.wire import ACCEPT_KEY, CHANNEL_OPTIONS, SERVICE_NAME

RUN_ID = "ab" * 32


def _setup(folder: Path) -> tuple[Identity, Identity, WirePolicy, OutgoingUpdate]:
    me, other = Identity.load(folder / "me.id"), Identity.load(folder / "other.id")
    shapes = {name: tuple(shape) for name, shape in json.loads((folder / "shapes.json").read_text()).items()}
    policy = WirePolicy(run_id=RUN_ID, expected_shapes=lambda k: shapes if k in (0, 1) else None,
                        lookup={other.peer_id: other.public_key}.get)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    tensors = {name: encode(torch.randn(shape, generator=generator), CodecConfig()) for name, shape in shapes.items()}
    return me, other, policy, OutgoingUpdate(1, 0, tensors)


async def push(folder: Path, endpoint: str) -> None:
    """Header, the go-ahead, then half of the chunks; then wait to be killed."""
    me, other, _policy, update = _setup(folder)
    credentials = grpc.ssl_channel_credentials(root_certificates=other.tls_cert_pem)
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
    async with grpc.aio.secure_channel(endpoint, credentials, options=options) as channel:
        call = channel.stream_stream(f"/{SERVICE_NAME}/Exchange", request_serializer=None,
                                     response_deserializer=None)(timeout=60)  # fmt: skip
        header = seal_update(update, identity=me, run_id=RUN_ID, recipient=other.peer_id)
        await call.write(pb.UpdateFrame(header=header).SerializeToString())
        assert (ACCEPT_KEY, "1") in tuple(await call.initial_metadata() or ())
        chunks = list(chunked(enc.payload for enc in update.tensors.values()))
        for chunk in chunks[: len(chunks) // 2]:
            await call.write(pb.UpdateFrame(chunk=chunk).SerializeToString())
        print("pushed", flush=True)
        await asyncio.sleep(3600)


async def serve(folder: Path) -> None:
    """A server whose reply streams, and whose on_update never returns: the reply's tail never comes."""
    me, _other, policy, update = _setup(folder)

    async def on_update(_update: ReceivedUpdate) -> None:
        print("delivered", flush=True)
        await asyncio.sleep(3600)

    async with PeerServer(identity=me, policy=policy, on_update=on_update, reply_for=lambda r, k: update) as server:
        print(f"listening {server.port}", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    role, folder = sys.argv[1], Path(sys.argv[2])
    uvloop.run(push(folder, sys.argv[3]) if role == "push" else serve(folder))
