"""The documents of `murmur prepare-data`'s inputs, read one at a time so that memory never grows with the corpus.

Why a generator of pieces: a run's corpus is gigabytes; the writer (peer/core/prepare.py) holds one batch of
documents, never a file. A document is a paragraph of a text file (text between blank lines, exactly as
peer/core/data.py splits it) or one record of a jsonl file, a parquet file or a Hugging Face dataset; a paragraph
longer than MAX_PIECE_CHARS comes in pieces cut at line ends, and only the first piece starts a document (the
writer puts separators between documents, never between pieces).

Inputs, in the order given: .txt and .jsonl files, either compressed (.gz, .zst), .parquet files, directories of
those (walked recursively in sorted order, hidden entries and other files skipped), and `hf:NAME[:CONFIG][@SPLIT]`,
a dataset in the local Hugging Face cache or a folder written by `save_to_disk` (the optional `datasets` package;
never downloads). .zst needs `zstandard` and .parquet needs `pyarrow`: the `data` extra.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from protocol.errors import DataError, DataNotFound

MAX_PIECE_CHARS = 1 << 20
"""A paragraph longer than this is handed on in pieces (cut at line ends), so one huge file without blank lines
does not become one string."""
HF_PREFIX = "hf:"
_KINDS = {".txt": "txt", ".txt.gz": "txt", ".txt.zst": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl",
          ".jsonl.zst": "jsonl", ".parquet": "parquet"}  # fmt: skip
_WHITESPACE_LINE = re.compile(r"[ \t]*\n")
_PARQUET_BATCH = 1024
INSTALL_HINT = "pip install 'murmur[data]'"


class Piece(NamedTuple):
    """Text of one document, or a part of one (`starts_document` False: it continues the previous piece)."""

    text: str
    starts_document: bool


@dataclass(frozen=True, slots=True)
class Input:
    """One readable input: a file with its kind, or a Hugging Face dataset."""

    spec: str
    """The file's path, or hf:NAME[:CONFIG][@SPLIT]."""
    kind: str
    """txt, jsonl, parquet or hf."""
    size: int = 0
    """Bytes on disk (0 for hf)."""


def resolve_inputs(specs: Sequence[str]) -> list[Input]:
    """Every file (directories expanded) or dataset the specs name, checked before any work starts: a missing
    path, a directory with nothing readable, an unknown suffix or a missing optional package is a DataError now
    rather than after an hour of tokenising."""
    inputs: list[Input] = []
    for spec in specs:
        if spec.startswith(HF_PREFIX):
            _offline_datasets(spec)
            inputs.append(Input(spec, "hf"))
            continue
        path = Path(spec)
        if path.is_dir():
            files = [p for p in sorted(_walk(path)) if _kind(p)]
            if not files:
                raise DataError(f"directory {path} holds no {', '.join(_KINDS)} files")
            inputs.extend(_file_input(p) for p in files)
        elif path.is_file():
            inputs.append(_file_input(path))
        else:
            raise DataNotFound(f"input not found: {path}")
    return inputs


def _walk(root: Path) -> Iterator[Path]:
    """Files under root, hidden entries (.cache, .git) skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (Path(dirpath) / f for f in filenames if not f.startswith("."))


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in _KINDS.items() if name.endswith(suffix)), None)


def _file_input(path: Path) -> Input:
    kind = _kind(path)
    if kind is None:
        raise DataError(f"{path}: unsupported input type (use {', '.join(_KINDS)}, a directory, or hf:NAME)")
    if kind == "parquet":
        _require("pyarrow", f"reading {path} needs the optional 'pyarrow' package: {INSTALL_HINT}")
    if path.name.lower().endswith(".zst"):
        _require("zstandard", f"reading {path} needs the optional 'zstandard' package: {INSTALL_HINT}")
    return Input(str(path), kind, path.stat().st_size)


def _require(module: str, message: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise DataError(message) from None


def read_pieces(inputs: Iterable[Input], text_field: str = "text") -> Iterator[Piece]:
    """The documents of every input in order, as pieces; a malformed one is a DataError naming file and line."""
    for item in inputs:
        if item.kind == "txt":
            with _open_text(Path(item.spec)) as f:
                yield from _guarded(item.spec, _paragraph_pieces(f))
        elif item.kind == "jsonl":
            with _open_text(Path(item.spec)) as f:
                yield from _guarded(item.spec, _jsonl_pieces(f, item.spec, text_field))
        elif item.kind == "parquet":
            yield from _parquet_pieces(Path(item.spec), text_field)
        else:
            yield from _hf_pieces(item.spec, text_field)


def _open_text(path: Path) -> IO[str]:
    """Text of a file, decompressed on the fly; undecodable bytes become U+FFFD as in peer/core/data.py."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".zst"):
        import zstandard

        # every frame of a concatenated file; windows up to 2 GiB, as `zstd --long=31` writes
        decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        raw = decompressor.stream_reader(path.open("rb"), read_across_frames=True, closefd=True)
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _guarded(name: str, pieces: Iterator[Piece]) -> Iterator[Piece]:
    """pieces, with a truncated or corrupt compressed stream reported as a DataError naming the file."""
    try:
        yield from pieces
    except _read_errors() as exc:
        raise DataError(f"{name}: cannot read ({exc})") from None


