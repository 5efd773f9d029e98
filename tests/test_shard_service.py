"""FetchShard on loopback (protocol/shard_service.py, protocol/shard_client.py) and the fetcher's second source
(peer/core/fetch_peers.py): a peer serves only the verified files `lookup` names, refuses an unknown hash
(NOT_FOUND) and another run (WRONG_RUN), resumes from an offset, cuts a caller over its byte budget (OVER_LIMIT);
the client appends to a `.partial`, and bytes that do not hash right are refused and the next peer asked; a
fetcher whose server is gone gets its files from peers, fails at once on a file nobody has, and trains a round
on another stream when its own shards cannot be had.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import grpc
import pytest
import torch

from peer.core.fetch import DatasetFetcher, RetryPolicy
from peer.core.fetch_peers import ShardPeer, ShiftedStream, from_peers, stream_for_round
from peer.core.prepare import PrepareOptions, prepare
from peer.core.shard_plan import fallback_streams
from peer.core.shards import PreparedDataset
from protocol import PROTOCOL_MAJOR
from protocol._generated import murmur_pb2 as pb
from protocol.errors import DataError, MurmurError, ProtocolViolation, Reason
from protocol.limits import ByteBudget, ShardLimits
from protocol.shard_client import ShardClient
from tests.conftest_wire import CLIENT_ID, RUN_ID, SERVER_ID, Wire, pinned_channel, run, serving, unary

pytestmark = pytest.mark.timeout(60)

BLOB = os.urandom(3 << 19)  # 1.5 MiB: two chunks
SHA = hashlib.sha256(BLOB).hexdigest()
FAST = RetryPolicy(first_wait_s=0.01, max_wait_s=0.02, down_tries=2, corrupt_tries=2, timeout_s=5)


def request(sha256: str = SHA, run_id: str = RUN_ID, offset: int = 0) -> bytes:
    return pb.FetchShardRequest(protocol_major=PROTOCOL_MAJOR, run_id=run_id, sha256=sha256,
                                offset=offset).SerializeToString()  # fmt: skip


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "shard-00000.bin"
    path.write_bytes(BLOB)
    return path


def frames(responses: list[bytes]) -> tuple[pb.ShardHeader, bytes]:
    parsed = [pb.ShardFrame.FromString(r) for r in responses]
    assert parsed[0].WhichOneof("body") == "header"
    return parsed[0].header, b"".join(f.chunk for f in parsed[1:])


def test_a_peer_serves_a_verified_file_whole_or_from_an_offset_and_refuses_the_rest(blob: Path) -> None:
    async def main() -> None:
        async with serving(Wire(), shard_lookup={SHA: blob}.get) as server:
            channel = pinned_channel(server)
            whole = await unary(channel, "FetchShard", request())
            resumed = await unary(channel, "FetchShard", request(offset=1_000_000))
            unknown = await unary(channel, "FetchShard", request(sha256="0" * 64))
            other_run = await unary(channel, "FetchShard", request(run_id="cd" * 32))
            garbage = await unary(channel, "FetchShard", request(sha256="../../etc/passwd"))
            beyond = await unary(channel, "FetchShard", request(offset=len(BLOB) + 1))
            await channel.close()
            assert server.rejections[Reason.NOT_FOUND] == 1 and server.rejections[Reason.WRONG_RUN] == 1
        assert whole.code is grpc.StatusCode.OK
        header, data = frames(whole.responses)
        assert (header.total_size, header.sha256, header.offset, data) == (len(BLOB), SHA, 0, BLOB)
        assert len(whole.responses) == 3  # header, 1 MiB, 0.5 MiB
        assert frames(resumed.responses)[1] == BLOB[1_000_000:]
        assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "not_found")
        assert (other_run.code, other_run.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "wrong_run")
        assert (garbage.code, garbage.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "garbage")
        assert (beyond.code, beyond.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "garbage")

    run(main)


def test_a_caller_over_its_byte_budget_is_cut_off_and_resumes_later(blob: Path) -> None:
    async def main() -> None:
        async with serving(Wire(), shard_lookup={SHA: blob}.get) as server:
            server.shards.budget = ByteBudget(ShardLimits(bytes_per_minute_per_address=1 << 20))
            channel = pinned_channel(server)
            cut = await unary(channel, "FetchShard", request())
            await channel.close()
        assert (cut.code, cut.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "over_limit")
        assert frames(cut.responses)[1] == BLOB[: 1 << 20]  # what fit in the budget came, then the cut

    run(main)


def test_the_client_resumes_a_partial_and_reports_a_refusal(blob: Path, tmp_path: Path) -> None:
    partial = tmp_path / "cache" / "x.partial"
    partial.parent.mkdir()
    partial.write_bytes(BLOB[:12345])

    async def main() -> None:
        async with serving(Wire(), shard_lookup={SHA: blob}.get) as server:
            async with ShardClient.connect(server.endpoint, peer_id=SERVER_ID.peer_id, identity=CLIENT_ID,
                                           tls_fingerprint=SERVER_ID.tls_fingerprint,
                                           tls_certificate=SERVER_ID.tls_cert_pem, deadline=10) as client:  # fmt: skip
                got = await client.fetch_shard(run_id=RUN_ID, sha256=SHA, partial=partial, size=len(BLOB))
                assert got == len(BLOB) - 12345 and partial.read_bytes() == BLOB
                with pytest.raises(ProtocolViolation) as refused:
                    await client.fetch_shard(run_id=RUN_ID, sha256="1" * 64, partial=tmp_path / "y", size=None)
                assert refused.value.reason is Reason.NOT_FOUND and refused.value.by_peer

    run(main)


def local_peer(name: str, files: dict[str, bytes]) -> ShardPeer:
    """A ShardPeer without a network: serves `files` (sha256 -> bytes) the way FetchShard does."""

    def fetch(sha256: str, partial: Path, size: int | None) -> int:
        if sha256 not in files:
            raise ProtocolViolation(Reason.NOT_FOUND, "not here")
        have = partial.stat().st_size if partial.exists() else 0
        with partial.open("ab") as f:
            f.write(files[sha256][have:])
        return len(files[sha256]) - have

    return ShardPeer(name, fetch)


def test_a_peer_that_sends_wrong_bytes_is_refused_and_the_next_one_asked(tmp_path: Path) -> None:
    liar = local_peer("liar", {SHA: b"x" * len(BLOB)})
    honest = local_peer("honest", {SHA: BLOB})
    partial = tmp_path / "f.partial"
    for _ in range(4):  # the order is shuffled: whoever comes first, the verified bytes win
        partial.unlink(missing_ok=True)
        assert from_peers(lambda: [liar, honest, local_peer("empty", {})], "f", SHA, len(BLOB), partial) == "honest"
        assert partial.read_bytes() == BLOB
    partial.unlink()
    assert from_peers(lambda: [liar], "f", SHA, len(BLOB), partial) is None and not partial.exists()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    folder = tmp_path_factory.mktemp("ds")
    (folder / "in.txt").write_text("\n\n".join(f"line {i}: " + "murmur gossip " * (1 + i % 4) for i in range(600)))
    prepare(PrepareOptions(inputs=(str(folder / "in.txt"),), out=folder / "ds", tokenizer="bytes", shard_tokens=2000,
                           heldout_fraction=0.05, progress=False))  # fmt: skip
    return PreparedDataset.open(folder / "ds")


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"  # closed again: connections are refused


def test_a_fetcher_whose_server_is_gone_gets_verified_files_from_peers(
    dataset: PreparedDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {hashlib.sha256(p.read_bytes()).hexdigest(): p.read_bytes() for p in dataset.root.iterdir()}
    plan_args = dict(num_streams=4, steps_per_round=2)
    other = dataset.stream(32, stream_index=2, **plan_args)
    names = sorted({n for r in range(3) for n in other.shards_for_round(r, 2)})  # what the peers hold: stream 2's
    held = {s.sha256 for s in dataset.index.train if s.name in names}
    shared = {k: v for k, v in files.items() if k in held or k in (dataset.dataset_id, dataset.index.heldout.sha256)}
    fetcher = DatasetFetcher(dead_url(), dataset.dataset_id, cache=tmp_path, retry=FAST,
                             peers=lambda: [local_peer("p1", shared)])  # fmt: skip
    caplog.set_level("INFO", logger="murmur")
    opened = fetcher.open()
    missing = next(s for s in dataset.index.train if s.sha256 not in held)
    fetcher.ensure(names)
    assert all((fetcher.root / n).read_bytes() == (dataset.root / n).read_bytes() for n in names)
    assert f"dataset: {names[0]} from peer p1" in caplog.text
    first = next(s for s in dataset.index.train if s.name == names[0])
    assert fetcher.lookup(first.sha256) == fetcher.root / names[0]
    assert fetcher.lookup(missing.sha256) is None  # not held: not served
    with pytest.raises(DataError, match="no peer has it either"):
        fetcher.ensure([missing.name])
    # a round whose own shards nobody has trains on another stream whose shards can be had (here stream 2)
    own = opened.stream(32, stream_index=0, **plan_args)
    for r in range(3):
        chosen = stream_for_round(fetcher, own, r, 2)
        assert set(chosen.shards_for_round(r, 2)) <= set(names), r
        assert chosen is own or chosen.plan.stream_index in fallback_streams(0, 4, r)
    # a restarted peer whose peers hold no train shard at all: it trains on later rounds' windows of its cache
    index_only = local_peer("p2", {dataset.dataset_id: files[dataset.dataset_id]})
    alone = DatasetFetcher(dead_url(), dataset.dataset_id, cache=tmp_path, retry=FAST, peers=lambda: [index_only])
    own = alone.open().stream(32, stream_index=1, **plan_args)
    for r in range(3, 12):
        chosen = stream_for_round(alone, own, r, 2)
        assert set(chosen.shards_for_round(r, 2)) <= set(names), r  # this round's streams, or a later round's
        x, y = chosen.batch(r, 0, 2)
        assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])
    full = dataset.stream(32, stream_index=1, **plan_args)  # the owner's folder: every shard there
    shifted = ShiftedStream(full, 5)
    assert shifted.shards_for_round(3, 2) == full.shards_for_round(8, 2)
    assert torch.equal(shifted.batch(3, 1, 2)[0], full.batch(8, 1, 2)[0])
    # a cache of round 8's shards only (an earlier run's): round 3 trains on them
    cache = tmp_path / "other" / "datasets" / dataset.dataset_id
    cache.mkdir(parents=True)
    for name in ("index.json", *full.shards_for_round(8, 2)):
        shutil.copy(dataset.root / name, cache / name)
    restarted = DatasetFetcher(dead_url(), dataset.dataset_id, cache=tmp_path / "other", retry=FAST,
                               peers=lambda: [index_only])  # fmt: skip
    chosen = stream_for_round(restarted, restarted.open().stream(32, stream_index=1, **plan_args), 3, 2)
    assert isinstance(chosen, ShiftedStream) and (chosen.plan.stream_index, chosen.shift) == (1, 5)


def test_fallback_streams_are_the_other_streams_in_an_order_fixed_by_stream_and_round() -> None:
    assert fallback_streams(0, 1, 5) == []
    for s in range(5):
        order = fallback_streams(s, 5, 7)
        assert sorted(order) == [k for k in range(5) if k != s] and order == fallback_streams(s, 5, 7)
    assert len({tuple(fallback_streams(0, 16, r)) for r in range(8)}) > 1


def test_a_busy_peer_or_a_dead_dht_means_no_file_from_peers_not_a_crash(tmp_path: Path) -> None:
    def broken(sha256: str, partial: Path, size: int | None) -> int:
        raise ProtocolViolation(Reason.RATE_LIMITED, "busy")

    assert from_peers(lambda: [ShardPeer("busy", broken)], "f", SHA, None, tmp_path / "p") is None

    def dht_down() -> list[ShardPeer]:
        raise MurmurError("the DHT process exited")

    assert from_peers(dht_down, "f", SHA, None, tmp_path / "p") is None


def test_a_server_with_every_download_slot_taken_refuses_as_busy(blob: Path) -> None:
    async def main() -> None:
        async with serving(Wire(), shard_lookup={SHA: blob}.get) as server:
            channel = pinned_channel(server)
            async with server.shards._slots, server.shards._slots, server.shards._slots, server.shards._slots:
                busy = await unary(channel, "FetchShard", request())
            served = await unary(channel, "FetchShard", request())
            await channel.close()
        assert (busy.code, busy.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
        assert served.code is grpc.StatusCode.OK

    assert ShardLimits().max_streams == 4
    run(main)


def test_the_retry_policy_is_shortened_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MURMUR_FETCH_TRIES", "2")
    monkeypatch.setenv("MURMUR_FETCH_WAIT_S", "0.1")
    policy = RetryPolicy.from_env()
    assert (policy.down_tries, policy.first_wait_s, policy.max_wait_s) == (2, 0.1, 6.0)
    monkeypatch.setenv("MURMUR_FETCH_TRIES", "many")
    with pytest.raises(DataError, match="MURMUR_FETCH_TRIES"):
        RetryPolicy.from_env()
