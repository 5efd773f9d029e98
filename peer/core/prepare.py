"""`murmur prepare-data`: text, jsonl and parquet inputs become the token shards of peer/core/shards.py.

Why it streams: a run's corpus can be far larger than the owner's memory. Documents come one at a time
(peer/core/sources.py), are encoded a batch of a few MiB at a time, and go straight into the open shard file
while its SHA-256 is updated; peak memory is one batch plus the tokenizer, whatever the corpus size. A trained
tokenizer (`train_vocab`) is trained on a first pass over the inputs through an iterator.

Why it is atomic: everything is written into a hidden folder beside `out` and renamed to `out` at the end, so
an interrupted run (Ctrl-C, a full disk, a bad line halfway) leaves no half dataset where a peer could find one.

Held-out documents: document i (numbered over all inputs in order) is held out when
floor((i + 1) f) > floor(i f), f = heldout_fraction, as peer/core/data.py splits a corpus in memory, until the
held-out shard holds `heldout_tokens` (the document that fills it is cut there); later documents all train.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

from peer.core.encoders import make_encoder
from peer.core.shards import (
    BYTES_TOKENIZER,
    DTYPES,
    HELDOUT_NAME,
    INDEX_NAME,
    TOKENIZER_NAME,
    DatasetIndex,
    ShardInfo,
    shard_dtype,
)
from peer.core.sources import Piece, describe_inputs, read_pieces, resolve_inputs
from protocol.errors import DataError, SetupError
from protocol.files import fsync_path

BATCH_CHARS = 4 << 20
"""Text encoded per call: big enough for the tokenizer's threads, small enough not to matter in memory."""
BATCH_PIECES = 4096


@dataclass(frozen=True, kw_only=True, slots=True)
class PrepareOptions:
    """What `murmur prepare-data` was asked for; exactly one of `tokenizer` and `train_vocab`."""

    inputs: tuple[str, ...]
    out: Path
    tokenizer: str | None = None
    """"bytes" (vocab 256) or the path of a Hugging Face tokenizer.json."""
    train_vocab: int | None = None
    """Train a byte-level BPE of this many tokens (end-of-text included) on the inputs."""
    text_field: str = "text"
    shard_tokens: int = 1 << 24
    heldout_fraction: float = 0.01
    heldout_tokens: int = 1 << 22
    progress: bool | None = None
    """Progress bars on stderr; None: only when stderr is a terminal."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one --input")
        if (self.tokenizer is None) == (self.train_vocab is None):
            raise ValueError("give exactly one of --tokenizer and --train-tokenizer")
        if self.train_vocab is not None and not 257 <= self.train_vocab <= 1 << 32:
            raise ValueError(f"--train-tokenizer needs 257..{1 << 32} tokens (256 bytes and end-of-text at least)")
        if self.shard_tokens < 1 or self.heldout_tokens < 1:
            raise ValueError("--shard-tokens and --heldout-tokens must be >= 1")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A finished dataset: where it is, its id (SHA-256 of index.json) and its index."""

    path: Path
    dataset_id: str
    index: DatasetIndex


def prepare(opts: PrepareOptions) -> Prepared:
    """Read, tokenise and shard opts.inputs into opts.out (see the module docstring). Raises DataError (bad
    input, missing extra), DataNotFound (a path that is not there) or SetupError (out cannot be written)."""
    inputs = resolve_inputs(opts.inputs)
    _check_out(opts.out)
    training = _bar(opts, "training tokenizer", "doc") if opts.train_vocab is not None else None
    encoder = make_encoder(opts.tokenizer, opts.train_vocab, inputs, opts.text_field, training)
    dtype = shard_dtype(encoder.vocab_size)
    with _staging(opts.out) as folder:
        train = ShardWriter(folder, dtype, opts.shard_tokens, lambda i: f"shard-{i:05d}.bin")
        heldout = ShardWriter(folder, dtype, opts.heldout_tokens, lambda _: HELDOUT_NAME, limit=opts.heldout_tokens)
        router = Router(encoder.separator_ids, train, heldout, opts.heldout_fraction)
        with _bar(opts, "tokenising", "tok") as bar:
            for batch in _batches(read_pieces(inputs, opts.text_field)):
                bar.update(router.write(batch, encoder.encode([p.text for p in batch])))
        train_shards, heldout_shards = train.close(), heldout.close()
        if not train_shards or not heldout_shards:
            split = "held-out" if train_shards else "training"
            raise DataError(f"no {split} tokens: {router.documents['train']} training and "
                            f"{router.documents['heldout']} held-out documents (--heldout-fraction "
                            f"{opts.heldout_fraction}); give more documents or another fraction")  # fmt: skip
        if encoder.tokenizer_json is not None:
            _write_file(folder / TOKENIZER_NAME, encoder.tokenizer_json)
        index = DatasetIndex(
            dtype=dtype, vocab_size=encoder.vocab_size, tokenizer=encoder.tokenizer_id,
            tokenizer_file=None if encoder.tokenizer_id == BYTES_TOKENIZER else TOKENIZER_NAME,
            eos_id=encoder.eos_id, separator_ids=tuple(encoder.separator_ids), shard_tokens=opts.shard_tokens,
            train=tuple(train_shards), heldout=heldout_shards[0],
            total_tokens=train.tokens + heldout.tokens, documents=dict(router.documents),
            heldout_fraction=opts.heldout_fraction, text_field=opts.text_field,
            inputs=tuple(describe_inputs(opts.inputs, inputs)),
        )  # fmt: skip
        raw = index.to_json()
        _write_file(folder / INDEX_NAME, raw)
    return Prepared(opts.out, hashlib.sha256(raw).hexdigest(), index)