def _read_errors() -> tuple[type[Exception], ...]:
    """What a broken file raises while read: OSError (gzip's BadGzipFile), EOFError, and zstandard's own error."""
    try:
        from zstandard import ZstdError
    except ImportError:
        return OSError, EOFError
    return OSError, EOFError, ZstdError


def _paragraph_pieces(lines: Iterable[str]) -> Iterator[Piece]:
    """Paragraphs of text, split as peer/core/data.py `_paragraphs` splits a whole string (at r"\\n[ \\t]*\\n"):
    a later line of spaces and tabs ends a paragraph, the first line of one is always text, and a paragraph
    is stripped of newlines at its ends and dropped when blank. Long ones come in pieces (MAX_PIECE_CHARS)."""
    buf: list[str] = []
    size = 0
    started = False  # this paragraph already handed on a piece
    for line in lines:
        if buf and _WHITESPACE_LINE.fullmatch(line):
            yield from _end_paragraph(buf, started)
            buf, size, started = [], 0, False
            continue
        buf.append(line)
        size += len(line)
        if size > MAX_PIECE_CHARS and len(buf) > 1:  # keep the last line back: it may end the paragraph
            text = "".join(buf[:-1])
            if started or text.strip():  # a blank head stays: only the paragraph's end says if it is all blank
                yield Piece(text if started else text.lstrip("\n"), not started)
                started = True
                buf, size = buf[-1:], len(buf[-1])
    yield from _end_paragraph(buf, started)


def _end_paragraph(buf: list[str], started: bool) -> Iterator[Piece]:
    text = "".join(buf)
    text = text.rstrip("\n") if started else text.strip("\n")
    if started:
        yield Piece(text, False)
    elif text.strip():
        yield Piece(text, True)


def _jsonl_pieces(lines: Iterable[str], name: str, text_field: str) -> Iterator[Piece]:
    """The `text_field` of every non-blank line; blank texts skipped, as peer/core/data.py does."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{name}:{lineno}: expected a JSON object with a string field {text_field!r}")
        if record[text_field].strip():
            yield Piece(record[text_field], True)


def _parquet_pieces(path: Path, column: str) -> Iterator[Piece]:
    """The non-blank strings of one column, read a row group batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        field = file.schema_arrow.field(column) if column in file.schema_arrow.names else None
        if field is None:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(file.schema_arrow.names)})")
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            raise DataError(f"{path}: column {column!r} holds {field.type}, not strings")
        for batch in file.iter_batches(batch_size=_PARQUET_BATCH, columns=[column]):
            yield from (Piece(text, True) for text in batch.column(0).to_pylist() if text and text.strip())
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None


def _hf_pieces(spec: str, column: str) -> Iterator[Piece]:
    """The non-blank strings of one column of a local Hugging Face dataset, through its memory-mapped Arrow files."""
    dataset = _load_hf(spec)
    if column not in dataset.column_names:
        raise DataError(f"{spec}: no column {column!r} (columns: {', '.join(dataset.column_names)})")
    for batch in dataset.select_columns([column]).iter(batch_size=_PARQUET_BATCH):
        for text in batch[column]:
            if not (text is None or isinstance(text, str)):
                raise DataError(f"{spec}: column {column!r} holds {type(text).__name__}, not strings")
            if text and text.strip():
                yield Piece(text, True)


def _offline_datasets(spec: str) -> None:
    """Import `datasets` with the Hub switched off: prepare-data reads what the owner has, it never downloads
    (and does not wait out a minute of retries to find that out). The environment covers a first import, the
    two flags one that happened earlier in this process."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    _require("datasets", f"{spec} needs the optional 'datasets' package: pip install datasets")
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True


def _load_hf(spec: str) -> Any:
    """hf:NAME[:CONFIG][@SPLIT] (split "train" by default): a save_to_disk folder, or a dataset in the local cache
    (resolve_inputs switched the Hub off)."""
    import datasets

    rest, _, split = spec[len(HF_PREFIX) :].partition("@")
    name, _, config = rest.partition(":")
    split = split or "train"
    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(name, config or None, split=split)
    except (OSError, ValueError, KeyError) as exc:  # ConnectionError (not cached) and FileNotFoundError are OSErrors
        raise DataError(f"{spec}: cannot load from the local Hugging Face cache ({exc})") from None


def describe_inputs(specs: Sequence[str], inputs: Sequence[Input]) -> list[dict[str, Any]]:
    """What index.json says the dataset came from: each spec as given, with its files and bytes."""
    described = []
    for spec in specs:
        if spec.startswith(HF_PREFIX):
            described.append({"input": spec, "files": 0, "bytes": 0})
            continue
        root = Path(spec)
        mine = [i for i in inputs if i.kind != "hf" and (Path(i.spec) == root or root in Path(i.spec).parents)]
        described.append({"input": spec, "files": len(mine), "bytes": sum(i.size for i in mine)})
    return described
