"""peer/core/shards.py and shard_plan.py: a prepared dataset's index is checked, shards are hashed when first opened
and refused when they differ, and streams keep peer/core/data.py's contract (disjoint across streams within an
epoch, deterministic, no repeats within an epoch) while each needs only a few shards, which it can name from the
index alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.core.prepare import PrepareOptions, prepare
from peer.core.shard_plan import StreamPlan, permute
from peer.core.shards import INDEX_NAME, PreparedDataset, sha256_file
from protocol.errors import CorruptShard, DataError, DataNotFound

SEQ = 15
DOCS = [f"paragraph {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(400)]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 39k byte tokens in shards of 4000: 10 training shards."""
    folder = tmp_path_factory.mktemp("shards")
    (folder / "in.txt").write_text("\n\n".join(DOCS))
    prepare(PrepareOptions(inputs=(str(folder / "in.txt"),), out=folder / "ds", tokenizer="bytes", shard_tokens=4000,
                           heldout_fraction=0.05, progress=False))  # fmt: skip
    return folder / "ds"


@pytest.fixture
def dataset(dataset_dir: Path) -> PreparedDataset:
    return PreparedDataset.open(dataset_dir)


def all_train_tokens(dataset: PreparedDataset) -> list[np.ndarray]:
    return [np.asarray(dataset.shard(s.name)) for s in dataset.index.train]


@pytest.mark.timeout(30)
def test_batches_are_shifted_windows_of_one_shard(dataset: PreparedDataset) -> None:
    stream = dataset.stream(SEQ, stream_index=2, num_streams=5, steps_per_round=4, seed=1)
    shards = all_train_tokens(dataset)
    x, y = stream.batch(7, 3, 6)
    assert x.shape == y.shape == (6, SEQ) and x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    which, windows = stream.plan.windows(7, 3, 6)
    for row, k, w in zip(range(6), which.tolist(), windows.tolist()):
        window = shards[k][w * (SEQ + 1) : (w + 1) * (SEQ + 1)]
        assert x[row].tolist() == window[:-1].tolist() and y[row].tolist() == window[1:].tolist()


def epoch_windows(plan: StreamPlan, epoch: int) -> list[tuple[int, int]]:
    shards, windows = plan._locate(epoch, np.arange(plan.windows_per_epoch))
    return list(zip(shards.tolist(), windows.tolist()))


@pytest.mark.timeout(30)
def test_streams_are_disjoint_and_never_repeat_within_an_epoch(dataset: PreparedDataset) -> None:
    plans = [dataset.plan(SEQ, stream_index=s, num_streams=6, steps_per_round=3, seed=4) for s in range(6)]
    for epoch in (0, 1, 2**62):
        owned = [epoch_windows(plan, epoch) for plan in plans]
        every = [w for windows in owned for w in windows]
        assert len(set(every)) == len(every) == 6 * plans[0].windows_per_epoch
    # consuming batches walks the stream's epoch order: round r, step t of batch B is positions (r * 3 + t) * B ...
    plan, batch = plans[1], 5
    walked = [tuple(zip(*(a.tolist() for a in plan.windows(r, t, batch)))) for r in range(60) for t in range(3)]
    flat = [w for b in walked for w in b]
    per_epoch = plan.windows_per_epoch
    assert len(flat) >= 2 * per_epoch
    assert flat[:per_epoch] == epoch_windows(plan, 0) and flat[per_epoch : 2 * per_epoch] == epoch_windows(plan, 1)
    assert set(epoch_windows(plan, 0)) != set(epoch_windows(plan, 1))  # a new slice of a new shard order


@pytest.mark.timeout(30)
def test_streams_are_deterministic_and_depend_on_seed_and_stream(dataset_dir: Path) -> None:
    a = PreparedDataset.open(dataset_dir).stream(SEQ, stream_index=1, num_streams=3, steps_per_round=2, seed=9)
    b = PreparedDataset.open(dataset_dir).stream(SEQ, stream_index=1, num_streams=3, steps_per_round=2, seed=9)
    c = PreparedDataset.open(dataset_dir).stream(SEQ, stream_index=1, num_streams=3, steps_per_round=2, seed=10)
    d = PreparedDataset.open(dataset_dir).stream(SEQ, stream_index=2, num_streams=3, steps_per_round=2, seed=9)
    for round, step in [(0, 0), (5, 1), (2**64 - 1, 1)]:  # a round from the wire may be any uint64
        assert all((p == q).all() for p, q in zip(a.batch(round, step, 4), b.batch(round, step, 4)))
        assert not (a.batch(round, step, 4)[0] == c.batch(round, step, 4)[0]).all()
        assert not (a.batch(round, step, 4)[0] == d.batch(round, step, 4)[0]).all()