def _bar(opts: PrepareOptions, desc: str, unit: str) -> tqdm:
    return tqdm(desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                disable=None if opts.progress is None else not opts.progress)  # fmt: skip


def _batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    """Pieces in lists of at most BATCH_PIECES pieces or about BATCH_CHARS characters."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if len(batch) >= BATCH_PIECES or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class Router:
    """Sends each document to the training or held-out writer, separators between documents of each."""

    def __init__(self, separator_ids: Sequence[int], train: ShardWriter, heldout: ShardWriter,
                 fraction: float) -> None:  # fmt: skip
        self.separator = np.asarray(separator_ids, dtype=np.int64)
        self.train, self.heldout, self.fraction = train, heldout, fraction
        self.target = train
        self.documents = {"train": 0, "heldout": 0}
        self._next = 0

    def _held_out(self) -> bool:
        """Whether the next document is held out (the module docstring's rule, while the shard has room)."""
        i, self._next = self._next, self._next + 1
        return math.floor((i + 1) * self.fraction) > math.floor(i * self.fraction) and not self.heldout.full

    def write(self, pieces: Sequence[Piece], encoded: Sequence[np.ndarray]) -> int:
        """Write encoded pieces; returns the tokens written."""
        written = 0
        for piece, ids in zip(pieces, encoded):
            if piece.starts_document:
                self.target = self.heldout if self._held_out() else self.train
                self.documents["heldout" if self.target is self.heldout else "train"] += 1
                if self.target.tokens:
                    written += self.target.write(self.separator)
            written += self.target.write(ids)
        return written


class ShardWriter:
    """Token files of `capacity` tokens each (the last one shorter), each hashed while it is written.
    `limit`: tokens beyond it are dropped (the held-out shard); `full` says when it is reached."""

    def __init__(self, folder: Path, dtype: str, capacity: int, name_for: Callable[[int], str],
                 limit: int | None = None) -> None:  # fmt: skip
        self.folder, self.dtype, self.capacity, self.limit = folder, DTYPES[dtype], capacity, limit
        self.name_for = name_for
        self.tokens = 0
        self.shards: list[ShardInfo] = []
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._in_file = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.tokens >= self.limit

    def write(self, ids: np.ndarray) -> int:
        """Append ids (cut at `limit`); returns how many were kept."""
        if self.limit is not None:
            ids = ids[: max(0, self.limit - self.tokens)]
        done = 0
        while done < len(ids):
            if self._file is None:
                self._file = _create(self.folder / self.name_for(len(self.shards)))
            take = min(len(ids) - done, self.capacity - self._in_file)
            data = ids[done : done + take].astype(self.dtype).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_file += take
            done += take
            if self._in_file == self.capacity:
                self._finish()
        self.tokens += done
        return done

    def _finish(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self.name_for(len(self.shards))
        self.shards.append(ShardInfo(name=name, tokens=self._in_file, sha256=self._hash.hexdigest()))
        self._file, self._hash, self._in_file = None, hashlib.sha256(), 0

    def close(self) -> list[ShardInfo]:
        """Finish the open file; every shard written, in order."""
        if self._file is not None:
            self._finish()
        return self.shards


def _create(path: Path) -> IO[bytes]:
    try:
        return path.open("xb")
    except OSError as exc:
        raise SetupError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_file(path: Path, data: bytes) -> None:
    with _create(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_out(out: Path) -> None:
    """out must not exist, or be an empty folder: a dataset is never written over another one."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise SetupError(f"--out {out} exists and is not an empty folder; remove it or choose another")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out`, renamed to `out` when the block ends cleanly and deleted when it raises
    (Ctrl-C included); a killed process leaves only the hidden `.NAME.*.partial` folder behind."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise SetupError(f"cannot write into {out.parent}: {exc.strerror or exc}") from None
    try:
        yield folder
        folder.chmod(0o755)  # mkdtemp's 0700 would hide the dataset from whoever serves it
        os.rename(folder, out)  # atomic; replaces `out` only when it is an empty folder
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise



