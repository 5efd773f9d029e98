"""Corpora, tokenisation and a deterministic, disjoint stream of training windows per peer.

Why: every peer must train on its own data (DESIGN.md section 5) without a coordinator, and a run must
be reproducible. So a corpus is one token stream, cut into non-overlapping windows of seq_len + 1
tokens; each epoch shuffles the windows with a permutation that depends only on (seed, epoch), and
stream s of S takes every S-th window of it. Streams never share a window within an epoch, and a
stream's rounds consume successive blocks, so its rounds never repeat a window within an epoch either.

Sources: None or "default" is the corpus embedded in the package (CPython's own prose, byte level, no
download); otherwise a .txt file, a .jsonl file (one JSON object per line with a text field) or a
directory of those, read in sorted order. Tokenisation (peer/core/tokenizers.py) is byte level (vocab 256)
unless a local `tokenizer.json` is given, which needs the optional `tokenizers` package.

Validation split: documents, not a tail. A document is a paragraph of a .txt file (text between blank
lines) or one record of a .jsonl file; the documents are numbered across the whole source in order and
document i is held out when floor((i + 1) * f) > floor(i * f), which is every (1/f)-th document for
f = val_fraction. This samples the whole corpus evenly (a tail would be one topic: the default corpus is
sorted by stdlib module) while no held-out text appears in the training stream. A source with fewer
documents than that needs (one long paragraph) falls back to holding out the last val_fraction of its
tokens, and says so in a warning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from peer.core.tokenizers import Tokenizer, load_tokenizer
from protocol.errors import DataNotFound
from protocol.logs import get_logger

log = get_logger(__name__)

DEFAULT_SOURCE = "default"
_DEFAULT_RESOURCE = "default.txt.gz"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_DOC_SEPARATOR = "\n\n"
_SUFFIXES = (".txt", ".jsonl")
Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y): int64 (B, T), y[:, t] = x[:, t + 1] in the window


@dataclass(kw_only=True, slots=True)
class Corpus:
    """A tokenised corpus: training and held-out token streams (1-D, uint8 or int32)."""

    name: str
    """What was loaded: "default" or the path given."""
    train: torch.Tensor
    """Training tokens, documents joined by a blank line."""
    val: torch.Tensor
    """Held-out tokens: every (1/val_fraction)-th document (see the module docstring)."""
    vocab_size: int
    tokenizer: Tokenizer
    """Decodes samples; the same one that encoded the corpus."""


def load_corpus(
    source: str | Path | None = None,
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> Corpus:
    """Load, split and tokenise a corpus; None or "default" is the corpus embedded in the package.

    Raises DataNotFound (a FileNotFoundError) for a missing path and ValueError (naming file and line) for a source
    with no text, a jsonl line that is not a JSON object with a string `text_field`, or a corpus too
    short to split. A source with fewer documents than the split needs (one long paragraph, say) holds
    out the last val_fraction of its tokens instead, with a warning.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer)
    name, docs = _read_source(source, text_field)
    if not docs:
        raise ValueError(f"corpus {name} contains no text")
    train_docs, val_docs = _split_documents(docs, val_fraction)
    if val_docs or val_fraction == 0:
        train = tok.encode_documents(train_docs, _DOC_SEPARATOR)
        val = tok.encode_documents(val_docs, _DOC_SEPARATOR)
    else:
        log.warning(
            "corpus %s: %d document(s), too few to hold out whole ones; holding out last %.0f%% of tokens",
            name, len(docs), 100 * val_fraction,
        )  # fmt: skip
        train, val = _split_tail(tok.encode_documents(docs, _DOC_SEPARATOR), val_fraction, name)
    if train.numel() == 0:
        raise ValueError(f"corpus {name} has no training tokens")
    log.debug(
        "corpus %s: %d docs, %d train / %d val tokens, vocab %d (%s)",
        name, len(docs), train.numel(), val.numel(), tok.vocab_size, tok.name,
    )  # fmt: skip
    return Corpus(name=name, train=train, val=val, vocab_size=tok.vocab_size, tokenizer=tok)


