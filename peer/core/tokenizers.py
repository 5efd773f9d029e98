"""Tokenizers: bytes (vocab 256, no files) or a Hugging Face `tokenizer.json`, behind one small interface.

Why a seam: the corpus, the token streams and the simulator only need ids in and text out; which tokenizer a
run uses is the manifest's business, and the `tokenizers` package is optional (byte level needs nothing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from protocol.errors import DataNotFound


class Tokenizer(ABC):
    """What murmur needs from a tokenizer, so callers need not care which one a run uses.

    `encode_documents` encodes a whole corpus at once; its default goes through `encode`, and
    subclasses override it when they have a path with no Python list per token.
    """

    name: str = "tokenizer"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct token ids; every id is in [0, vocab_size)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; never raises on ids that do not form valid text."""

    def encode_documents(self, docs: Sequence[str], separator: str) -> torch.Tensor:
        """Ids of the documents joined by separator: 1-D, uint8 or int32 (see token_dtype)."""
        return torch.tensor(self.encode(separator.join(docs)), dtype=token_dtype(self.vocab_size))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocab 256, nothing to download, every text encodable."""

    name = "bytes"

    @property
    def vocab_size(self) -> int:
        """256: one id per byte value."""
        return 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of text."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 decoding of the ids taken as bytes; broken sequences become U+FFFD."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_documents(self, docs: Sequence[str], separator: str) -> torch.Tensor:
        """uint8 tensor of the UTF-8 bytes, built without a Python loop."""
        data = bytearray(separator.join(docs).encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class JsonTokenizer(Tokenizer):
    """A local Hugging Face `tokenizer.json`, loaded with the optional `tokenizers` package."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataNotFound(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError as exc:
            raise ImportError(
                f"reading {path} needs the optional 'tokenizers' package: pip install 'murmur[tokenizers]'"
            ) from exc
        self._tok: Any = HfTokenizer.from_file(str(path))
        self.name = path.name

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Ids without special tokens (documents are concatenated, not wrapped)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens skipped."""
        return str(self._tok.decode([int(i) for i in ids]))

    def encode_documents(self, docs: Sequence[str], separator: str) -> torch.Tensor:
        """Documents encoded in parallel (encode_batch), separator tokens between them.

        Several times faster than one long string, which `tokenizers` encodes on one thread.
        """
        sep = self.encode(separator)
        ids: list[int] = []
        for i, encoding in enumerate(self._tok.encode_batch(list(docs), add_special_tokens=False)):
            if i:
                ids.extend(sep)
            ids.extend(encoding.ids)
        return torch.tensor(ids, dtype=token_dtype(self.vocab_size))


def load_tokenizer(spec: Tokenizer | str | Path | None) -> Tokenizer:
    """A tokenizer from None/"bytes" (byte level), a path to a tokenizer.json, or an instance."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec is None or spec in ("bytes", "byte"):
        return ByteTokenizer()
    return JsonTokenizer(spec)


def token_dtype(vocab_size: int) -> torch.dtype:
    """uint8 when every id fits a byte (a quarter of int32's memory), else int32."""
    return torch.uint8 if vocab_size <= 256 else torch.int32
