"""A prepared dataset on disk: token shards, their index.json, and the reader a peer trains from.

Why this format (DESIGN.md section 5): a run's owner tokenises once (`murmur prepare-data`, peer/core/prepare.py)
and every volunteer memory-maps the result, fetching only the shards its own stream reaches. So:

    DIR/index.json        what the shards are; its SHA-256 is the dataset id the manifest names
    DIR/tokenizer.json    the Hugging Face tokenizer that made them (absent for byte-level data)
    DIR/shard-00000.bin   training tokens: raw little-endian uint16 (vocab <= 65536) or uint32, no header,
    DIR/shard-00001.bin   `shard_tokens` each, the last one shorter; np.memmap or torch.from_file read them
    DIR/heldout.bin       the held-out documents, for evaluation only

Documents are joined by `separator_ids` (the tokenizer's end-of-text token, or "\\n\\n" for bytes) across shard
boundaries, as peer/core/data.py joins them in memory. index.json is checked field by field before anything is
trusted (a later change downloads it from a URL), a shard's SHA-256 the first time it is opened; a shard that
does not match is refused (CorruptShard) and never read. Which windows a stream reads is peer/core/shard_plan.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer.core.data import Batch
from peer.core.shard_plan import StreamPlan
from peer.core.tokenizers import ByteTokenizer, JsonTokenizer, Tokenizer
from protocol.errors import CorruptShard, DataError, DataNotFound
from protocol.files import sha256_file

FORMAT = "murmur-shards"
VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
HELDOUT_NAME = "heldout.bin"
BYTES_TOKENIZER = "bytes"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MAX_OPEN_SHARDS = 16
"""A stream reads a couple of shards per epoch; a long run would otherwise map every shard it ever read."""
MAX_INDEX_BYTES = 64 << 20
"""About 150 bytes a shard: room for 400,000 shards (6.7 trillion tokens at 2^24 each); more is not an index."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_dtype(vocab_size: int) -> str:
    """"uint16" when every id fits 16 bits (half of uint32's disk and download), else "uint32"."""
    if not 1 <= vocab_size <= 1 << 32:
        raise DataError(f"a vocabulary of {vocab_size} tokens does not fit uint32 token shards")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"





