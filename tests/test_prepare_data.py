"""`murmur prepare-data` (peer/core/prepare.py, sources.py, encoders.py): every input format round-trips, the
tokenizer is trained or given, the index names every file by SHA-256, the dataset id comes last and is the same
twice, and every bad input is one line with no traceback and no half dataset left behind.

The reader and its streams are tests/test_shards.py. Most cases run in-process (CliRunner); one goes through the
real entry point to show what a user sees.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from peer.cli.main import main
from peer.core import sources
from peer.core.data import _paragraphs, default_corpus_text
from peer.core.shards import INDEX_NAME, PreparedDataset, sha256_file, shard_dtype
from protocol.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FRACTION = 0.1
DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(5 + i % 9)) for i in range(57)]
DOCS[3] = "Unicode survives: naïve café, 東京, emoji 🙂, and a tab\there."
DOCS[11] = "A document that says <|endoftext|> in its text, which must stay text."
DOCS[20] = "Lines inside\na document stay\ntogether."


def expected_split(docs: list[str], fraction: float = FRACTION) -> tuple[list[str], list[str]]:
    """(train, held out) by the rule of peer/core/prepare.py's docstring (no held-out cap)."""
    held = [math.floor((i + 1) * fraction) > math.floor(i * fraction) for i in range(len(docs))]
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def write_inputs(folder: Path, docs: list[str] = DOCS) -> dict[str, Path]:
    """The same documents as .txt (paragraphs), .jsonl, .jsonl.gz, .jsonl.zst and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True, exist_ok=True)
    jsonl = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    paths = {kind: folder / f"docs.{kind}" for kind in ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")}
    paths["txt"].write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")
    paths["jsonl"].write_bytes(jsonl)
    paths["jsonl.gz"].write_bytes(gzip.compress(jsonl))
    cut = jsonl.index(b"\n", len(jsonl) // 2) + 1  # two frames, as concatenated .zst files come
    frames = (zstandard.ZstdCompressor().compress(part) for part in (jsonl[:cut], jsonl[cut:]))
    paths["jsonl.zst"].write_bytes(b"".join(frames))
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), paths["parquet"], row_group_size=10)
    return paths


def prepare(*args: str | Path) -> Result:
    """`murmur prepare-data ARGS` in-process, no progress bars; asserts it succeeded."""
    result = CliRunner().invoke(main, ["prepare-data", *map(str, args)], env={"MURMUR_LOG_LEVEL": "WARNING"})
    assert result.exit_code == 0, (result.output, result.exc_info)
    return result


def fails(tmp_path: Path, *args: str | Path) -> str:
    """`murmur prepare-data ARGS` fails with one line and no traceback, leaves no dataset nor staging folder."""
    out = tmp_path / "failed-out"
    result = CliRunner().invoke(main, ["prepare-data", *map(str, args), "--out", str(out)],
                                env={"MURMUR_LOG_LEVEL": "WARNING"})  # fmt: skip
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) <= 4, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".failed-out.*")), "a half dataset was left behind"
    return errors[0]


def tokens(dataset: PreparedDataset, split: str = "train") -> np.ndarray:
    names = [s.name for s in dataset.index.train] if split == "train" else [dataset.index.heldout.name]
    return np.concatenate([np.asarray(dataset.shard(name)) for name in names]).astype(np.int64)


def documents(dataset: PreparedDataset, split: str = "train") -> list[str]:
    """The documents of a split, decoded: the stream cut at each separator."""
    ids, sep, tok = tokens(dataset, split), list(dataset.index.separator_ids), dataset.tokenizer()
    if len(sep) == 1:  # each part after the first starts with the separator
        parts = np.split(ids, np.flatnonzero(ids == sep[0]))
        return [tok.decode(parts[0].tolist())] + [tok.decode(part[1:].tolist()) for part in parts[1:]]
    return tok.decode(ids.tolist()).split(tok.decode(sep))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> tuple[Path, str]:
    """A dataset of the jsonl input with a trained BPE of 300 tokens: (folder, the command's stdout)."""
    out = tmp_path_factory.mktemp("trained") / "ds"
    result = prepare("--input", inputs["jsonl"], "--out", out, "--train-tokenizer", 300, "--shard-tokens", 400,
                     "--heldout-fraction", FRACTION)  # fmt: skip
    return out, result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_every_input_format_round_trips_with_bytes(tmp_path: Path, inputs: dict[str, Path], kind: str) -> None:
    prepare("--input", inputs[kind], "--out", tmp_path / "ds", "--tokenizer", "bytes", "--shard-tokens", 300,
            "--heldout-fraction", FRACTION)  # fmt: skip
    dataset = PreparedDataset.open(tmp_path / "ds")
    train, held = expected_split(DOCS)
    assert dataset.index.separator_ids == (10, 10) and dataset.index.eos_id is None
    assert bytes(tokens(dataset).astype(np.uint8)).decode() == "\n\n".join(train)
    assert bytes(tokens(dataset, "heldout").astype(np.uint8)).decode() == "\n\n".join(held)
    assert dataset.index.documents == {"train": len(train), "heldout": len(held)}
    assert [s.tokens for s in dataset.index.train][:-1] == [300] * (len(dataset.index.train) - 1)
    assert 0 < dataset.index.train[-1].tokens <= 300 and len(dataset.index.train) > 3
    assert dataset.index.dtype == "uint16" and (tmp_path / "ds" / "shard-00000.bin").stat().st_size == 600


@pytest.mark.timeout(60)
def test_a_directory_reads_its_files_in_sorted_order_and_records_them(tmp_path: Path) -> None:
    write_inputs(tmp_path / "corpus" / "b", DOCS[30:])
    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(DOCS[:30]))
    (tmp_path / "corpus" / "notes.md").write_text("skipped")
    (tmp_path / "corpus" / ".hidden.txt").write_text("skipped")
    for kind in ("jsonl.gz", "jsonl.zst", "parquet", "txt"):  # keep one copy of DOCS[30:]: b/docs.jsonl
        (tmp_path / "corpus" / "b" / f"docs.{kind}").unlink()
    prepare("--input", tmp_path / "corpus", "--out", tmp_path / "ds", "--tokenizer", "bytes",
            "--heldout-fraction", FRACTION)  # fmt: skip
    dataset = PreparedDataset.open(tmp_path / "ds")
    train, held = expected_split(DOCS)
    assert documents(dataset) == train and documents(dataset, "heldout") == held
    read = [tmp_path / "corpus" / "a.txt", tmp_path / "corpus" / "b" / "docs.jsonl"]
    assert dataset.index.inputs == ({"input": str(tmp_path / "corpus"), "files": 2,
                                     "bytes": sum(p.stat().st_size for p in read)},)  # fmt: skip


