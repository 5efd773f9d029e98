"""The tokenizer side of `murmur prepare-data`: bytes, a given tokenizer.json, or a byte-level BPE trained on
the inputs, behind one `Encoder` that turns a batch of texts into id arrays.

Why not peer/core/tokenizers.py's `Tokenizer`: preparing needs more than ids in and text out. It needs the
tokenizer's own bytes (their SHA-256 names the tokenizer in index.json and the run config), the id that
separates documents, and batch encoding straight to arrays; training reads the corpus through an iterator, so
the corpus is never a list in memory.

End of text: a trained tokenizer gets "<|endoftext|>" (id 0) as its only special token. A given one's separator
is the first of EOS_CANDIDATES it has as a special token, else "\\n\\n" encoded (with a warning). Either way
documents are encoded with `encode_special_tokens`, so a document that contains the text "<|endoftext|>" gets
ordinary tokens for it, never the separator's id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from peer.core.shards import BYTES_TOKENIZER
from peer.core.sources import INSTALL_HINT, Input, read_pieces
from protocol.errors import DataError, DataNotFound
from protocol.logs import get_logger

log = get_logger(__name__)

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
TEXT_SEPARATOR = "\n\n"
"""Between documents when a tokenizer has no end-of-text token: a blank line, as peer/core/data.py joins them."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Encoder:
    """Texts to token ids, and what index.json records about the tokenizer."""

    vocab_size: int
    tokenizer_id: str
    """"bytes" or the SHA-256 of tokenizer_json."""
    tokenizer_json: bytes | None
    eos_id: int | None
    separator_ids: tuple[int, ...]
    hf: Any = None
    """The `tokenizers.Tokenizer`, None for bytes."""

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of each text (int64 arrays); the HF tokenizer encodes the batch on all its threads."""
        if self.hf is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
        batch = self.hf.encode_batch(list(texts), add_special_tokens=False)
        encoded = [np.asarray(e.ids, dtype=np.int64) for e in batch]
        top = max((int(ids.max()) for ids in encoded if ids.size), default=0)
        if top >= self.vocab_size:
            raise DataError(f"the tokenizer produced id {top}, outside its vocabulary of {self.vocab_size}")
        return encoded


def make_encoder(spec: str | None, train_vocab: int | None, inputs: Sequence[Input], text_field: str,
                 bar: tqdm | None = None) -> Encoder:  # fmt: skip
    """Bytes (spec "bytes"), the tokenizer.json at path `spec`, or a BPE of `train_vocab` tokens trained on
    inputs (documents counted on `bar`, closed here)."""
    if train_vocab is not None:
        with bar if bar is not None else tqdm(disable=True) as shown:
            tok = _train_bpe(inputs, text_field, train_vocab, shown)
        return _from_hf(tok, tok.to_str().encode("utf-8"))
    if spec in (BYTES_TOKENIZER, "byte"):
        return Encoder(vocab_size=256, tokenizer_id=BYTES_TOKENIZER, tokenizer_json=None, eos_id=None,
                       separator_ids=tuple(TEXT_SEPARATOR.encode()))  # fmt: skip
    path = Path(str(spec))
    if not path.is_file():
        raise DataNotFound(f"tokenizer file not found: {path}")
    raw = path.read_bytes()
    return _from_hf(_load_hf(raw, str(path)), raw)


def _hf_module() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"a tokenizer other than bytes needs the 'tokenizers' package: {INSTALL_HINT}") from None
    return tokenizers


def _load_hf(raw: bytes, where: str) -> Any:
    tokenizers = _hf_module()
    try:
        return tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception ("Model missing") for a malformed file
        raise DataError(f"{where}: not a Hugging Face tokenizer.json ({str(exc).splitlines()[0]})") from None


def _train_bpe(inputs: Sequence[Input], text_field: str, vocab: int, bar: tqdm) -> Any:
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder: every text encodes, decoding is exact) trained on
    the inputs' texts, streamed through an iterator."""
    tokenizers = _hf_module()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(_texts(read_pieces(inputs, text_field), bar), trainer=trainer)
    return tok


def _texts(pieces: Iterable[Any], bar: tqdm) -> Iterable[str]:
    for piece in pieces:
        bar.update(piece.starts_document)
        yield piece.text


def _from_hf(tok: Any, raw: bytes) -> Encoder:
    """An Encoder over a `tokenizers.Tokenizer` whose file is `raw`: a given file is kept byte for byte, so its
    SHA-256 (the tokenizer's name in index.json and the run config) is the one its owner computes."""
    vocab = int(tok.get_vocab_size(with_added_tokens=True))
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    eos = next((specials[name] for name in EOS_CANDIDATES if name in specials), None)
    tok.encode_special_tokens = True  # document text never turns into a special token (see the module docstring)
    if eos is None:
        log.warning("the tokenizer has none of %s as a special token; documents are separated by %r",
                    ", ".join(EOS_CANDIDATES), TEXT_SEPARATOR)  # fmt: skip
        separator = tuple(tok.encode(TEXT_SEPARATOR, add_special_tokens=False).ids)
    else:
        separator = (eos,)
    return Encoder(vocab_size=vocab, tokenizer_id=hashlib.sha256(raw).hexdigest(), tokenizer_json=raw, eos_id=eos,
                   separator_ids=separator, hf=tok)  # fmt: skip