@dataclass(frozen=True, kw_only=True, slots=True)
class ShardInfo:
    """One token file: its name in the dataset folder, its length in tokens and its SHA-256."""

    name: str
    tokens: int
    sha256: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetIndex:
    """index.json, parsed and checked. Every field is written by prepare-data and read back here; an unknown
    one is refused (a newer format says so with its version)."""

    format: str = FORMAT
    version: int = VERSION
    dtype: str
    vocab_size: int
    tokenizer: str
    """"bytes", or the SHA-256 of tokenizer.json: the value a run config's [data] tokenizer must hold."""
    tokenizer_file: str | None
    eos_id: int | None
    """The tokenizer's end-of-text token when it has one; None for bytes."""
    separator_ids: tuple[int, ...]
    """The tokens between two documents: (eos_id,), or the encoding of "\\n\\n" (bytes: (10, 10))."""
    shard_tokens: int
    """Tokens of every training shard but the last."""
    train: tuple[ShardInfo, ...]
    heldout: ShardInfo
    total_tokens: int
    """Training and held-out tokens together."""
    documents: dict[str, int]
    """Documents per split ("train", "heldout")."""
    heldout_fraction: float
    text_field: str
    inputs: tuple[dict[str, Any], ...]
    """What the dataset came from: each --input as given, its files and bytes."""

    def to_json(self) -> bytes:
        """The bytes of index.json (their SHA-256 is the dataset id): fixed key order, so equal inputs give
        equal ids."""
        data = asdict(self)
        data["separator_ids"], data["inputs"] = list(self.separator_ids), list(self.inputs)
        return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def parse(cls, raw: bytes, where: str = INDEX_NAME) -> DatasetIndex:
        """Check every field of index.json bytes; any problem is a DataError naming `where` and the field."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{where}: not a JSON object")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise DataError(f"{where}: not a {FORMAT} version {VERSION} index "
                            f"(format {data.get('format')!r}, version {data.get('version')!r})")  # fmt: skip
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            data["separator_ids"], data["inputs"] = tuple(data["separator_ids"]), tuple(data["inputs"])
            data["train"] = tuple(ShardInfo(**shard) for shard in data["train"])
            data["heldout"] = ShardInfo(**data["heldout"])
            return _checked(cls(**data))
        except (KeyError, TypeError) as exc:  # a field missing, or of a type that does not fit (checks compare)
            raise DataError(f"{where}: missing or malformed field ({exc})") from None


def _checked(index: DatasetIndex) -> DatasetIndex:
    """index, or a DataError naming the first field that is wrong."""
    problems = []
    if not (_int(index.vocab_size) and 1 <= index.vocab_size <= 1 << 32):
        problems.append(f"vocab_size {index.vocab_size!r} is not a size of uint32 ids")
    elif index.dtype != shard_dtype(index.vocab_size):
        problems.append(f"dtype {index.dtype!r} does not suit vocab_size {index.vocab_size}")
    if not (_int(index.shard_tokens) and index.shard_tokens >= 1):
        problems.append(f"shard_tokens {index.shard_tokens!r} is not a positive integer")
    if index.tokenizer != BYTES_TOKENIZER and not _is_sha256(index.tokenizer):
        problems.append(f"tokenizer {index.tokenizer!r} is neither 'bytes' nor a SHA-256")
    if (index.tokenizer == BYTES_TOKENIZER) != (index.tokenizer_file is None) or not (
        index.tokenizer_file is None or _is_name(index.tokenizer_file)
    ):
        problems.append(f"tokenizer_file {index.tokenizer_file!r} does not suit tokenizer {index.tokenizer!r}")
    ids = [*index.separator_ids, *([] if index.eos_id is None else [index.eos_id])]
    if not index.separator_ids or not all(_int(i) and 0 <= i < index.vocab_size for i in ids):
        problems.append(f"separator_ids {list(index.separator_ids)} / eos_id {index.eos_id} not ids of the vocabulary")
    shards = [*index.train, index.heldout]
    for shard in shards:
        if not (_is_name(shard.name) and _int(shard.tokens) and shard.tokens >= 1 and _is_sha256(shard.sha256)):
            problems.append(f"shard entry {shard} is malformed")
    if len({s.name for s in shards} | {INDEX_NAME, index.tokenizer_file}) != len(shards) + 2:
        problems.append("shard names repeat or clash with index.json / tokenizer.json")
    if not index.train or any(s.tokens != index.shard_tokens for s in index.train[:-1]) or (
        index.train[-1].tokens > index.shard_tokens
    ):
        problems.append(f"training shards do not hold shard_tokens ({index.shard_tokens}) each")
    if index.total_tokens != sum(s.tokens for s in shards):
        problems.append(f"total_tokens {index.total_tokens} is not the sum of the shards' tokens")
    if problems:
        raise DataError(f"{INDEX_NAME}: {problems[0]}")
    return index


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _is_name(value: object) -> bool:
    """A plain file name: index.json may come from elsewhere, and "../x" must never be opened."""
    return isinstance(value, str) and _SAFE_NAME.fullmatch(value) is not None and ".." not in value


@dataclass(kw_only=True, slots=True)
class PreparedDataset:
    """A checked index and its folder; shards are opened (hashed, then memory-mapped) when first read."""

    root: Path
    index: DatasetIndex
    dataset_id: str
    """SHA-256 of index.json's bytes: what a manifest names and prepare-data printed last."""
    _open: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    """Mapped shards, least recently read first (at most MAX_OPEN_SHARDS: each holds a file descriptor)."""
    _checked: set[str] = field(default_factory=set)
    """Shards whose SHA-256 matched; reopened after eviction without hashing again."""

    @classmethod
    def open(cls, root: str | Path, *, dataset_id: str | None = None) -> PreparedDataset:
        """Read and check DIR/index.json (and that its SHA-256 is `dataset_id` when given). Opens no shard."""
        root = Path(root)
        path = root / INDEX_NAME
        if not path.is_file():
            raise DataNotFound(f"no prepared dataset at {root} ({INDEX_NAME} not found)")
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise DataError(f"{path}: larger than {MAX_INDEX_BYTES >> 20} MiB, not an index")
        raw = path.read_bytes()
        found = hashlib.sha256(raw).hexdigest()
        if dataset_id is not None and found != dataset_id:
            raise DataError(f"{path}: dataset id {found}, expected {dataset_id}")
        return cls(root=root, index=DatasetIndex.parse(raw, str(path)), dataset_id=found)

    def shard(self, name: str) -> np.ndarray:
        """The tokens of shard `name`, memory-mapped; its size and SHA-256 are checked the first time."""
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        info = next((s for s in (*self.index.train, self.index.heldout) if s.name == name), None)
        if info is None:
            raise KeyError(f"no shard {name!r} in {self.root / INDEX_NAME}")
        tokens = self._map(info)
        self._checked.add(name)
        if len(self._open) >= MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        self._open[name] = tokens
        return tokens

    def verified(self, name: str) -> None:
        """Take shard `name`'s SHA-256 as checked: a downloader that hashed it as it fetched saves a second pass."""
        self._checked.add(name)

    def _map(self, info: ShardInfo) -> np.ndarray:
        path = self.root / info.name
        dtype = DTYPES[self.index.dtype]
        if not path.is_file():
            raise DataNotFound(f"shard {path} not found")
        if path.stat().st_size != info.tokens * dtype.itemsize:
            raise CorruptShard(f"{path}: {path.stat().st_size} bytes, expected {info.tokens * dtype.itemsize} "
                               f"({info.tokens} {self.index.dtype} tokens)")  # fmt: skip
        if info.name not in self._checked and (found := sha256_file(path)) != info.sha256:
            raise CorruptShard(f"{path}: SHA-256 {found}, index.json says {info.sha256}; fetch the shard again")
        return np.memmap(path, dtype=dtype, mode="r", shape=(info.tokens,))

    def tokenizer(self) -> Tokenizer:
        """The tokenizer that made the shards (its file checked against the index) to decode samples with."""
        if self.index.tokenizer_file is None:
            return ByteTokenizer()
        path = self.root / self.index.tokenizer_file
        if not path.is_file():
            raise DataNotFound(f"tokenizer {path} not found")
        if sha256_file(path) != self.index.tokenizer:
            raise DataError(f"{path}: SHA-256 differs from the tokenizer named in {INDEX_NAME}")
        return JsonTokenizer(path)

    def plan(self, seq_len: int, *, stream_index: int, num_streams: int, steps_per_round: int,
             seed: int = 0) -> StreamPlan:  # fmt: skip
        """Which windows and shards a stream reads; needs the index only (see peer/core/shard_plan.py)."""
        return StreamPlan([s.tokens for s in self.index.train], seq_len, stream_index=stream_index,
                          num_streams=num_streams, steps_per_round=steps_per_round, seed=seed)  # fmt: skip

    def stream(self, seq_len: int, *, stream_index: int, num_streams: int, steps_per_round: int,
               seed: int = 0) -> ShardStream:  # fmt: skip
        """Stream `stream_index` of `num_streams` disjoint streams: what a Trainer draws batches from."""
        return ShardStream(self, self.plan(seq_len, stream_index=stream_index, num_streams=num_streams,
                                           steps_per_round=steps_per_round, seed=seed))  # fmt: skip

    def windows(self, seq_len: int) -> int:
        """Training windows of seq_len + 1 tokens (each shard's tail short of a window unused)."""
        return sum(s.tokens // (seq_len + 1) for s in self.index.train)

    def heldout_batches(self, seq_len: int, batch_size: int, max_batches: int) -> Iterator[Batch]:
        """The same held-out (x, y) batches every call, as peer/core/data.py `val_batches`: min(max_batches *
        batch_size, available) windows spread evenly over the whole held-out shard; a last batch may be short."""
        available = self.index.heldout.tokens // (seq_len + 1)
        if available < 1:
            raise DataError(f"{self.root}: the held-out shard has {self.index.heldout.tokens} tokens, "
                            f"less than one window of {seq_len + 1}")  # fmt: skip
        count = min(max(max_batches, 0) * batch_size, available)
        ids = np.arange(count, dtype=np.int64) * available // max(count, 1)
        tokens = self.shard(self.index.heldout.name)
        for start in range(0, count, batch_size):
            chunk = ids[start : start + batch_size]
            yield _batch([tokens] * len(chunk), chunk, seq_len)


class ShardStream:
    """Batches of one stream of a PreparedDataset, with peer/core/data.py `TokenStream`'s interface."""

    def __init__(self, dataset: PreparedDataset, plan: StreamPlan) -> None:
        self.dataset, self.plan = dataset, plan
        self.seq_len = plan.seq_len

    def batch(self, round: int, step: int, batch_size: int) -> Batch:
        """(x, y), int64 of shape (batch_size, seq_len), y[:, t] = x[:, t + 1] within the window."""
        shards, windows = self.plan.windows(round, step, batch_size)
        names = [self.dataset.index.train[k].name for k in shards.tolist()]
        return _batch([self.dataset.shard(n) for n in names], windows, self.seq_len)

    def shards_for_round(self, round: int, batch_size: int) -> list[str]:
        """File names of the shards round `round` reads, in first-use order (index only, nothing opened)."""
        return [self.dataset.index.train[k].name for k in self.plan.shards_for_round(round, batch_size)]


def _batch(sources: list[np.ndarray], windows: np.ndarray, seq_len: int) -> Batch:
    """(x, y) from window w of sources[i] for each i: rows of seq_len + 1 tokens, copied out as int64."""
    span = seq_len + 1
    rows = np.stack([src[w * span : (w + 1) * span] for src, w in zip(sources, windows.tolist())]).astype(np.int64)
    tensor = torch.from_numpy(rows)  # (B, T + 1)
    return tensor[:, :-1].contiguous(), tensor[:, 1:].contiguous()