def _split_tail(tokens: torch.Tensor, val_fraction: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) with val the last val_fraction of the tokens; the fallback for few documents."""
    n_val = int(tokens.numel() * val_fraction)
    if n_val == 0:
        raise ValueError(f"corpus {name} has {tokens.numel()} tokens, too few to hold out {val_fraction:.0%}")
    return tokens[:-n_val], tokens[-n_val:]


def default_corpus_text() -> str:
    """The embedded corpus, read through importlib.resources so it works from an installed wheel."""
    data = (resources.files("peer") / "corpus" / _DEFAULT_RESOURCE).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def _read_source(source: str | Path | None, text_field: str) -> tuple[str, list[str]]:
    """(name, documents) of a source; see load_corpus."""
    if source is None or source == DEFAULT_SOURCE:
        return DEFAULT_SOURCE, _paragraphs(default_corpus_text())
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise ValueError(f"directory {path} holds no .txt or .jsonl files")
        return str(path), [doc for file in files for doc in _read_file(file, text_field)]
    if not path.exists():
        raise DataNotFound(f"corpus not found: {path}")
    return str(path), _read_file(path, text_field)


def _read_file(path: Path, text_field: str) -> list[str]:
    """Documents of one file: paragraphs of text, or records of jsonl."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if path.suffix == ".txt":
        return _paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    raise ValueError(f"{path}: unsupported corpus file type {path.suffix!r} (use .txt or .jsonl)")


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    """The `text_field` of every non-blank line; any malformed line is an error naming it."""
    docs: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string field {text_field!r}")
            if record[text_field].strip():
                docs.append(record[text_field])
    return docs