@pytest.mark.timeout(60)
def test_trained_tokenizer_round_trips_documents_and_separates_them_by_eos(trained: tuple[Path, str]) -> None:
    dataset = PreparedDataset.open(trained[0])
    index = dataset.index
    assert index.vocab_size == 300 and index.eos_id == 0 and index.separator_ids == (0,)
    assert index.tokenizer == sha256_file(trained[0] / "tokenizer.json") and index.tokenizer_file == "tokenizer.json"
    train, held = expected_split(DOCS)
    assert documents(dataset) == train and documents(dataset, "heldout") == held
    # "<|endoftext|>" inside a document is text: the eos id appears only between documents
    assert int((tokens(dataset) == 0).sum()) == len(train) - 1 and "<|endoftext|>" in "".join(train)


@pytest.mark.timeout(60)
def test_a_given_tokenizer_gives_the_same_dataset_as_the_one_trained(tmp_path: Path, inputs: dict[str, Path],
                                                                     trained: tuple[Path, str]) -> None:  # fmt: skip
    given = tmp_path / "tok.json"
    given.write_bytes((trained[0] / "tokenizer.json").read_bytes())
    result = prepare("--input", inputs["jsonl"], "--out", tmp_path / "ds", "--tokenizer", given, "--shard-tokens", 400,
                     "--heldout-fraction", FRACTION)  # fmt: skip
    assert result.stdout.splitlines()[-1] == trained[1].splitlines()[-1]
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == given.read_bytes()


