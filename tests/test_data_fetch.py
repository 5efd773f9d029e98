"""peer/core/fetch.py against a loopback HTTP server (peer/lab/dataserver.py) serving a prepared tiny dataset: a peer
fetches index.json, tokenizer.json and only the shards its stream reaches, verifies every SHA-256, resumes a cut
transfer with a Range request, waits out a server that is down, fetches a corrupted shard again and stops in one
line when it never verifies; a Trainer trains on the fetched dataset and evaluates on its held-out shard.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch

from peer.config import RunConfig
from peer.core import fetch
from peer.core.fetch import DatasetFetcher, FetchStopped, RetryPolicy, num_streams, with_dataset
from peer.core.prepare import PrepareOptions, prepare
from peer.core.shards import INDEX_NAME, TOKENIZER_NAME, PreparedDataset
from peer.lab.dataserver import DataServer, served
from peer.lab.evaluate import corpus_for
from peer.node.trainer import Trainer
from protocol.errors import CorruptShard, DataError

DOCS = [f"paragraph {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(400)]
FAST = RetryPolicy(first_wait_s=0.01, max_wait_s=0.05, down_tries=5, corrupt_tries=3, timeout_s=10)
SHARD = "shard-00001.bin"


def make_dataset(folder: Path, **options: object) -> Path:
    (folder / "in.txt").write_text("\n\n".join(DOCS))
    opts = {"tokenizer": "bytes", "shard_tokens": 4000, "heldout_fraction": 0.05, "progress": False, **options}
    prepare(PrepareOptions(inputs=(str(folder / "in.txt"),), out=folder / "ds", **opts))  # type: ignore[arg-type]
    return folder / "ds"


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 10 training shards of a 300-token BPE: tokenizer.json is fetched too."""
    return make_dataset(tmp_path_factory.mktemp("bpe"), tokenizer=None, train_vocab=300, shard_tokens=1500)


@pytest.fixture
def served_copy(tmp_path: Path, bpe_dataset: Path):
    """A copy of the dataset (a test may damage it) served on loopback."""
    folder = tmp_path / "served"
    shutil.copytree(bpe_dataset, folder)
    with served(folder) as server:
        yield server


def fetcher_for(server: DataServer, cache: Path, retry: RetryPolicy = FAST) -> DatasetFetcher:
    dataset_id = PreparedDataset.open(server.folder).dataset_id
    return DatasetFetcher(server.url, dataset_id, cache=cache, retry=retry)


def gets(server: DataServer, name: str) -> list[str | None]:
    return [rng for n, rng in server.requests if n == name]