def _paragraphs(text: str) -> list[str]:
    """Non-blank paragraphs of text (split at blank lines), the document unit of .txt sources."""
    return [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")) if p.strip()]


def _split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): document i goes to val when floor((i + 1) * f) > floor(i * f)."""
    train: list[str] = []
    val: list[str] = []
    for i, doc in enumerate(docs):
        held_out = math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
        (val if held_out else train).append(doc)
    return train, val


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process for str/bytes)."""
    digest = hashlib.blake2b(b"".join(v.to_bytes(8, "little", signed=True) for v in values), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def stream_index_for(peer_id: bytes, num_streams: int) -> int:
    """A networked peer's stream, stable across processes and machines (blake2b of the peer id).

    Two peers collide with probability 1/num_streams; with more streams than peers collisions are rare
    but not impossible, and a collision only means those two peers see the same windows.
    """
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    return int.from_bytes(hashlib.blake2b(peer_id, digest_size=8).digest(), "little") % num_streams


class TokenStream:
    """Stream `stream_index` of `num_streams` disjoint streams of (x, y) batches over `tokens`.

    Window w is tokens[w * (seq_len + 1) : (w + 1) * (seq_len + 1)]. Epoch e shuffles all windows with
    a permutation seeded by (seed, e), shared by every stream, and stream s owns positions s, s + S,
    s + 2S, ... of it (S = num_streams; the last n_windows % S windows go unused). The stream's windows
    are consumed in order: batch (round, step) of size B takes positions
    (round * steps_per_round + step) * B ... + B - 1 of the stream, wrapping into the next epoch (a new
    permutation) when the stream runs out. So a batch depends only on (seed, stream_index, round, step,
    batch_size), and resuming at any round needs no state.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        *,
        stream_index: int,
        num_streams: int,
        steps_per_round: int,
        seed: int = 0,
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 1 or steps_per_round < 1 or num_streams < 1:
            raise ValueError("seq_len, steps_per_round and num_streams must be >= 1")
        if not 0 <= stream_index < num_streams:
            raise ValueError(f"stream_index {stream_index} not in [0, {num_streams})")
        self.tokens = tokens
        self.seq_len = seq_len
        self.stream_index = stream_index
        self.num_streams = num_streams
        self.steps_per_round = steps_per_round
        self.seed = seed
        self.n_windows = tokens.numel() // (seq_len + 1)
        self.windows_per_epoch = self.n_windows // num_streams
        if self.windows_per_epoch < 1:
            raise ValueError(
                f"{tokens.numel()} tokens make {self.n_windows} windows of {seq_len + 1}, "
                f"fewer than the {num_streams} streams need; use a bigger corpus or shorter seq_len"
            )
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _stream_windows(self, epoch: int) -> torch.Tensor:
        """This stream's window ids in epoch `epoch`, in consumption order (two epochs cached)."""
        if epoch not in self._perm_cache:
            # epochs past int64 (only a lying round gets there) wrap: the seed stays a function of the epoch
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch % (1 << 63)))
            perm = torch.randperm(self.n_windows, generator=gen)
            owned = perm[self.stream_index :: self.num_streams][: self.windows_per_epoch]
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = owned
        return self._perm_cache[epoch]

    def window_ids(self, round: int, step: int, batch_size: int) -> torch.Tensor:
        """Ids of the windows that batch (round, step) uses, shape (batch_size,)."""
        if round < 0 or not 0 <= step < self.steps_per_round:
            raise ValueError(f"need round >= 0 and 0 <= step < {self.steps_per_round}; got {round}, {step}")
        if not 1 <= batch_size <= self.windows_per_epoch:
            raise ValueError(
                f"batch_size {batch_size} needs 1..{self.windows_per_epoch} windows per stream and epoch "
                f"({self.n_windows} windows of {self.seq_len + 1} tokens, {self.num_streams} streams)"
            )
        # Python ints until the offsets: a round is whatever the wire carried (uint64), and (round * steps + step)
        # * batch overflows int64 long before it overflows anything else (an epoch of 2^62 crashed a peer).
        start = (round * self.steps_per_round + step) * batch_size
        first_epoch, first_offset = divmod(start, self.windows_per_epoch)
        offsets = torch.arange(first_offset, first_offset + batch_size)
        ids = torch.empty(batch_size, dtype=torch.long)
        for extra in range(2):  # batch_size <= windows_per_epoch: one or two epochs per batch
            mask = offsets // self.windows_per_epoch == extra
            if bool(mask.any()):
                ids[mask] = self._stream_windows(first_epoch + extra)[offsets[mask] % self.windows_per_epoch]
        return ids

    def batch(self, round: int, step: int, batch_size: int) -> Batch:
        """(x, y), int64 of shape (batch_size, seq_len), y[:, t] = x[:, t + 1] within the window."""
        return windows_to_batch(self.tokens, self.window_ids(round, step, batch_size), self.seq_len)


def windows_to_batch(tokens: torch.Tensor, ids: torch.Tensor, seq_len: int) -> Batch:
    """Gather windows `ids` of seq_len + 1 tokens in one indexing op; (x, y), contiguous int64 (B, T)."""
    rows = tokens[ids[:, None] * (seq_len + 1) + torch.arange(seq_len + 1)].long()  # (B, T + 1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def val_batches(corpus: Corpus, seq_len: int, batch_size: int, max_batches: int) -> Iterator[Batch]:
    """Deterministic (x, y) batches over the held-out split: the same windows every call.

    Uses min(max_batches * batch_size, available) non-overlapping windows spread evenly over the whole
    val stream (not just its head), so a capped evaluation still samples every part of the corpus. A
    last, partial batch is yielded short rather than dropped.
    """
    available = corpus.val.numel() // (seq_len + 1)
    if available < 1:
        raise ValueError(
            f"corpus {corpus.name}: the val split has {corpus.val.numel()} tokens, "
            f"less than one window of {seq_len + 1}; raise val_fraction or shorten seq_len"
        )
    count = min(max(max_batches, 0) * batch_size, available)
    ids = torch.arange(count) * available // max(count, 1)
    for start in range(0, count, batch_size):
        yield windows_to_batch(corpus.val, ids[start : start + batch_size], seq_len)


def unigram_entropy(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies: the loss of the best model that ignores context.

    A language model's validation loss should end well below this; near it, the model learned only
    token frequencies.
    """
    if tokens.numel() == 0:
        raise ValueError("unigram_entropy of an empty token stream")
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())