@pytest.mark.timeout(60)
def test_index_names_every_file_by_sha256_and_the_id_comes_last(trained: tuple[Path, str]) -> None:
    folder, stdout = trained
    index = json.loads((folder / INDEX_NAME).read_text())
    for shard in [*index["train"], index["heldout"]]:
        assert hashlib.sha256((folder / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        assert (folder / shard["name"]).stat().st_size == 2 * shard["tokens"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [INDEX_NAME, "tokenizer.json", "heldout.bin", *(s["name"] for s in index["train"])]
    )
    assert index["total_tokens"] == sum(s["tokens"] for s in [*index["train"], index["heldout"]])
    assert stdout.splitlines()[-1] == hashlib.sha256((folder / INDEX_NAME).read_bytes()).hexdigest()
    assert PreparedDataset.open(folder).dataset_id == stdout.splitlines()[-1]


@pytest.mark.timeout(90)
def test_same_inputs_twice_give_the_same_dataset_id(tmp_path: Path, inputs: dict[str, Path],
                                                    trained: tuple[Path, str]) -> None:  # fmt: skip
    again = prepare("--input", inputs["jsonl"], "--out", tmp_path / "again", "--train-tokenizer", 300,
                    "--shard-tokens", 400, "--heldout-fraction", FRACTION)  # fmt: skip
    assert again.stdout.splitlines()[-1] == trained[1].splitlines()[-1]


@pytest.mark.timeout(60)
def test_uint32_shards_for_a_vocabulary_over_65536(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "big.json"))
    docs = [" ".join(f"w{(i * 9973 + j * 4099) % 69_998 + 2}" for j in range(6)) for i in range(40)]
    (tmp_path / "in.txt").write_text("\n\n".join(docs))
    prepare("--input", tmp_path / "in.txt", "--out", tmp_path / "ds", "--tokenizer", tmp_path / "big.json",
            "--heldout-fraction", 0.25)  # fmt: skip
    dataset = PreparedDataset.open(tmp_path / "ds")
    assert dataset.index.dtype == "uint32" and dataset.index.vocab_size == 70_000 and dataset.index.eos_id == 1
    assert (tmp_path / "ds" / "shard-00000.bin").stat().st_size == 4 * dataset.index.train[0].tokens
    train, _ = expected_split(docs, 0.25)
    expected = [1 if w == "</s>" else vocab[w] for w in " </s> ".join(train).split()]
    assert tokens(dataset).tolist() == expected and max(expected) > 65_535


@pytest.mark.timeout(10)
def test_shard_dtype_follows_the_vocabulary() -> None:
    assert [shard_dtype(v) for v in (256, 65_536, 65_537, 1 << 32)] == ["uint16", "uint16", "uint32", "uint32"]
    with pytest.raises(DataError, match="does not fit uint32"):
        shard_dtype((1 << 32) + 1)


@pytest.mark.timeout(60)
def test_heldout_shard_stops_at_its_size_and_later_documents_train(tmp_path: Path, inputs: dict[str, Path]) -> None:
    prepare("--input", inputs["jsonl"], "--out", tmp_path / "ds", "--tokenizer", "bytes", "--heldout-fraction", 0.5,
            "--heldout-tokens", 100)  # fmt: skip
    dataset = PreparedDataset.open(tmp_path / "ds")
    assert dataset.index.heldout.tokens == 100
    held = expected_split(DOCS, 0.5)[1]
    assert bytes(tokens(dataset, "heldout").astype(np.uint8)) == "\n\n".join(held).encode()[:100]
    n = next(k for k in range(1, len(held)) if len("\n\n".join(held[:k]).encode()) >= 100)  # the one cut at 100
    assert dataset.index.documents == {"train": len(DOCS) - n, "heldout": n} and n < len(held)
    assert documents(dataset) == [d for d in DOCS if d not in held[:n]]


@pytest.mark.timeout(60)
def test_long_paragraphs_come_in_pieces_that_join_back(monkeypatch: pytest.MonkeyPatch) -> None:
    text = default_corpus_text()[:300_000] + "\n\n" + "x" * 5000 + "\n  \n\t\nlast\n "
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 64)
    docs: list[str] = []
    for piece in sources._paragraph_pieces(io.StringIO(text)):
        docs.append(piece.text) if piece.starts_document else docs.__setitem__(-1, docs[-1] + piece.text)
    assert docs == _paragraphs(text)


@pytest.mark.timeout(60)
@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="optional 'datasets' not installed")
def test_a_hugging_face_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "hf"))
    prepare("--input", f"hf:{tmp_path / 'hf'}", "--text-field", "body", "--out", tmp_path / "ds", "--tokenizer",
            "bytes", "--heldout-fraction", FRACTION)  # fmt: skip
    assert documents(PreparedDataset.open(tmp_path / "ds")) == expected_split(DOCS)[0]



@pytest.mark.timeout(60)
@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="optional 'datasets' not installed")
def test_a_dataset_not_in_the_cache_is_an_error_not_a_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # restored after the test, as the flags below
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    error = fails(tmp_path, "--input", "hf:nobody/no-such-dataset", "--tokenizer", "bytes")
    assert "hf:nobody/no-such-dataset: cannot load from the local Hugging Face cache" in error