@pytest.mark.timeout(30)
def test_a_round_names_its_shards_from_the_index_alone(dataset_dir: Path, tmp_path: Path) -> None:
    """The lazy-download contract: the list comes from index.json without any shard on disk, in first-use order."""
    index_only = tmp_path / "index-only"
    index_only.mkdir()
    shutil.copy(dataset_dir / INDEX_NAME, index_only / INDEX_NAME)
    remote = PreparedDataset.open(index_only).stream(SEQ, stream_index=3, num_streams=8, steps_per_round=4)
    local = PreparedDataset.open(dataset_dir).stream(SEQ, stream_index=3, num_streams=8, steps_per_round=4)
    for round in range(12):
        needed = remote.shards_for_round(round, 2)
        read = [local.dataset.index.train[k].name for t in range(4) for k in local.plan.windows(round, t, 2)[0]]
        assert needed == list(dict.fromkeys(read))
        epoch = round * 4 * 2 // remote.plan.windows_per_epoch
        spanned = remote.plan.shards_for_epoch(epoch) + remote.plan.shards_for_epoch(epoch + 1)
        assert set(needed) <= {remote.dataset.index.train[k].name for k in spanned}
    shards = len(remote.dataset.index.train)
    assert shards >= 8 and len(remote.plan.shards_for_epoch(0)) <= shards // 8 + 2  # a slice: about K / S + 1
    assert remote.dataset._open == {}  # nothing was opened
    with pytest.raises(DataNotFound, match="shard"):
        remote.batch(0, 0, 2)


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=6), streams=st.integers(1, 7),
       seed=st.integers(0, 2**40), epoch=st.integers(0, 2**63 - 1))  # fmt: skip