@pytest.mark.timeout(60)
def test_a_peer_fetches_the_index_the_tokenizer_and_only_its_rounds_shards(served_copy: DataServer,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    fetcher = fetcher_for(served_copy, tmp_path / "cache")
    dataset = fetcher.open()
    stream = dataset.stream(15, stream_index=3, num_streams=8, steps_per_round=2, seed=0)
    needed = stream.shards_for_round(0, 4)
    fetcher.ensure(needed)
    cached = sorted(p.name for p in fetcher.root.iterdir())
    assert cached == sorted([INDEX_NAME, TOKENIZER_NAME, *needed])
    assert len(needed) < len(dataset.index.train), "a stream needs a few shards, not all"
    for name in cached:
        assert (fetcher.root / name).read_bytes() == (served_copy.folder / name).read_bytes()
    x, y = stream.batch(0, 1, 4)
    assert x.shape == (4, 15) and (x[:, 1:] == y[:, :-1]).all()
    assert dataset.tokenizer().vocab_size == 300

    again = fetcher_for(served_copy, tmp_path / "cache")  # a restart: the cache is reused, nothing fetched again
    before = len(served_copy.requests)
    again.open()
    again.ensure(needed)
    assert len(served_copy.requests) == before


@pytest.mark.timeout(60)
def test_a_transfer_cut_short_resumes_with_a_range_request(served_copy: DataServer, tmp_path: Path) -> None:
    cuts = iter([("cut", 1000), ("cut", 700)])
    served_copy.fault = lambda name: next(cuts, None) if name == SHARD else None
    fetcher = fetcher_for(served_copy, tmp_path / "cache")
    fetcher.open()
    fetcher.ensure([SHARD])
    assert gets(served_copy, SHARD) == [None, "bytes=1000-", "bytes=1700-"]
    assert (fetcher.root / SHARD).read_bytes() == (served_copy.folder / SHARD).read_bytes()
    assert not list(fetcher.root.glob("*.partial"))


@pytest.mark.timeout(60)
def test_a_server_that_is_down_is_tried_again_with_backoff_and_one_warning_each(
        served_copy: DataServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    down = iter([503, 503, 502])
    served_copy.fault = lambda name: next(down, None)
    fetcher = fetcher_for(served_copy, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger=fetch.log.name):
        fetcher.open()
        fetcher.ensure([SHARD])
    warnings = [r.getMessage() for r in caplog.records if r.name == fetch.log.name]
    assert len(warnings) == 3 and all("\n" not in w and "HTTP 50" in w for w in warnings), warnings
    assert (fetcher.root / SHARD).is_file()


@pytest.mark.timeout(60)
def test_a_server_that_never_answers_stops_in_one_line(bpe_dataset: Path, tmp_path: Path) -> None:
    with served(bpe_dataset) as server:
        url, dataset_id = server.url, PreparedDataset.open(bpe_dataset).dataset_id
    fetcher = DatasetFetcher(url, dataset_id, cache=tmp_path / "cache", retry=FAST)  # the server is gone now
    with pytest.raises(DataError) as error:
        fetcher.open()
    assert "cannot fetch" in str(error.value) and "5 tries" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.timeout(60)
def test_a_stop_while_waiting_for_the_server_ends_the_wait(served_copy: DataServer, tmp_path: Path) -> None:
    served_copy.fault = lambda name: 503
    stop = threading.Event()
    stop.set()
    with pytest.raises(FetchStopped):
        fetcher_for(served_copy, tmp_path / "cache", RetryPolicy(first_wait_s=60)).open(stop)


@pytest.mark.timeout(60)
def test_a_corrupted_shard_is_refused_then_fetched_again_once_fixed(
        served_copy: DataServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    path = served_copy.folder / SHARD
    good = path.read_bytes()
    path.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    served_times = []

    def fix_after_first(name: str) -> None:
        if name == SHARD:
            served_times.append(1)
            if len(served_times) == 2:
                path.write_bytes(good)  # the owner repaired the file

    served_copy.fault = fix_after_first
    fetcher = fetcher_for(served_copy, tmp_path / "cache")
    dataset = fetcher.open()
    with caplog.at_level(logging.WARNING, logger=fetch.log.name):
        fetcher.ensure([SHARD])
    assert len(gets(served_copy, SHARD)) == 2
    assert any("does not match its SHA-256" in r.getMessage() for r in caplog.records)
    assert bytes(dataset.shard(SHARD).tobytes()) == good


@pytest.mark.timeout(60)
def test_a_shard_that_never_verifies_stops_with_one_line(served_copy: DataServer, tmp_path: Path) -> None:
    path = served_copy.folder / SHARD
    path.write_bytes(bytes(path.stat().st_size))
    fetcher = fetcher_for(served_copy, tmp_path / "cache")
    fetcher.open()
    with pytest.raises(CorruptShard) as error:
        fetcher.ensure([SHARD])
    message = str(error.value)
    assert "\n" not in message and SHARD in message and "3 downloads" in message, message
    assert len(gets(served_copy, SHARD)) == 3
    assert not (fetcher.root / SHARD).exists(), "an unverified shard never gets its name"


@pytest.mark.timeout(60)
def test_the_index_must_hash_to_the_dataset_id(served_copy: DataServer, tmp_path: Path) -> None:
    fetcher = DatasetFetcher(served_copy.url, "0" * 64, cache=tmp_path / "cache", retry=FAST)
    with pytest.raises(CorruptShard, match="index.json"):
        fetcher.open()


def prepared_run(location: str, *, batch_size: int = 4, grad_accum: int = 1) -> RunConfig:
    config = {"swarm": "fetch-test", "preset": "micro", "slices": {"num_slices": 2},
              "inner": {"steps_per_round": 3, "batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": 2},
              "model": {"seq_len": 31}, "data": {"location": location}}  # fmt: skip
    return RunConfig.from_dict(with_dataset(config))


@pytest.mark.timeout(120)
def test_a_trainer_trains_on_the_fetched_dataset_and_evaluates_on_its_held_out_shard(
        served_copy: DataServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MURMUR_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    run = prepared_run(served_copy.url)
    assert run.model.vocab_size == 300 and run.data.prepared
    trainer = Trainer(run, "ab" * 32, torch.device("cpu"))
    trainer.take_slice(0)
    halt = threading.Event()
    trained = trainer.train_round(0, halt)
    assert trained.loss > 0 and trained.tokens == 3 * 4 * 31
    assert trainer.evaluate(batches=2) > 0
    cache = tmp_path / "cache" / "datasets" / run.data.dataset_id
    assert set(trainer.stream.shards_for_round(0, 4)) <= {p.name for p in cache.iterdir()}
    assert (cache / "heldout.bin").is_file()
    trainer._prefetch.join()  # round 1's shards came while round 0 trained
    assert set(trainer.stream.shards_for_round(1, 4)) <= {p.name for p in cache.iterdir()}

    # S depends on the manifest and the index only: a peer that splits the same batch otherwise agrees on it
    other = Trainer(run, "cd" * 32, torch.device("cpu"), micro_batch=2, grad_accum=2)
    assert other.stream.plan.num_streams == trainer.stream.plan.num_streams == num_streams(
        trainer.dataset.windows(31), 3 * 4) > 1  # fmt: skip


@pytest.mark.timeout(60)
def test_eval_reads_the_held_out_shard_by_the_manifest_or_from_a_local_copy(
        served_copy: DataServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MURMUR_CACHE", str(tmp_path / "cache"))
    run = prepared_run(served_copy.url)
    held = PreparedDataset.open(served_copy.folder).shard("heldout.bin")
    fetched = corpus_for(run)
    assert fetched.val.tolist() == held.tolist() and fetched.train.numel() == 0 and fetched.vocab_size == 300
    assert corpus_for(run, served_copy.folder).val.tolist() == held.tolist()
    local = Trainer(RunConfig.from_dict({"swarm": "x", "preset": "micro", "model": {"vocab_size": 300}}), "ef" * 32,
                    torch.device("cpu"), data=str(served_copy.folder))  # fmt: skip
    assert local.fetcher is None and local.dataset is not None and local.corpus.val.tolist() == held.tolist()