BAD_JSONL = '{"text": "fine"}\n{"text": "also fine"}\nnot json\n'


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "content", "words"), [
    ("missing.jsonl", None, ["input not found", "missing.jsonl"]),
    ("bad.jsonl", BAD_JSONL, ["bad.jsonl:3", "not valid JSON"]),
    ("nofield.jsonl", '{"body": "x"}\n', ["nofield.jsonl:1", "'text'"]),
    ("bad.parquet", "PAR1 this is not parquet", ["bad.parquet", "not a readable parquet"]),
    ("bad.jsonl.gz", b"\x1f\x8b\x08\x00garbage", ["bad.jsonl.gz", "cannot read"]),
    ("bad.jsonl.zst", b"not zstd at all", ["bad.jsonl.zst", "cannot read"]),
    ("notes.md", "text", ["unsupported input type"]),
])  # fmt: skip
def test_bad_inputs_are_one_line_errors(tmp_path: Path, name: str, content: str | bytes | None,
                                        words: list[str]) -> None:  # fmt: skip
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    error = fails(tmp_path, "--input", path, "--tokenizer", "bytes")
    assert all(word in error for word in words), error


@pytest.mark.timeout(60)
def test_bad_options_and_outputs_are_one_line_errors(tmp_path: Path, inputs: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad-tok.json").write_text("{}")
    jsonl = str(inputs["jsonl"])
    assert "exactly one of" in fails(tmp_path, "--input", jsonl)
    assert "exactly one of" in fails(tmp_path, "--input", jsonl, "--tokenizer", "bytes", "--train-tokenizer", "300")
    assert "257" in fails(tmp_path, "--input", jsonl, "--train-tokenizer", "100")
    (tmp_path / "bad.jsonl").write_text(BAD_JSONL)  # raised inside the tokenizer's training, still one line
    assert "bad.jsonl:3" in fails(tmp_path, "--input", tmp_path / "bad.jsonl", "--train-tokenizer", "300")
    assert "tokenizer file not found" in fails(tmp_path, "--input", jsonl, "--tokenizer", tmp_path / "nope.json")
    assert "not a Hugging Face tokenizer.json" in fails(tmp_path, "--input", jsonl, "--tokenizer",
                                                        tmp_path / "bad-tok.json")  # fmt: skip
    assert "holds no" in fails(tmp_path, "--input", tmp_path / "empty", "--tokenizer", "bytes")
    assert "no column 'body'" in fails(tmp_path, "--input", inputs["parquet"], "--text-field", "body", "--tokenizer",
                                       "bytes")  # fmt: skip
    assert "no held-out tokens" in fails(tmp_path, "--input", jsonl, "--tokenizer", "bytes", "--heldout-fraction",
                                         "0.001")  # fmt: skip
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    result = CliRunner().invoke(main, ["prepare-data", "--input", jsonl, "--tokenizer", "bytes", "--out",
                                       str(tmp_path / "taken")])  # fmt: skip
    assert result.exit_code == 1 and "not an empty folder" in result.stderr and "Traceback" not in result.output


@pytest.mark.timeout(60)
def test_a_failure_late_in_the_input_leaves_nothing_behind(tmp_path: Path, inputs: dict[str, Path]) -> None:
    (tmp_path / "late-bad.jsonl").write_text(BAD_JSONL)
    error = fails(tmp_path, "--input", inputs["jsonl"], "--input", tmp_path / "late-bad.jsonl", "--tokenizer", "bytes",
                  "--shard-tokens", "100")  # fmt: skip
    assert "late-bad.jsonl:3" in error


@pytest.mark.timeout(60)
def test_a_missing_extra_names_the_install(tmp_path: Path, inputs: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    assert "pip install 'murmur[data]'" in fails(tmp_path, "--input", inputs["parquet"], "--tokenizer", "bytes")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert "pip install 'murmur[data]'" in fails(tmp_path, "--input", inputs["jsonl.zst"], "--tokenizer", "bytes")


@pytest.mark.timeout(120)
def test_the_real_command_prints_the_id_last_and_errors_without_traceback(tmp_path: Path,
                                                                          inputs: dict[str, Path]) -> None:  # fmt: skip
    def murmur(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "peer.cli.main", "prepare-data", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=100)  # fmt: skip

    done = murmur("--input", inputs["txt"], "--out", tmp_path / "ds", "--tokenizer", "bytes", "--heldout-fraction", 0.1)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == hashlib.sha256((tmp_path / "ds" / INDEX_NAME).read_bytes()).hexdigest()
    (tmp_path / "bad.jsonl").write_text(BAD_JSONL)
    bad = murmur("--input", tmp_path / "bad.jsonl", "--out", tmp_path / "bad", "--tokenizer", "bytes")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    assert bad.stderr.strip().splitlines() == [f"Error: {tmp_path / 'bad.jsonl'}:3: not valid JSON (Expecting value)"]
