"""peer/core/data.py: the embedded corpus, sources and their errors, tokenizers, and disjoint streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.core.data import (
    Corpus,
    TokenStream,
    default_corpus_text,
    load_corpus,
    stream_index_for,
    unigram_entropy,
    val_batches,
)
from peer.core.tokenizers import ByteTokenizer, load_tokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def default() -> Corpus:
    return load_corpus()


def _stream(tokens: torch.Tensor, index: int, num: int, seq_len: int = 7, **kw) -> TokenStream:
    return TokenStream(tokens, seq_len, stream_index=index, num_streams=num, steps_per_round=3, **kw)


def _ids_of_round(stream: TokenStream, round: int, batch_size: int) -> list[int]:
    return [
        i
        for step in range(stream.steps_per_round)
        for i in stream.window_ids(round, step, batch_size).tolist()
    ]


# --- the embedded corpus -------------------------------------------------------------------------


def test_default_corpus_loads_from_package_resources(default: Corpus) -> None:
    assert len(default_corpus_text().encode("utf-8")) > 2_000_000
    assert default.name == "default" and default.vocab_size == 256
    assert default.train.dtype == torch.uint8 and default.val.dtype == torch.uint8
    assert default.train.numel() + default.val.numel() > 2_000_000
    assert load_corpus("default").train.numel() == default.train.numel()


def test_default_corpus_entropy_is_that_of_english_bytes(default: Corpus) -> None:
    # English text at byte level sits near 4.5-5 bits (3.1-3.5 nats); uniform bytes would be ln 256 = 5.5.
    entropy = unigram_entropy(default.train, default.vocab_size)
    assert 2.9 < entropy < 3.6
    assert abs(unigram_entropy(default.val, 256) - entropy) < 0.1  # the val split samples the same text


def test_default_corpus_is_mostly_prose(default: Corpus) -> None:
    text = default.tokenizer.decode(default.train[:200_000].tolist())
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    assert letters / len(text) > 0.9
    assert ">>>" not in text


def test_val_split_is_disjoint_from_train(default: Corpus) -> None:
    train_docs = set(bytes(default.train.numpy()).decode("utf-8").split("\n\n"))
    val_docs = bytes(default.val.numpy()).decode("utf-8").split("\n\n")
    assert 0.03 < default.val.numel() / (default.train.numel() + default.val.numel()) < 0.07
    assert not train_docs.intersection(val_docs)


# --- streams -------------------------------------------------------------------------------------


def test_batches_are_shifted_windows_of_the_corpus() -> None:
    tokens = torch.arange(8 * 40, dtype=torch.int32)  # window w is w*8 .. w*8+7
    stream = _stream(tokens, 1, 4)
    x, y = stream.batch(0, 2, 3)
    assert x.shape == y.shape == (3, 7) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()  # callers may .view() them
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 0] % 8, torch.zeros(3, dtype=torch.int64))  # aligned to window starts
    assert torch.equal(x[:, 0] // 8, stream.window_ids(0, 2, 3))


def test_streams_are_disjoint_and_rounds_never_repeat_within_an_epoch() -> None:
    tokens = torch.randint(0, 256, (8 * 1000,), dtype=torch.uint8)  # 1000 windows, 4 streams: 250 each
    streams = [_stream(tokens, i, 4) for i in range(4)]
    rounds_per_epoch = 250 // (3 * 10)  # 8 full rounds of 3 steps x batch 10
    seen: set[int] = set()
    for stream in streams:
        ids = [i for r in range(rounds_per_epoch) for i in _ids_of_round(stream, r, 10)]
        assert len(ids) == len(set(ids)) == 240
        assert not seen.intersection(ids)
        seen.update(ids)


def test_streams_are_deterministic_and_depend_on_seed() -> None:
    tokens = torch.randint(0, 256, (8 * 500,), dtype=torch.uint8)
    a, b = _stream(tokens, 2, 3, seed=5), _stream(tokens, 2, 3, seed=5)
    for round, step in [(0, 0), (7, 2), (3, 1), (0, 0)]:  # any order, no hidden state
        assert torch.equal(a.batch(round, step, 4)[0], b.batch(round, step, 4)[0])
    assert not torch.equal(a.window_ids(0, 0, 16), _stream(tokens, 2, 3, seed=6).window_ids(0, 0, 16))


def test_epoch_wrap_uses_a_new_permutation_of_the_same_windows() -> None:
    tokens = torch.randint(0, 256, (8 * 60,), dtype=torch.uint8)  # 60 windows, 2 streams: 30 each
    stream = _stream(tokens, 0, 2)  # 3 steps x batch 5 = 15 windows per round: 2 rounds per epoch
    epoch0 = _ids_of_round(stream, 0, 5) + _ids_of_round(stream, 1, 5)
    epoch1 = _ids_of_round(stream, 2, 5) + _ids_of_round(stream, 3, 5)
    assert len(set(epoch0)) == len(set(epoch1)) == 30
    assert epoch0 != epoch1  # reshuffled (and, with a new permutation, a new subset for this stream)
    straddling = _stream(tokens, 0, 2)  # batch 4 does not divide 30: one batch spans two epochs
    ids = [i for r in range(4) for i in _ids_of_round(straddling, r, 4)]
    assert len(set(ids[:30])) == 30 and len(set(ids[30:48])) == 18


@settings(max_examples=25, deadline=None)
@given(
    n_windows=st.integers(10, 200),
    num=st.integers(1, 6),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**40),
)
def test_streams_disjoint_for_any_shape(n_windows: int, num: int, batch: int, seed: int) -> None:
    tokens = torch.zeros(8 * n_windows, dtype=torch.uint8)
    if n_windows // num < batch:
        with pytest.raises(ValueError, match="batch_size"):
            _stream(tokens, 0, num, seed=seed).batch(0, 0, batch)
        return
    per_stream = n_windows // num
    owned = []
    for index in range(num):
        stream = _stream(tokens, index, num, seed=seed)
        ids = [
            i for r in range(per_stream // batch) for s in range(3) for i in stream.window_ids(r, s, batch)
        ]
        ids = [int(i) for i in ids][:per_stream]  # exactly one epoch
        assert len(set(ids)) == len(ids)
        owned.append(set(ids))
    assert sum(map(len, owned)) == len(set().union(*owned))


def test_stream_rejects_bad_arguments() -> None:
    tokens = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fewer than the 20 streams"):
        _stream(tokens, 0, 20)
    with pytest.raises(ValueError, match="stream_index"):
        _stream(tokens, 4, 4)
    stream = _stream(tokens, 0, 2)
    with pytest.raises(ValueError, match="step"):
        stream.batch(0, 3, 1)
    with pytest.raises(ValueError, match="batch_size 7"):
        stream.batch(0, 0, 7)


def test_stream_index_for_is_stable_and_spread() -> None:
    assert stream_index_for(b"peer-a", 1000) == stream_index_for(b"peer-a", 1000)
    assert stream_index_for(b"\x00" * 32, 97) == 21  # pinned: the hash must not change between releases
    indices = {stream_index_for(bytes([i, 7]), 16) for i in range(200)}
    assert indices == set(range(16))


def test_val_batches_are_deterministic_and_cover_the_split(default: Corpus) -> None:
    first = list(val_batches(default, 64, 8, 5))
    again = list(val_batches(default, 64, 8, 5))
    assert len(first) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    x, y = first[0]
    assert x.shape == (8, 64) and torch.equal(y[:, :-1], x[:, 1:])
    tiny = Corpus(name="t", train=torch.zeros(10), val=torch.arange(30, dtype=torch.uint8), vocab_size=256,
                  tokenizer=ByteTokenizer())  # fmt: skip
    assert [b[0].shape[0] for b in val_batches(tiny, 4, 4, 10)] == [4, 2]  # 6 windows, last batch short
    assert list(val_batches(tiny, 4, 4, 0)) == []
    with pytest.raises(ValueError, match="val split"):
        next(val_batches(tiny, 40, 1, 1))


def test_unigram_entropy_in_nats() -> None:
    assert unigram_entropy(torch.tensor([3, 3, 3]), 8) == 0.0
    uniform = torch.arange(256).repeat(4)
    assert unigram_entropy(uniform, 256) == pytest.approx(torch.log(torch.tensor(256.0)).item())


# --- sources -------------------------------------------------------------------------------------


def test_txt_jsonl_and_directory_sources(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("".join(f"paragraph {i}\n\n" for i in range(20)))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": f"record {i}"}) + "\n" for i in range(20)))
    (tmp_path / "ignored.csv").write_text("x,y\n")
    txt = load_corpus(tmp_path / "b.txt", val_fraction=0.1)
    assert txt.tokenizer.decode(txt.val.tolist()) == "paragraph 9\n\nparagraph 19"
    jsonl = load_corpus(tmp_path / "a.jsonl", text_field="body", val_fraction=0.5)
    assert jsonl.tokenizer.decode(jsonl.train.tolist()).startswith("record 0\n\nrecord 2\n\n")
    both = load_corpus(tmp_path, text_field="body", val_fraction=0.25)  # sorted: a.jsonl, then b.txt
    text = both.tokenizer.decode(both.train.tolist())
    assert text.startswith("record 0") and text.endswith("paragraph 18") and "x,y" not in text
    assert both.val.numel() > 0 and both.name == str(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
        (
            '{"text": "ok"}\n\n{"body": "no text"}\n',
            r"bad\.jsonl:3: expected a JSON object with a string field 'text'",
        ),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
        ("\n\n", r"contains no text"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_corpus(tmp_path / "bad.jsonl")


def test_missing_and_unusable_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        load_corpus(tmp_path)
    (tmp_path / "one.txt").write_text("a single paragraph")
    with pytest.raises(ValueError, match="18 tokens, too few to hold out 5%"):
        load_corpus(tmp_path / "one.txt")
    assert load_corpus(tmp_path / "one.txt", val_fraction=0.0).val.numel() == 0
    (tmp_path / "long.txt").write_text("x" * 1000 + "y" * 1000)  # one document: the tail is held out
    long = load_corpus(tmp_path / "long.txt", val_fraction=0.1)
    assert long.train.numel() == 1800 and long.val.tolist() == [ord("y")] * 200
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported corpus file type"):
        load_corpus(tmp_path / "data.csv")


# --- tokenizers ----------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = load_tokenizer(None)
    text = "naïve café — 東京"
    assert tok.decode(tok.encode(text)) == text and tok.vocab_size == 256
    assert tok.encode_documents([text, text], "\n").tolist() == tok.encode(f"{text}\n{text}")
    assert tok.decode([0xFF]) == "\ufffd"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_corpus(None, tokenizer=tmp_path / "tokenizer.json")


def test_tokenizer_json_source(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.txt").write_text("hello world\n\nworld hello\n\nhello hello")
    corpus = load_corpus(tmp_path / "c.txt", tokenizer=tmp_path / "tokenizer.json", val_fraction=0.34)
    assert corpus.vocab_size == 3 and corpus.train.dtype == torch.uint8  # a small vocabulary fits bytes
    assert corpus.train.tolist() == [1, 2, 2, 1] and corpus.val.tolist() == [1, 1]