def test_plans_partition_the_windows_for_any_shape(counts: list[int], streams: int, seed: int, epoch: int) -> None:
    tokens = [c * 4 + 3 for c in counts]  # seq_len 3: windows of 4, a 3-token tail each
    if sum(counts) < streams:
        with pytest.raises(ValueError, match="fewer than the"):
            StreamPlan(tokens, 3, stream_index=0, num_streams=streams, steps_per_round=1, seed=seed)
        return
    plans = [StreamPlan(tokens, 3, stream_index=s, num_streams=streams, steps_per_round=1, seed=seed)
             for s in range(streams)]  # fmt: skip
    every = [w for plan in plans for w in epoch_windows(plan, epoch)]
    assert len(set(every)) == len(every) == streams * (sum(counts) // streams)
    assert all(0 <= w < counts[k] for k, w in every)


@pytest.mark.timeout(10)
def test_permute_is_a_bijection() -> None:
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        keys = np.arange(6, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        assert sorted(permute(np.arange(n), n, keys).tolist()) == list(range(n))


@pytest.mark.timeout(30)
def test_heldout_batches_are_the_same_every_call_and_spread(dataset: PreparedDataset) -> None:
    first = list(dataset.heldout_batches(SEQ, 4, 3))
    again = list(dataset.heldout_batches(SEQ, 4, 3))
    assert len(first) == 3 and all((a[0] == b[0]).all() for a, b in zip(first, again))
    heldout = np.asarray(dataset.shard("heldout.bin"))
    available = len(heldout) // (SEQ + 1)
    starts = [w * (SEQ + 1) for w in np.arange(12) * available // 12]
    assert [x.tolist() for batch in first for x in batch[0]] == [heldout[s : s + SEQ].tolist() for s in starts]
    assert sum(len(b[0]) for b in dataset.heldout_batches(SEQ, 4, 10**6)) == available


@pytest.mark.timeout(30)
def test_a_corrupted_shard_is_refused_when_first_opened(dataset_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(dataset_dir, copy)
    name = PreparedDataset.open(copy).index.train[0].name
    data = bytearray((copy / name).read_bytes())
    data[100] ^= 1
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(CorruptShard, match="SHA-256"):
        PreparedDataset.open(copy).shard(name)
    (copy / name).write_bytes(bytes(data[:-2]))
    with pytest.raises(CorruptShard, match="bytes, expected"):
        PreparedDataset.open(copy).shard(name)
    stream = PreparedDataset.open(copy).stream(SEQ, stream_index=0, num_streams=1, steps_per_round=1)
    with pytest.raises(CorruptShard):  # some batch reads shard 0; none ever returns its tokens
        for round in range(200):
            stream.batch(round, 0, 8)


@pytest.mark.timeout(30)
def test_few_shards_stay_mapped_and_none_is_hashed_twice(dataset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peer.core.shards as shards

    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 2)
    hashed: list[Path] = []
    monkeypatch.setattr(shards, "sha256_file", lambda path: hashed.append(path) or sha256_file(path))
    dataset = PreparedDataset.open(dataset_dir)
    names = [s.name for s in dataset.index.train]
    for name in names + names:
        assert len(dataset.shard(name)) == next(s.tokens for s in dataset.index.train if s.name == name)
        assert len(dataset._open) <= 2
    assert [p.name for p in hashed] == names


def tampered(dataset_dir: Path, tmp_path: Path, change: dict) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(dataset_dir, copy)
    index = json.loads((copy / INDEX_NAME).read_text())
    index.update(change(index) if callable(change) else change)
    (copy / INDEX_NAME).write_text(json.dumps(index))
    return copy


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("change", "message"), [
    ({"version": 2}, "version 2"),
    ({"extra": 1}, "unknown field"),
    ({"dtype": "uint32"}, "does not suit"),
    ({"vocab_size": 70_000}, "does not suit"),
    ({"separator_ids": [300]}, "not ids of the vocabulary"),
    ({"total_tokens": 5}, "total_tokens"),
    (lambda i: {"train": [{**i["train"][0], "name": "../escape.bin"}, *i["train"][1:]]}, "malformed"),
    (lambda i: {"train": [{**i["train"][0], "tokens": "4000"}, *i["train"][1:]]}, "malformed"),
    (lambda i: {"heldout": {**i["heldout"], "name": i["train"][0]["name"]}}, "repeat"),
    (lambda i: {"train": i["train"][1:] + i["train"][:1]}, "shard_tokens"),
    ({"tokenizer": "abc"}, "neither 'bytes' nor a SHA-256"),
    ({"train": "shard-00000.bin"}, "malformed field"),
])  # fmt: skip
def test_a_bad_index_is_refused_on_open(dataset_dir: Path, tmp_path: Path, change: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        PreparedDataset.open(tampered(dataset_dir, tmp_path, change))


@pytest.mark.timeout(30)
def test_open_checks_the_dataset_id_and_finds_no_dataset(dataset_dir: Path, tmp_path: Path) -> None:
    dataset = PreparedDataset.open(dataset_dir)
    assert PreparedDataset.open(dataset_dir, dataset_id=dataset.dataset_id).index == dataset.index
    with pytest.raises(DataError, match="expected 00"):
        PreparedDataset.open(dataset_dir, dataset_id="00" * 32)
    with pytest.raises(DataNotFound, match="no prepared dataset"):
        PreparedDataset.open(tmp_path)
    (tmp_path / INDEX_NAME).write_text("[1, 2]")
    with pytest.raises(DataError, match="not a JSON object"):
        PreparedDataset.open(tmp_path)


@pytest.mark.timeout(30)
def test_the_index_round_trips_and_the_tokenizer_is_checked(dataset: PreparedDataset, dataset_dir: Path) -> None:
    assert type(dataset.index).parse(dataset.index.to_json()) == dataset.index
    assert (dataset_dir / INDEX_NAME).read_bytes() == dataset.index.to_json()
    assert dataset.tokenizer().vocab_size == 256
    bad_args = {"stream_index": 5, "num_streams": 5, "steps_per_round": 1}
    with pytest.raises(ValueError, match="stream_index"):
        dataset.stream(SEQ, **bad_args)
    with pytest.raises(ValueError, match="fewer than the"):
        dataset.stream(SEQ, stream_index=0, num_streams=10**6, steps_per_round=1)
    with pytest.raises(ValueError, match="batch_size"):
        dataset.stream(SEQ, stream_index=0, num_streams=1, steps_per_round=1).batch(0, 0, 10**6)
